"""The one runner every source feeds: comparator lifetime, in-flight limit, order, shutdown.

A source only says "this key may have changed" (``offer``) with the work to do for it and,
where its transport has one, a callback that acts on the work's ``Disposition`` (delete a
message, change its visibility). The runner decides everything about time and concurrency:

* **Ready first.** The comparator is built by the caller and ``wait_ready()`` runs on a thread
  of its own; no work is taken (and ``free_slots`` is 0, so a queue consumer receives nothing)
  until it returns. A comparator that can never be ready (``ModelUnavailable``) stops the runner
  with a ``comparator_unavailable`` error log: its pairs are not turned into error results.
* **Pairs in flight.** ``concurrency`` worker threads take keys from one coalescing queue
  (``watcher.jobqueue``, bounded by ``queue_size``). A key is never run twice at once: one
  offered while in flight runs again once the running one is finished, with the newest work.
* **Deadlines.** The moment a worker takes a unit of work starts its pair's deadline
  (``handler.deadline``, ``processing_timeout``): the work runs with it as its thread's current
  deadline, which the job picks up, so time spent waiting in the queue never counts and time
  spent on the pair always does.
* **Rechecks.** A ``retry`` of work offered with ``recheck=True`` is looked at again as the one
  policy says (``watcher.rechecks``); done and reject forget the key. A caller that learned of
  a retry itself (serve's webhook) hands it over with ``recheck_later``.
* **Callers that wait** (``pairwatch serve``'s uploads and webhook deliveries) ``submit`` and get
  a ``Future``; cancelling it while the work waits frees its queue place at once and the work
  never starts. ``load()`` and ``stalled_s()`` tell serve's admission and ``/readyz`` how full
  and how stuck the runner is.
* **After each job** (``offer_job``), once for every source: the manifest index learns what a
  manifest read, the metrics count the pair, and the source's ``reporter`` (a command's
  summary) hears of it; a bug in a job (``work_failed``) is the reporter's ``add_crash``.
* **Metrics.** ``pairwatch_queue_depth`` follows the keys waiting to run (queued, or offered
  again while in flight) and ``pairwatch_in_flight`` the units of work running, as they change.
* **Shutdown.** Once ``stop`` is set nothing new is taken; what is in flight finishes (bounded by
  its own timeouts), then ``run`` returns. The main loop never blocks for more than
  ``STOP_POLL_S``: sources make their blocking calls (a long poll, a listing) on threads of
  their own, so an idle runner exits within a fraction of a second of SIGTERM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from handler import disposition
from handler.compare.base import Comparator
from handler.config import ComparisonConfig, Settings
from handler.deadline import Deadline
from handler.disposition import Disposition
from handler.errors import PairError
from handler.jobs import JobReport
from handler.logs import get_logger
from handler.manifests import ManifestIndex
from watcher import prometheus
from watcher.jobqueue import CoalescingQueue
from watcher.rechecks import Rechecks
from watcher.shutdown import StopFlag

K = TypeVar("K", bound=Hashable)

#: The longest the main loop sleeps without looking at the stop flag (see watcher.shutdown).
STOP_POLL_S = 0.2
#: Weight of the newest run time in ``Runner.mean_run_s``.
_SMOOTHING = 0.2

#: The work for one key: called with how long it waited in the queue (ms).
Work = Callable[[float], Disposition]
#: A source's callback acting on the disposition (ack, retry, reject on its transport).
OnDone = Callable[[Disposition], None]


class Job(Protocol):
    """A pair job (``handler.jobs.run_pair_job`` with the source's arguments): the runner gives
    it the time and how long it waited."""

    def __call__(self, *, now: float, queued_ms: float) -> JobReport: ...


class Reporter(Protocol):
    """Who hears of every job of a runner (a command's summary, its progress bar), from the
    workers' threads."""

    def add(self, report: JobReport) -> None: ...

    def add_crash(self, key: Any) -> None: ...


class Source(Protocol):
    """A transport, as the runner drives it from its main loop; blocking calls (a long poll, a
    listing, a stream) belong on the source's own threads, which ``offer`` and ``wake``."""

    def start(self) -> None:
        """Begin noticing changes (threads, observers); called once the workers run."""
        ...

    def pump(self) -> None:
        """Offer what arrived since the last call; never blocks for long."""
        ...

    def finished(self) -> bool:
        """True when a one-shot run has offered everything (``--once``)."""
        ...

    def next_wait(self) -> float | None:
        """How soon (seconds) ``pump`` has something to do, None if only on ``wake``."""
        ...

    def stop(self) -> None:
        """Stop noticing; called after what was in flight has finished."""
        ...


class Submitted:
    """The source of a process whose work is all ``submit``-ted or offered by others
    (``pairwatch serve``'s requests, from the event loop): nothing to pump; the runner's loop
    runs its rechecks until it is stopped, or, with ``once``, until it is idle."""

    def __init__(self, once: bool = False) -> None:
        self.once = once

    def start(self) -> None:
        pass

    def pump(self) -> None:
        pass

    def finished(self) -> bool:
        return self.once

    def next_wait(self) -> float | None:
        return None

    def stop(self) -> None:
        pass


class ComparatorUnavailable(Exception):
    """The comparator can never take pairs (its model could not be loaded)."""


@dataclass
class _Entry:
    work: Work
    on_done: OnDone | None = None
    recheck: bool = True
    futures: list[Future[Disposition]] = field(default_factory=list)

    def merge(self, newer: _Entry) -> _Entry:
        """``newer`` replaces this entry; whoever waits on either learns the one outcome."""
        newer.futures = self.futures + newer.futures
        return newer

    def unwanted(self) -> bool:
        """Every waiter left (cancelled its future) and nothing else, a callback or a
        recheck, wants the work: it need not run."""
        return (
            bool(self.futures)
            and all(future.cancelled() for future in self.futures)
            and self.on_done is None
            and not self.recheck
        )


@contextmanager
def runner_for(
    settings: Settings, *, comparator: Comparator | None = None, wait_ready: bool = True
) -> Iterator[Runner[Any]]:
    """A runner with ``comparator``, else the configured one (built now: a VL model starts
    loading, and it is closed when the block ends), and ``concurrency``."""
    from handler.compare import create_comparator, resolve_concurrency

    chosen = comparator or create_comparator(settings)
    try:
        yield Runner(
            chosen,
            concurrency=resolve_concurrency(settings),
            queue_size=settings.queue_size,
            processing_timeout=settings.comparison.processing_timeout,
            wait_ready=wait_ready,
        )
    finally:
        if comparator is None:
            chosen.close()


class Runner(Generic[K]):
    """One per process: every source of the process feeds it keys (see the module's docstring).

    ``K`` is the source's key: a ``PairSpec`` (folder), an object key (poll), ``(bucket, key)``
    (MinIO), a message id (SQS).
    """

    def __init__(
        self,
        comparator: Comparator,
        *,
        concurrency: int,
        queue_size: int,
        processing_timeout: float = ComparisonConfig().processing_timeout,
        clock: Callable[[], float] = time.time,
        wait_ready: bool = True,
    ) -> None:
        """``wait_ready=False`` takes work at once: ``pairwatch serve`` answers each pair
        (``model_unavailable`` while a model loads) and says why on ``/readyz`` instead."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.comparator = comparator
        self.concurrency = concurrency
        self.processing_timeout = processing_timeout
        self.clock = clock
        self.queue: CoalescingQueue[K, _Entry] = CoalescingQueue(queue_size)
        self.rechecks: Rechecks[K] = Rechecks(clock)
        self.manifests = ManifestIndex()
        #: Set once by the source whose command keeps a summary (``watch DIR``).
        self.reporter: Reporter | None = None
        self.ready = threading.Event()
        self._wait_for_comparator = wait_ready
        if not wait_ready:
            self.ready.set()
        self.unavailable: PairError | None = None
        self._recheck_work: dict[K, _Entry] = {}
        #: Keys in flight and when their worker took them (``clock``): ``stalled_s``.
        self._in_flight: dict[K, float] = {}
        self._next: dict[K, _Entry] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._taking = True
        self._closed = False
        #: Running mean of how long a unit of work takes (``Retry-After`` in serve).
        self.mean_run_s = 1.0
        #: This runner's share of the ``pairwatch_queue_depth`` gauge.
        self._depth = 0
        self._threads: list[threading.Thread] = []
        self._log = get_logger()

    # -- what sources call (any thread) ------------------------------------------------------

    def offer(
        self, key: K, work: Work, *, on_done: OnDone | None = None, recheck: bool = True
    ) -> bool:
        """Run ``work`` for ``key`` soon. Coalesces with a waiting entry of the same key; one in
        flight runs again after. False (nothing queued) only when the queue is full."""
        return self._offer(key, _Entry(work, on_done, recheck))

    def submit(self, key: K, work: Work, *, admitted: bool = False) -> Future[Disposition] | None:
        """``offer`` for a caller that waits for the outcome (``pairwatch serve``): the future
        gets the disposition; None when the queue is full (refuse it). Cancelling the future
        while the work waits takes it out of the queue (its place is free at once); once a
        worker took it, it runs on (the caller stops it through its deadline). ``admitted``:
        the caller already counted it against ``load()`` (serve's admission), so it is queued
        even while the workers have not yet taken what is ahead of it."""
        future: Future[Disposition] = Future()
        if not self._offer(key, _Entry(work, None, False, [future]), force=admitted):
            return None
        future.add_done_callback(lambda done: self._withdraw(key) if done.cancelled() else None)
        return future

    def offer_job(self, key: K, job: Job, source: str) -> bool:
        """``offer`` for a pair job; the runner does its after-job bookkeeping (``record``,
        counted under ``source`` in the metrics)."""
        return self.offer(key, partial(self._run_job, job, source))

    def record(self, reports: Iterable[JobReport], source: str) -> None:
        """The after-job bookkeeping, one step for every source: the manifest index learns what
        each manifest read, the metrics count each compared pair, the reporter hears of it."""
        for report in reports:
            self.manifests.learn(report)
            prometheus.record_report(report, source)
            if self.reporter is not None:
                self.reporter.add(report)

    def _run_job(self, job: Job, source: str, queued_ms: float) -> Disposition:
        report = job(now=self.clock(), queued_ms=queued_ms)
        self.record([report], source)
        return report.disposition

    def recheck_later(self, key: K, work: Work, fate: Disposition) -> None:
        """Look at ``key`` again as the one policy says for ``fate`` (a retry some caller got
        outside the runner's own queue: serve's webhook), with ``work``."""
        self._schedule(key, _Entry(work), fate)

    def forget(self, key: K) -> None:
        """No recheck of ``key`` is needed any more (it was done or rejected elsewhere)."""
        self.rechecks.clear(key)
        with self._cond:
            self._recheck_work.pop(key, None)

    def load(self) -> int:
        """Units of work queued or in flight (what ``concurrency + queue_size`` bounds)."""
        with self._cond:
            return len(self._in_flight) + len(self.queue) + len(self._next)

    def stalled_s(self) -> float:
        """Seconds since a worker last took work while every worker is busy (0 while one is
        free): how long the runner has made no progress at all (serve's ``/readyz``)."""
        with self._cond:
            if len(self._in_flight) < self.concurrency:
                return 0.0
            return self.clock() - max(self._in_flight.values())

    def free_slots(self) -> int:
        """How many more units of work would start at once: 0 until the comparator is ready,
        so a queue consumer receives only what it can start."""
        if not self.ready.is_set() or not self._taking:
            return 0
        with self._cond:
            return max(0, self.concurrency - len(self._in_flight) - len(self.queue))

    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        with self._cond:
            return not self._in_flight and not len(self.queue) and not self._next

    def in_flight(self) -> int:
        with self._cond:
            return len(self._in_flight)

    def wake(self) -> None:
        """Make the main loop look at its sources now (their threads call it)."""
        self._wake.set()

    # -- the loop (main thread) -------------------------------------------------------------

    def run(self, stop: StopFlag, source: Source) -> None:
        """Run until ``stop`` (then finish what is in flight) or until ``source.finished()``
        holds with nothing queued or in flight. Raises ``ComparatorUnavailable`` (after
        finishing what is in flight) when the comparator can never be ready."""
        self._start()
        try:
            source.start()
            while not stop.requested:
                self._wake.clear()
                if self.unavailable is not None:
                    raise ComparatorUnavailable(self.unavailable.message)
                source.pump()
                self._recheck_due()
                if source.finished() and self.idle():
                    break
                self._wake.wait(self._idle_wait(source.next_wait()))
        finally:
            self._drain(stop)
            source.stop()

    def _start(self) -> None:
        if self._wait_for_comparator:
            threading.Thread(target=self._wait_ready, name="comparator-ready", daemon=True).start()
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._work_loop, name=f"pair-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _wait_ready(self) -> None:
        try:
            self.comparator.wait_ready()
        except PairError as exc:
            self._log.error("comparator_unavailable", error_type=exc.type, error=exc.message)
            self.unavailable = exc
            self.wake()
            return
        self.ready.set()
        with self._cond:
            self._cond.notify_all()
        self.wake()

    def _idle_wait(self, source_wait: float | None) -> float:
        waits = [STOP_POLL_S]
        for wait in (source_wait, self.rechecks.next_due()):
            if wait is not None:
                waits.append(wait)
        return max(0.005, min(waits))

    def _recheck_due(self) -> None:
        for key in self.rechecks.due():
            with self._cond:
                entry = self._recheck_work.pop(key, None)
            if entry is None:
                continue
            if not self._offer(key, entry):
                # Queue full: keep the recheck, a moment later, without counting a failure.
                self._schedule(key, entry, disposition.retry("queue full", self.clock() + 1.0))

    def _drain(self, stop: StopFlag) -> None:
        """Take nothing new; wait for what is in flight (a second signal kills the process)."""
        with self._cond:
            self._taking = False
            self._cond.notify_all()
        if stop.requested and self.in_flight():
            self._log.info("finishing_in_flight", pairs=self.in_flight())
        with self._cond:
            while self._in_flight:
                self._cond.wait(STOP_POLL_S)
            self._closed = True
            self._track_depth()  # what is left is never run: nothing waits any more
            self._cond.notify_all()
        # Idle workers are parked in a wait: let them see ``_closed`` and end, so that ``run``
        # returning means no thread of this runner is left (tests and embedders check that).
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    # -- workers ----------------------------------------------------------------------------

    def _offer(self, key: K, entry: _Entry, *, force: bool = False) -> bool:
        with self._cond:
            if key in self._in_flight:
                waiting = self._next.get(key)
                self._next[key] = waiting.merge(entry) if waiting else entry
                self._track_depth()
                return True
            queued = self.queue.get(key)
            if queued is not None:
                entry = queued.merge(entry)
            if not self.queue.put(key, entry, force=force):
                return False
            self._track_depth()
            self._cond.notify()
        return True

    def _withdraw(self, key: K) -> None:
        """A waiter cancelled its future: a queued entry nobody waits for any more leaves."""
        with self._cond:
            queued = self.queue.get(key)
            if queued is not None and queued.unwanted():
                self.queue.remove(key)
                self._track_depth()
                self._cond.notify_all()

    def _track_depth(self) -> None:
        """Move ``pairwatch_queue_depth`` by the change in this runner's waiting keys (called
        with ``_cond`` held; a closed runner has none)."""
        depth = 0 if self._closed else len(self.queue) + len(self._next)
        if depth != self._depth:
            prometheus.QUEUE_DEPTH.inc(depth - self._depth)
            self._depth = depth

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                item = None
                while item is None:
                    if self._closed:
                        return
                    if self._taking and self.ready.is_set():
                        item = self.queue.pop()
                    if item is None:
                        self._cond.wait(STOP_POLL_S)
                key, entry, waited = item
                self._in_flight[key] = self.clock()
                self._track_depth()
            if not _claim(entry):
                self._finish(key, entry, disposition.done("nobody waits for it"))
                continue
            deadline = Deadline(self.processing_timeout)  # taken now: the pair's time starts
            started = time.monotonic()
            with prometheus.in_flight():
                fate = self._run(key, entry, waited, deadline)
            self.mean_run_s += _SMOOTHING * (time.monotonic() - started - self.mean_run_s)
            self._finish(key, entry, fate)

    def _run(self, key: K, entry: _Entry, waited: float, deadline: Deadline) -> Disposition:
        try:
            with deadline.applied():
                return entry.work(round(waited * 1000, 2))
        except Exception as exc:
            # A bug (or an OS failure nobody foresaw) must cost this unit of work, not the runner.
            self._log.exception(
                "work_failed", key=str(key), error_type="internal_error", error=str(exc)
            )
            if self.reporter is not None:
                self.reporter.add_crash(key)
            return disposition.retry(f"internal error: {exc}")

    def _finish(self, key: K, entry: _Entry, fate: Disposition) -> None:
        if entry.on_done is not None:
            try:
                entry.on_done(fate)
            except Exception as exc:
                self._log.exception("settle_failed", key=str(key), error=str(exc))
        if entry.recheck:
            if fate.is_retry:
                self._schedule(key, entry, fate)
            else:
                self.rechecks.clear(key)
                with self._cond:
                    self._recheck_work.pop(key, None)
        with self._cond:
            self._in_flight.pop(key, None)
            following = self._next.pop(key, None)
            if following is not None:
                # Accepted while this one ran: it may exceed the bound by the few in flight.
                self.queue.put(key, following, force=True)
            self._track_depth()
            self._cond.notify_all()
        # Last: a waiter that hears of the outcome finds the work's place free already.
        for future in entry.futures:
            if not future.done():  # a waiter that left before the work started
                future.set_result(fate)
        self.wake()

    def _schedule(self, key: K, entry: _Entry, fate: Disposition) -> None:
        if self.rechecks.schedule(key, fate) is not None:
            with self._cond:
                self._recheck_work[key] = entry


def _claim(entry: _Entry) -> bool:
    """Mark the entry's futures running; False when every waiter left (and nothing else, a
    callback or a recheck, wants the work), so it is not run."""
    for future in entry.futures:
        future.set_running_or_notify_cancel()  # (False for a cancelled one: unwanted sees it)
    return not entry.unwanted()
