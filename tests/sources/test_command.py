"""``watcher.sources.command.watch``: the one shape of every source command's run.

The comparator is the real metrics one, built by ``runner_for`` from the settings; where a
model that can never load matters, a comparator that fails to load stands in for it (this
machine has no such model to miss), as in ``tests/test_runner.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

import handler.compare
from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.errors import ModelUnavailable
from handler.logs import get_logger
from tests.support.logs import captured_logs
from tests.support.sources import Offered
from watcher.runner import Runner
from watcher.shutdown import StopFlag
from watcher.sources.command import CannotWatch, watch

pytestmark = pytest.mark.timeout(30)


class Closing(MetricsComparator):
    """The metrics comparator, noting when it is closed (and, with ``fails``, never ready)."""

    def __init__(self, closed: list[bool], fails: bool = False) -> None:
        super().__init__()
        self.closed = closed
        self.fails = fails

    def wait_ready(self) -> None:
        if self.fails:
            raise ModelUnavailable("no such model: /models/missing")

    def close(self) -> None:
        self.closed.append(True)
        super().close()


def test_a_watch_runs_the_source_and_logs_its_start_and_stop() -> None:
    with captured_logs() as logs:
        watched = watch(
            Settings(comparator="metrics", concurrency=2),
            Offered,
            log=get_logger(source_kind="test"),
            started=lambda runner: {"source": "test", "concurrency": runner.concurrency},
            stopped=lambda source: {"calls": len(source.calls)},
        )
    assert watched is not None
    assert watched.source.calls == ["start", "stop"]
    assert not watched.stop.requested  # it finished; no signal stopped it
    [started] = [e for e in logs if e["event"] == "watch_started"]
    [stopped] = [e for e in logs if e["event"] == "watch_stopped"]
    assert (started["source"], started["concurrency"]) == ("test", 2)
    assert stopped["calls"] == 2


def test_without_a_log_the_source_logs_for_itself() -> None:
    with captured_logs() as logs:
        watched = watch(Settings(comparator="metrics"), Offered)
    assert watched is not None
    assert not [e for e in logs if e["event"] in ("watch_started", "watch_stopped")]


@pytest.mark.parametrize("fails", ["comparator", "loop"])
def test_a_comparator_that_never_loads_or_a_loop_that_cannot_watch_is_none_and_closed(
    fails: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[bool] = []
    monkeypatch.setattr(
        handler.compare,
        "create_comparator",
        lambda settings: Closing(closed, fails=fails == "comparator"),
    )

    def loop(runner: Runner[Any], source: Offered, stop: StopFlag) -> None:
        if fails == "loop":
            raise CannotWatch
        runner.run(stop, source)

    with captured_logs() as logs:
        watched = watch(Settings(comparator="metrics"), Offered, log=get_logger(), loop=loop)
    assert watched is None
    assert closed == [True]
    assert [e["event"] for e in logs if e["event"].startswith("watch_")] == ["watch_started"]
