"""``watcher.rechecks`` with a fake clock: due times, back-off, replacement, giving up."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from handler.disposition import BACKOFF_S, retry
from tests.support.clock import Clock
from watcher.rechecks import Rechecks


def test_partner_due_comes_back_at_its_time(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock)
    assert rechecks.schedule("lone", retry("partner", at=1600.0)) == 1600.0
    assert rechecks.next_due() == pytest.approx(600)
    clock.now = 1599.0
    assert rechecks.due() == []
    clock.now = 1600.0
    assert rechecks.due() == ["lone"]
    assert rechecks.due() == [] and len(rechecks) == 0 and rechecks.next_due() is None


def test_transient_failures_back_off_and_are_counted(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock)
    delays = []
    for _ in range(len(BACKOFF_S) + 1):
        due = rechecks.schedule("k", retry("throttled"))
        assert due is not None
        delays.append(due - clock.now)
        clock.now = due
        assert rechecks.due() == ["k"]
    assert delays == [*BACKOFF_S, BACKOFF_S[-1]]
    assert rechecks.failures("k") == len(BACKOFF_S) + 1


def test_a_partner_wait_does_not_count_as_a_failure(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock)
    rechecks.schedule("k", retry("throttled"))
    rechecks.schedule("k", retry("partner", at=clock.now + 5))
    assert rechecks.failures("k") == 1


def test_scheduling_again_replaces_the_pending_recheck(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock)
    rechecks.schedule("k", retry("partner", at=1100.0))
    rechecks.schedule("k", retry("partner", at=1050.0))
    rechecks.schedule("other", retry("partner", at=1070.0))
    assert len(rechecks) == 2
    clock.now = 1200.0
    assert rechecks.due() == ["k", "other"]  # each once, earliest first


def test_clear_forgets_the_recheck_and_the_failures(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock)
    rechecks.schedule("k", retry("throttled"))
    rechecks.clear("k")
    assert "k" not in rechecks and rechecks.failures("k") == 0
    clock.now += 1000
    assert rechecks.due() == []


def test_gives_up_after_max_attempts_with_a_log_line(clock: Clock) -> None:
    rechecks: Rechecks[str] = Rechecks(clock, max_attempts=3)
    logs: list[dict[str, Any]]
    with capture_logs() as logs:
        assert rechecks.schedule("k", retry("down")) is not None
        assert rechecks.schedule("k", retry("down")) is not None
        assert rechecks.schedule("k", retry("down")) is None
    assert "k" not in rechecks and rechecks.failures("k") == 0
    exhausted = [e for e in logs if e["event"] == "retries_exhausted"]
    assert [(e["key"], e["attempts"], e["log_level"]) for e in exhausted] == [("k", 3, "error")]
    assert [e["delay_s"] for e in logs if e["event"] == "retry_scheduled"] == list(BACKOFF_S[:2])
