"""The folder watcher against real filesystem events (inotify, and watchdog's polling observer).

Each test runs a ``FolderSource`` (with its ``Runner``) on a background thread over a temporary
folder and writes files the way real tools do: plain copies, rsync's hidden temp file then
rename, slow writers, ``mv`` from outside. Results are awaited by polling for the file, never by
fixed sleeps.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from handler.compare import resolve_concurrency
from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.result import ComparisonResult
from tests.support.logs import captured_logs
from tests.support.waiting import wait_for
from watcher.runner import Runner
from watcher.shutdown import StopFlag
from watcher.sources.folder import FolderSource

pytestmark = [
    pytest.mark.timeout(60),
    # watchdog warns when it re-adds the watch of a folder created or moved in; harmless.
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]


@contextmanager
def watching(root: Path, *, polling: bool = False, **overrides: Any) -> Iterator[FolderSource]:
    """A running watcher; stopped (and checked to have stopped) when the block ends."""
    settings = Settings(**{"settle_time": 0.2, **overrides})
    runner: Runner[Any] = Runner(
        MetricsComparator(),
        concurrency=resolve_concurrency(settings),
        queue_size=settings.queue_size,
    )
    watcher = FolderSource(root, settings, runner, polling=polling)
    stop = StopFlag()
    # daemon: a watcher stuck by a bug must fail this test, not hang the whole session.
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert watcher.caught_up.wait(10)
        yield watcher
    finally:
        stop.request()
        thread.join(10)
        assert not thread.is_alive(), "the watcher did not stop"


def wait_for_result(
    path: Path,
    where: Callable[[ComparisonResult], bool] = lambda r: True,
    timeout: float = 15.0,
) -> ComparisonResult:
    def matching() -> ComparisonResult | None:
        if not path.exists():
            return None
        result = ComparisonResult.model_validate_json(path.read_bytes())
        return result if where(result) else None

    result: ComparisonResult = wait_for(matching, timeout, 0.02, f"a matching {path}")
    return result


def rsync_put(path: Path, data: bytes) -> None:
    """What rsync does: write a hidden temporary name in the target folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.Xy7Q2z")
    temp.write_bytes(data)
    temp.rename(path)


def started(logs: list[MutableMapping[str, Any]], pair_id: str) -> int:
    return sum(1 for e in logs if e["event"] == "pair_started" and e.get("pair_id") == pair_id)


def test_plain_copy(tmp_path: Path, photos: dict[str, bytes]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.jpg").write_bytes(photos["a"])
    (source / "b.jpg").write_bytes(photos["a_copy"])
    root = tmp_path / "watched"
    root.mkdir()
    with captured_logs() as logs, watching(root):
        (root / "p1").mkdir()
        shutil.copy(source / "a.jpg", root / "p1" / "a.jpg")
        shutil.copy(source / "b.jpg", root / "p1" / "b.jpg")
        result = wait_for_result(root / "p1" / "result.json")
        # A barrier: the next pair's result means any event the first result could have
        # caused (it must cause none) has been handled already.
        rsync_put(root / "p2" / "a.jpg", photos["a"])
        rsync_put(root / "p2" / "b.jpg", photos["other"])
        wait_for_result(root / "p2" / "result.json")
    assert result.status == "ok" and result.is_similar
    assert started(logs, "p1") == 1, "the pair ran more than once (own outputs or coalescing)"
    events = {e["event"] for e in logs if e.get("pair_id") == "p1"}
    assert {"pair_detected", "pair_started", "image_prepared", "pair_compared"} <= events
    assert "result_written" in events


def test_rsync_temp_then_rename_coalesces_into_one_job(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    with captured_logs() as logs, watching(tmp_path):
        rsync_put(tmp_path / "r" / "a.jpg", photos["a"])
        rsync_put(tmp_path / "r" / "b.jpg", photos["other"])
        result = wait_for_result(tmp_path / "r" / "result.json")
    assert result.status == "ok" and result.is_similar is False
    assert started(logs, "r") == 1
    assert sorted(os.listdir(tmp_path / "r")) == ["a.jpg", "b.jpg", "diff.png", "result.json"]


@pytest.mark.parametrize("reopen", [False, True], ids=["one_open", "append_per_chunk"])
def test_slow_writer_is_read_only_once_complete(
    tmp_path: Path, photos: dict[str, bytes], reopen: bool
) -> None:
    """20 chunks over ~2 s, paused less than the settle time; the file is never read early.

    ``append_per_chunk`` closes the file after every chunk, so a watcher trusting close-write
    alone would read it half-written.
    """
    data = photos["other"]
    chunks = [data[i : i + len(data) // 20 + 1] for i in range(0, len(data), len(data) // 20 + 1)]
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "a.jpg").write_bytes(photos["a"])
    with captured_logs() as logs, watching(tmp_path, settle_time=0.4):
        target = tmp_path / "slow" / "b.jpg"
        handle = target.open("wb")
        for chunk in chunks:
            if reopen:
                handle = target.open("ab")
            handle.write(chunk)
            handle.flush()
            if reopen:
                handle.close()
            time.sleep(0.1)
        handle.close()
        finished = time.time()
        result = wait_for_result(tmp_path / "slow" / "result.json")
    assert result.status == "ok", result.error
    assert result.inputs[1].bytes == len(data)
    assert started(logs, "slow") == 1
    first_start = min(e["at"] for e in logs if e["event"] == "pair_started")
    assert first_start >= finished


def test_mv_from_outside(tmp_path: Path, photos: dict[str, bytes]) -> None:
    outside, root = tmp_path / "staging", tmp_path / "watched"
    root.mkdir()
    (outside / "pair").mkdir(parents=True)
    (outside / "pair" / "a.jpg").write_bytes(photos["a"])
    (outside / "pair" / "b.jpg").write_bytes(photos["a_copy"])
    (outside / "single.jpg").write_bytes(photos["other"])
    with watching(root):
        (root / "files").mkdir()
        (root / "files" / "a.jpg").write_bytes(photos["a"])
        os.rename(outside / "pair", root / "moved-folder")  # a whole pair folder at once
        os.rename(outside / "single.jpg", root / "files" / "b.jpg")  # one file into a folder
        folder = wait_for_result(root / "moved-folder" / "result.json")
        files = wait_for_result(root / "files" / "result.json")
    assert folder.status == "ok" and folder.is_similar
    assert files.status == "ok" and files.is_similar is False


def test_catch_up_after_downtime_and_idempotency(tmp_path: Path, photos: dict[str, bytes]) -> None:
    for pair, b in (("done", "a_copy"), ("new1", "other"), ("new2", "a_copy")):
        (tmp_path / pair).mkdir()
        (tmp_path / pair / "a.jpg").write_bytes(photos["a"])
        (tmp_path / pair / "b.jpg").write_bytes(photos[b])
    with watching(tmp_path):
        done = wait_for_result(tmp_path / "done" / "result.json")
        wait_for_result(tmp_path / "new1" / "result.json")
        wait_for_result(tmp_path / "new2" / "result.json")
    stamp = (tmp_path / "done" / "result.json").stat().st_mtime_ns
    # Down: pairs arrive, and one input of a finished pair is replaced.
    (tmp_path / "new1" / "result.json").unlink()
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "a.jpg").write_bytes(photos["a"])
    (tmp_path / "late" / "b.jpg").write_bytes(photos["other"])
    os.utime(tmp_path / "late" / "b.jpg", (time.time() - 60, time.time() - 60))
    rsync_put(tmp_path / "new2" / "b.jpg", photos["other"])
    with captured_logs() as logs, watching(tmp_path):
        wait_for_result(tmp_path / "late" / "result.json")
        wait_for_result(tmp_path / "new1" / "result.json")
        replaced = wait_for_result(tmp_path / "new2" / "result.json", lambda r: not r.is_similar)
    assert done.is_similar and replaced.is_similar is False
    assert (tmp_path / "done" / "result.json").stat().st_mtime_ns == stamp  # not redone
    assert started(logs, "done") == 0
    assert {e["pair_id"] for e in logs if e["event"] == "pair_detected"} >= {"late", "new1"}


def test_replacing_an_input_compares_again(tmp_path: Path, photos: dict[str, bytes]) -> None:
    with watching(tmp_path):
        rsync_put(tmp_path / "p" / "a.jpg", photos["a"])
        rsync_put(tmp_path / "p" / "b.jpg", photos["a_copy"])
        first = wait_for_result(tmp_path / "p" / "result.json")
        (tmp_path / "p" / "b.jpg").write_bytes(photos["other"])  # overwritten in place
        second = wait_for_result(tmp_path / "p" / "result.json", lambda r: r != first)
    assert first.is_similar and second.is_similar is False
    assert second.inputs[0].sha256 == first.inputs[0].sha256
    assert second.inputs[1].sha256 != first.inputs[1].sha256


def test_incomplete_then_completed_pair(tmp_path: Path, photos: dict[str, bytes]) -> None:
    with watching(tmp_path, pair_timeout=1.0):
        rsync_put(tmp_path / "lone" / "a.jpg", photos["a"])
        t0 = time.monotonic()
        incomplete = wait_for_result(tmp_path / "lone" / "result.json")
        waited = time.monotonic() - t0
        rsync_put(tmp_path / "lone" / "b.jpg", photos["a_copy"])
        complete = wait_for_result(tmp_path / "lone" / "result.json", lambda r: r.status == "ok")
    assert incomplete.error is not None and incomplete.error.type == "incomplete_pair"
    assert 0.7 <= waited < 5
    assert complete.is_similar


def test_ambiguous_pair_resolves_when_an_image_is_removed(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    (tmp_path / "amb").mkdir()
    for name, key in (("a.jpg", "a"), ("b.jpg", "a_copy"), ("c.jpg", "other")):
        (tmp_path / "amb" / name).write_bytes(photos[key])
    with watching(tmp_path):
        ambiguous = wait_for_result(tmp_path / "amb" / "result.json")
        (tmp_path / "amb" / "c.jpg").unlink()
        resolved = wait_for_result(tmp_path / "amb" / "result.json", lambda r: r.status == "ok")
    assert ambiguous.error is not None and ambiguous.error.type == "ambiguous_pair"
    assert "a.jpg, b.jpg, c.jpg" in ambiguous.error.message
    assert resolved.is_similar


def test_manifest_is_rerun_when_a_referenced_image_changes(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    with watching(tmp_path):
        rsync_put(tmp_path / "library" / "x" / "one.jpg", photos["a"])
        rsync_put(tmp_path / "library" / "y" / "two.jpg", photos["a_copy"])
        rsync_put(
            tmp_path / "check.pair.json",
            b'{"a": "library/x/one.jpg", "b": "library/y/two.jpg"}',
        )
        first = wait_for_result(tmp_path / "check.result.json")
        rsync_put(tmp_path / "library" / "y" / "two.jpg", photos["other"])
        second = wait_for_result(tmp_path / "check.result.json", lambda r: r != first)
    assert first.is_similar and second.is_similar is False


def test_escaping_manifest_and_hostile_images_do_not_stop_the_watcher(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.mkfifo(outside / "secret.jpg")  # reading it would block: proof that nothing reads it
    with watching(root):
        rsync_put(root / "escape.pair.json", b'{"a": "../outside/secret.jpg", "b": "ok.jpg"}')
        rsync_put(root / "bad" / "a.jpg", photos["a"])
        rsync_put(root / "bad" / "b.jpg", b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
        rsync_put(root / "empty" / "a.jpg", photos["a"])
        rsync_put(root / "empty" / "b.jpg", b"")
        rsync_put(root / "good" / "a.jpg", photos["a"])
        rsync_put(root / "good" / "b.jpg", photos["a_copy"])
        escape = wait_for_result(root / "escape.result.json")
        bad = wait_for_result(root / "bad" / "result.json")
        empty = wait_for_result(root / "empty" / "result.json")
        good = wait_for_result(root / "good" / "result.json")
    assert escape.error is not None and escape.error.type == "path_outside_root"
    assert bad.error is not None and bad.error.type == "invalid_image"
    assert empty.error is not None and empty.error.type == "invalid_image"
    assert good.status == "ok"


def test_full_queue_falls_back_to_a_rescan(tmp_path: Path, photos: dict[str, bytes]) -> None:
    names = [f"p{i}" for i in range(8)]
    # Settled together (all written well within the settle time, even on a loaded machine) and
    # one at a time in flight: 8 pairs meet a queue of 2 at once, however fast each compares.
    with captured_logs() as logs, watching(tmp_path, queue_size=2, settle_time=1.5, concurrency=1):
        for name in names:
            rsync_put(tmp_path / name / "a.jpg", photos["a"])
            rsync_put(tmp_path / name / "b.jpg", photos["a_copy"])
        for name in names:
            wait_for_result(tmp_path / name / "result.json")
    assert any(e["event"] == "queue_full" for e in logs)
    assert all(started(logs, name) == 1 for name in names)


def test_polling_observer(tmp_path: Path, photos: dict[str, bytes]) -> None:
    with watching(tmp_path, polling=True):
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "a.jpg").write_bytes(photos["a"])
        (tmp_path / "p" / "b.jpg").write_bytes(photos["a_copy"])
        assert wait_for_result(tmp_path / "p" / "result.json").is_similar


def test_no_threads_are_left_behind(tmp_path: Path, photos: dict[str, bytes]) -> None:
    before = set(threading.enumerate())
    for polling in (False, True):
        root = tmp_path / f"polling-{polling}"
        root.mkdir()
        with watching(root, polling=polling):
            rsync_put(root / "p" / "a.jpg", photos["a"])
            rsync_put(root / "p" / "b.jpg", photos["other"])
            wait_for_result(root / "p" / "result.json")
    assert set(threading.enumerate()) - before == set()
