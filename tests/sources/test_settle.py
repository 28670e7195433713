"""``watcher.sources.settle.Settler`` with a fake clock over real files: when a file counts as
written.

The clock only drives the settle wait; the files are real, since the settler compares their
size and mtime. A change always alters the size, so it shows whatever the mtime granularity.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.clock import Clock
from watcher.sources import settle
from watcher.sources.settle import CLOSE_WAIT_LIMIT, Settler

SETTLE = 2.0


def _write(path: Path, size: int) -> Path:
    path.write_bytes(b"x" * size)
    return path


def _age(path: Path, seconds: float = 60) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


# -- written in place: stable for settle_time ------------------------------------------------------


def test_a_file_is_ready_once_its_size_and_mtime_were_stable_for_settle_time(
    tmp_path: Path, clock: Clock
) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "create")
    assert settler.ready() == [] and len(settler) == 1
    assert settler.next_due() == pytest.approx(SETTLE)
    clock.now += SETTLE - 0.25
    assert settler.ready() == []
    clock.now += 0.25
    assert settler.ready() == [(path, pytest.approx(SETTLE))]
    assert len(settler) == 0 and settler.ready() == [] and settler.next_due() is None


def test_a_noted_change_resets_the_wait(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, track_close=False, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "create")
    clock.now += 1.5
    _write(path, 20)
    settler.note(path, "write")
    assert settler.next_due() == pytest.approx(SETTLE)
    clock.now += 1.0  # 2.5 s after the first note, 1 s after the change
    assert settler.ready() == []
    clock.now += 1.0
    # The age counts from the first note: that is how long the file waited in all.
    assert settler.ready() == [(path, pytest.approx(3.5))]


def test_a_change_without_an_event_is_caught_when_ready_looks(tmp_path: Path, clock: Clock) -> None:
    """Polling may miss a write: ``ready`` stats the file again and starts the wait over."""
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "scan")
    clock.now += SETTLE
    _write(path, 20)
    assert settler.ready() == [] and len(settler) == 1
    clock.now += SETTLE - 0.25
    assert settler.ready() == []
    clock.now += 0.25
    assert settler.ready() == [(path, pytest.approx(2 * SETTLE))]


def test_an_event_that_changes_nothing_does_not_reset_the_wait(
    tmp_path: Path, clock: Clock
) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "create")
    clock.now += 1.5
    settler.note(path, "attrib")  # a permission fix: same size and mtime
    clock.now += 0.5
    assert settler.ready() == [(path, pytest.approx(SETTLE))]


# -- close-write -----------------------------------------------------------------------------------


def test_an_open_write_waits_for_its_close(tmp_path: Path, clock: Clock) -> None:
    """A stall inside one open write: stable for settle_time is not enough while it is open."""
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")
    clock.now += 10 * SETTLE
    assert settler.ready() == []
    settler.note(path, "close")
    assert settler.ready() == [(path, pytest.approx(10 * SETTLE))]


def test_a_close_alone_proves_nothing_the_file_still_settles(tmp_path: Path, clock: Clock) -> None:
    """A writer that appends and closes per chunk fires close-write after every chunk."""
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")
    settler.note(path, "close")
    assert settler.ready() == []
    clock.now += 1.0
    _write(path, 20)
    settler.note(path, "write")
    settler.note(path, "close")
    clock.now += SETTLE - 0.25
    assert settler.ready() == []
    clock.now += 0.25
    assert settler.ready() == [(path, pytest.approx(1.0 + SETTLE))]


def test_a_lost_close_is_waited_for_at_most_close_wait_limit(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")
    assert settler.next_due() == pytest.approx(CLOSE_WAIT_LIMIT)
    clock.now += CLOSE_WAIT_LIMIT - 0.25
    assert settler.ready() == []
    clock.now += 0.25
    assert settler.ready() == [(path, pytest.approx(CLOSE_WAIT_LIMIT))]


def test_without_close_events_a_write_only_settles(tmp_path: Path, clock: Clock) -> None:
    """Polling reports no closes (``track_close=False``): nothing waits for one."""
    settler = Settler(SETTLE, track_close=False, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")
    assert settler.next_due() == pytest.approx(SETTLE)
    clock.now += SETTLE
    assert settler.ready() == [(path, pytest.approx(SETTLE))]


# -- renamed into place, deleted -------------------------------------------------------------------


def test_a_file_renamed_into_place_is_ready_at_once(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    temp = _write(tmp_path / ".a.jpg.Xy7Q2z", 10)
    path = tmp_path / "a.jpg"
    temp.rename(path)
    settler.note(path, "rename")
    assert settler.next_due() == 0.0
    assert settler.ready() == [(path, 0.0)]


def test_a_rename_completes_a_file_that_was_waiting(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")  # open, as far as the settler knows
    clock.now += 0.5
    settler.note(path, "rename")
    assert settler.ready() == [(path, pytest.approx(0.5))]  # aged from its first note


def test_a_late_scan_of_a_renamed_file_changes_nothing_but_a_write_does(
    tmp_path: Path, clock: Clock
) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "rename")
    settler.note(path, "scan")
    settler.note(path, "attrib")
    assert settler.ready() == [(path, 0.0)]

    settler.note(path, "rename")
    _write(path, 20)
    settler.note(path, "write")
    settler.note(path, "close")
    assert settler.ready() == []
    clock.now += SETTLE
    assert settler.ready() == [(path, pytest.approx(SETTLE))]


def test_a_renamed_file_that_changed_before_ready_looked_settles(
    tmp_path: Path, clock: Clock
) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "rename")
    _write(path, 20)  # written again, the event not seen yet
    assert settler.ready() == []
    clock.now += SETTLE
    assert settler.ready() == [(path, pytest.approx(SETTLE))]


def test_a_deletion_is_reported_at_once(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "write")
    clock.now += 0.5
    path.unlink()
    settler.note(path, "delete")
    assert settler.next_due() == 0.0
    assert settler.ready() == [(path, pytest.approx(0.5))]


def test_a_file_gone_without_an_event_is_reported_once_due(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "create")
    path.unlink()
    assert settler.ready() == []
    clock.now += SETTLE
    assert settler.ready() == [(path, pytest.approx(SETTLE))]
    settler.note(path, "create")  # a gone file is not remembered as settled
    assert len(settler) == 1


# -- echoes and memory -----------------------------------------------------------------------------


def test_a_late_echo_of_a_settled_file_is_ignored_a_change_is_not(
    tmp_path: Path, clock: Clock
) -> None:
    """The walk of a new folder reports files again that were already settled."""
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    settler.note(path, "rename")
    assert settler.ready() == [(path, 0.0)]
    settler.note(path, "create")
    settler.note(path, "scan")
    assert len(settler) == 0
    settler.note(path, "attrib")  # not an echo: looked at again
    assert len(settler) == 1
    assert settler.ready() == [] and settler.next_due() == pytest.approx(SETTLE)
    clock.now += SETTLE
    assert [p for p, _ in settler.ready()] == [path]
    _write(path, 20)
    settler.note(path, "scan")  # same name, new content: not an echo
    assert len(settler) == 1


def test_only_the_most_recent_settled_files_are_remembered(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settle, "CONFIRMED_MEMORY", 2)
    settler = Settler(SETTLE, clock=clock)
    paths = [_write(tmp_path / f"{name}.jpg", 10) for name in "abc"]
    for path in paths:
        settler.note(path, "rename")
    assert sorted(p for p, _ in settler.ready()) == paths
    for path in paths:
        settler.note(path, "scan")
    assert len(settler) == 1  # "a" was forgotten: its echo settles again, "b" and "c" do not


# -- next_due --------------------------------------------------------------------------------------


def test_next_due_is_the_soonest_wait(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    assert settler.next_due() is None
    first = _write(tmp_path / "a.jpg", 10)
    settler.note(first, "create")
    clock.now += 0.5
    settler.note(_write(tmp_path / "b.jpg", 10), "write")  # open: up to CLOSE_WAIT_LIMIT
    assert settler.next_due() == pytest.approx(SETTLE - 0.5)
    clock.now += SETTLE
    assert settler.next_due() == 0.0  # never negative
    assert settler.ready() == [(first, pytest.approx(SETTLE + 0.5))]
    assert settler.next_due() == pytest.approx(CLOSE_WAIT_LIMIT - SETTLE)


# -- defer_unsettled: a pair's other files ---------------------------------------------------------


def test_a_pair_waits_while_one_of_its_files_is_pending(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    a, b = _write(tmp_path / "a.jpg", 10), _write(tmp_path / "b.jpg", 10)
    _age(a)
    _age(b)
    settler.note(b, "write")
    assert settler.defer_unsettled([a, b])
    settler.note(b, "close")
    clock.now += SETTLE
    assert [p for p, _ in settler.ready()] == [b]
    assert not settler.defer_unsettled([a, b])


def test_a_recently_modified_partner_is_noted_and_defers_the_pair(
    tmp_path: Path, clock: Clock
) -> None:
    """The partner produced no event yet (polling): its fresh mtime is enough to wait for it."""
    settler = Settler(SETTLE, clock=clock)
    a, b = _write(tmp_path / "a.jpg", 10), _write(tmp_path / "b.jpg", 10)
    _age(a)
    assert settler.defer_unsettled([a, b])
    assert len(settler) == 1  # b is noted, so the pair comes back once it settles
    clock.now += SETTLE
    assert [p for p, _ in settler.ready()] == [b]
    # Settled with exactly this size and mtime: its recent mtime defers nothing any more.
    assert not settler.defer_unsettled([a, b])


def test_a_settled_file_with_an_mtime_in_the_future_does_not_defer_forever(
    tmp_path: Path, clock: Clock
) -> None:
    settler = Settler(SETTLE, clock=clock)
    path = _write(tmp_path / "a.jpg", 10)
    future = time.time() + 3600  # a writer's clock an hour ahead
    os.utime(path, (future, future))
    assert settler.defer_unsettled([path])
    clock.now += SETTLE
    assert [p for p, _ in settler.ready()] == [path]
    assert not settler.defer_unsettled([path])
    _write(path, 20)  # changed again: no longer the stat that settled
    assert settler.defer_unsettled([path])


def test_old_and_vanished_files_do_not_defer(tmp_path: Path, clock: Clock) -> None:
    settler = Settler(SETTLE, clock=clock)
    old = _write(tmp_path / "a.jpg", 10)
    _age(old)
    assert not settler.defer_unsettled([old, tmp_path / "missing.jpg"])
    assert len(settler) == 0


# -- threads ---------------------------------------------------------------------------------------


def test_notes_from_one_thread_and_collection_from_another(tmp_path: Path, clock: Clock) -> None:
    """The observer's thread notes while the watcher's loop collects: every file comes out once."""
    settler = Settler(0.0, track_close=False, clock=clock)
    paths = [_write(tmp_path / f"{index:03d}.jpg", 10) for index in range(300)]

    def observer() -> None:
        for path in paths:
            settler.note(path, "create")

    thread = threading.Thread(target=observer)
    thread.start()
    collected: list[Path] = []
    while thread.is_alive() or len(settler):
        collected += [path for path, _ in settler.ready()]
    thread.join()
    assert sorted(collected) == paths
