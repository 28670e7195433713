"""``watcher.runner.Runner``: ready first, pairs in flight, order per key, rechecks, shutdown.

The work offered here is plain functions (the runner never looks inside it); the comparator is
the real metrics one, except where a model's loading time matters: ``Loading`` stands in for a
model that is still loading (or cannot be loaded), which this machine has no GPU model for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from handler.compare.metrics import MetricsComparator
from handler.disposition import Disposition, done, retry
from handler.errors import ModelUnavailable
from handler.jobs import JobReport
from handler.pairs import PairSpec
from watcher.runner import ComparatorUnavailable, Runner
from watcher.shutdown import StopFlag

pytestmark = pytest.mark.timeout(30)


class Source:
    """Offers nothing itself; ``finished`` once the test says so (``--once``-like)."""

    def __init__(self, once: bool = True) -> None:
        self.once = once
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def pump(self) -> None:
        pass

    def finished(self) -> bool:
        return self.once

    def next_wait(self) -> float | None:
        return None

    def stop(self) -> None:
        self.stopped = True


class Loading(MetricsComparator):
    """A comparator whose model loads until ``loaded`` is set (or fails to load)."""

    def __init__(self, fails: bool = False) -> None:
        super().__init__()
        self.loaded = threading.Event()
        self.fails = fails

    def wait_ready(self) -> None:
        self.loaded.wait(20)
        if self.fails:
            raise ModelUnavailable("no such model: /models/missing")


class Tracker:
    """Work that records how many units run at once, overall and per key."""

    def __init__(self, seconds: float = 0.15) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.most = 0
        self.most_per_key = 0
        self.runs: list[str] = []

    def work(self, key: str, fate: Disposition | None = None) -> Callable[[float], Disposition]:
        def run(queued_ms: float) -> Disposition:
            with self.lock:
                self.active[key] = self.active.get(key, 0) + 1
                self.most = max(self.most, sum(self.active.values()))
                self.most_per_key = max(self.most_per_key, self.active[key])
                self.runs.append(key)
            time.sleep(self.seconds)
            with self.lock:
                self.active[key] -= 1
            return fate or done()

        return run


def run_in_thread(runner: Runner[Any], source: Source, stop: StopFlag) -> threading.Thread:
    thread = threading.Thread(target=runner.run, args=(stop, source), daemon=True)
    thread.start()
    return thread


def test_concurrency_pairs_in_flight_at_once() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=3, queue_size=100)
    tracker = Tracker()
    for index in range(9):
        assert runner.offer(f"k{index}", tracker.work(f"k{index}"))
    started = time.monotonic()
    runner.run(StopFlag(), Source())
    elapsed = time.monotonic() - started
    assert sorted(tracker.runs) == [f"k{i}" for i in range(9)]
    assert tracker.most == 3
    assert elapsed < 9 * tracker.seconds * 0.6  # three at a time, not one by one


def test_a_key_offered_while_in_flight_runs_again_after_never_alongside() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=4, queue_size=100)
    tracker = Tracker(0.3)
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    runner.offer("k", tracker.work("k"))
    deadline = time.monotonic() + 5
    while runner.in_flight() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(3):  # while it runs: coalesced into one more run, after it
        assert runner.offer("k", tracker.work("k"))
    deadline = time.monotonic() + 5
    while not (runner.idle() and len(tracker.runs) == 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.request()
    thread.join(5)
    assert tracker.runs == ["k", "k"] and tracker.most_per_key == 1


def test_stop_finishes_what_is_in_flight_and_takes_nothing_new() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=1, queue_size=100)
    tracker = Tracker(0.5)
    source = Source(once=False)
    for key in ("a", "b", "c"):
        runner.offer(key, tracker.work(key))
    stop = StopFlag()
    thread = run_in_thread(runner, source, stop)
    deadline = time.monotonic() + 5
    while runner.in_flight() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.request("SIGTERM")
    thread.join(5)
    assert not thread.is_alive()
    assert tracker.runs == ["a"] and tracker.active == {"a": 0}  # finished, not abandoned
    assert source.started and source.stopped
    assert len(runner.queue) == 2


def test_an_idle_runner_stops_within_a_fraction_of_a_second() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=2, queue_size=10)
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    time.sleep(0.3)
    asked = time.monotonic()
    stop.request("SIGTERM")
    thread.join(5)
    assert time.monotonic() - asked < 0.5


def test_no_work_is_taken_and_no_slot_offered_until_the_comparator_is_ready() -> None:
    comparator = Loading()
    runner: Runner[str] = Runner(comparator, concurrency=2, queue_size=10)
    tracker = Tracker(0.01)
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    runner.offer("early", tracker.work("early"))  # a local source may queue meanwhile
    time.sleep(0.5)
    assert tracker.runs == [] and runner.free_slots() == 0  # a queue consumer receives nothing
    comparator.loaded.set()
    deadline = time.monotonic() + 5
    while not (tracker.runs == ["early"] and runner.idle()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tracker.runs == ["early"]
    assert runner.free_slots() == 2
    stop.request()
    thread.join(5)


def test_a_comparator_that_can_never_be_ready_stops_the_runner() -> None:
    comparator = Loading(fails=True)
    comparator.loaded.set()
    runner: Runner[str] = Runner(comparator, concurrency=2, queue_size=10)
    tracker = Tracker(0.01)
    runner.offer("k", tracker.work("k"))
    with capture_logs() as logs, pytest.raises(ComparatorUnavailable, match="no such model"):
        runner.run(StopFlag(), Source(once=False))
    assert tracker.runs == []  # its pairs are not turned into error results
    unavailable = [e for e in logs if e["event"] == "comparator_unavailable"]
    assert [e["error_type"] for e in unavailable] == ["model_unavailable"]


def test_retry_is_looked_at_again_when_due_and_on_done_sees_each_fate() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=1, queue_size=10)
    fates: list[Disposition] = []
    calls: list[float] = []

    def work(queued_ms: float) -> Disposition:
        calls.append(time.time())
        return retry("partner", at=time.time() + 0.3) if len(calls) == 1 else done()

    runner.offer("lone", work, on_done=fates.append)
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    deadline = time.monotonic() + 5
    while len(fates) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.request()
    thread.join(5)
    assert [f.kind for f in fates] == ["retry", "done"]
    assert calls[1] - calls[0] >= 0.29
    assert "lone" not in runner.rechecks


def test_submit_gives_the_disposition_and_refuses_when_full() -> None:
    comparator = Loading()
    runner: Runner[str] = Runner(comparator, concurrency=1, queue_size=1)
    first = runner.submit("one", lambda queued_ms: done("compared"))
    assert first is not None
    assert runner.submit("two", lambda queued_ms: done()) is None  # concurrency + queue taken
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    comparator.loaded.set()
    assert first.result(5) == done("compared")
    stop.request()
    thread.join(5)


def test_a_failing_unit_of_work_costs_that_unit_only() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=1, queue_size=10)
    fates: list[Disposition] = []

    def broken(queued_ms: float) -> Disposition:
        raise RuntimeError("a bug")

    runner.offer("bad", broken, on_done=fates.append, recheck=False)
    runner.offer("good", lambda queued_ms: done(), on_done=fates.append)
    with capture_logs() as logs:
        runner.run(StopFlag(), Source())
    assert [f.kind for f in fates] == ["retry", "done"]
    assert any(e["event"] == "work_failed" and e["key"] == "bad" for e in logs)


def test_a_submitted_waiter_that_leaves_frees_its_place_and_its_work_never_runs() -> None:
    runner: Runner[str] = Runner(MetricsComparator(), concurrency=1, queue_size=1, wait_ready=False)
    tracker = Tracker(0.4)
    stop = StopFlag()
    thread = run_in_thread(runner, Source(once=False), stop)
    first = runner.submit("first", tracker.work("first"))
    assert first is not None
    while runner.in_flight() == 0:
        time.sleep(0.01)
    waiting = runner.submit("waiting", tracker.work("waiting"))
    assert waiting is not None and runner.load() == 2
    assert runner.submit("refused", tracker.work("refused")) is None  # the queue is full
    assert waiting.cancel()
    assert runner.load() == 1 and len(runner.queue) == 0  # its place is free at once
    admitted = runner.submit("admitted", tracker.work("admitted"))
    assert admitted is not None and admitted.result(5).is_done and first.result(5).is_done
    stop.request()
    thread.join(5)
    assert tracker.runs == ["first", "admitted"]


def test_jobs_get_the_runners_bookkeeping_and_a_crash_reaches_the_reporter() -> None:
    """``offer_job``: the reporter hears of each report, the manifest index learns what a
    manifest read; a job that raises is ``work_failed`` and the reporter's crash."""

    class Reporter:
        def __init__(self) -> None:
            self.reports: list[JobReport] = []
            self.crashes: list[Any] = []

        def add(self, report: JobReport) -> None:
            self.reports.append(report)

        def add_crash(self, key: Any) -> None:
            self.crashes.append(key)

    runner: Runner[PairSpec] = Runner(MetricsComparator(), concurrency=1, queue_size=10)
    runner.reporter = reporter = Reporter()
    manifest = PairSpec("manifest", "jobs/m.pair.json")
    report = JobReport(manifest, "written", done(), None, ("imgs/a.jpg", "imgs/b.jpg"))

    def written(*, now: float, queued_ms: float) -> JobReport:
        return report

    def broken(*, now: float, queued_ms: float) -> JobReport:
        raise RuntimeError("a bug")

    runner.offer_job(manifest, written, "folder")
    runner.offer_job(PairSpec("folder", "p1"), broken, "folder")
    with capture_logs() as logs:
        runner.run(StopFlag(), Source())
    assert reporter.reports == [report] and reporter.crashes == [PairSpec("folder", "p1")]
    assert runner.manifests.readers("imgs/a.jpg") == [manifest]
    assert any(e["event"] == "work_failed" for e in logs)
