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
  policy says (``watcher.rechecks``); done and reject forget the key.
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
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from handler import disposition
from handler.compare.base import Comparator
from handler.config import ComparisonConfig, Settings
from handler.deadline import Deadline
from handler.disposition import Disposition
from handler.errors import PairError
from handler.logs import get_logger
from handler.manifests import ManifestIndex
from watcher import prometheus
from watcher.jobqueue import CoalescingQueue
from watcher.rechecks import Rechecks
from watcher.shutdown import StopFlag

K = TypeVar("K", bound=Hashable)

#: The longest the main loop sleeps without looking at the stop flag (see watcher.shutdown).
STOP_POLL_S = 0.2

#: The work for one key: called with how long it waited in the queue (ms).
Work = Callable[[float], Disposition]
#: A source's callback acting on the disposition (ack, retry, reject on its transport).
OnDone = Callable[[Disposition], None]


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


@contextmanager
def runner_for(settings: Settings) -> Iterator[Runner[Any]]:
    """A runner with the configured comparator (built now: a VL model starts loading) and
    ``concurrency``; the comparator is closed when the block ends."""
    from handler.compare import create_comparator, resolve_concurrency

    comparator = create_comparator(settings)
    try:
        yield Runner(
            comparator,
            concurrency=resolve_concurrency(settings),
            queue_size=settings.queue_size,
            processing_timeout=settings.comparison.processing_timeout,
        )
    finally:
        comparator.close()


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
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.comparator = comparator
        self.concurrency = concurrency
        self.processing_timeout = processing_timeout
        self.clock = clock
        self.queue: CoalescingQueue[K, _Entry] = CoalescingQueue(queue_size)
        self.rechecks: Rechecks[K] = Rechecks(clock)
        self.manifests = ManifestIndex()
        self.ready = threading.Event()
        self.unavailable: PairError | None = None
        self._recheck_work: dict[K, _Entry] = {}
        self._in_flight: set[K] = set()
        self._next: dict[K, _Entry] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._taking = True
        self._closed = False
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

    def submit(self, key: K, work: Work) -> Future[Disposition] | None:
        """``offer`` for a caller that waits for the outcome (``pairwatch serve``): the future
        gets the disposition; None when ``concurrency + queue_size`` are taken (refuse it)."""
        future: Future[Disposition] = Future()
        if not self._offer(key, _Entry(work, None, False, [future])):
            return None
        return future

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

    def _offer(self, key: K, entry: _Entry) -> bool:
        with self._cond:
            if key in self._in_flight:
                waiting = self._next.get(key)
                self._next[key] = waiting.merge(entry) if waiting else entry
                self._track_depth()
                return True
            queued = self.queue.get(key)
            if queued is not None:
                entry = queued.merge(entry)
            if not self.queue.put(key, entry):
                return False
            self._track_depth()
            self._cond.notify()
        return True

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
                self._in_flight.add(key)
                self._track_depth()
            deadline = Deadline(self.processing_timeout)  # taken now: the pair's time starts
            with prometheus.in_flight():
                fate = self._run(key, entry, waited, deadline)
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
            return disposition.retry(f"internal error: {exc}")

    def _finish(self, key: K, entry: _Entry, fate: Disposition) -> None:
        if entry.on_done is not None:
            try:
                entry.on_done(fate)
            except Exception as exc:
                self._log.exception("settle_failed", key=str(key), error=str(exc))
        for future in entry.futures:
            future.set_result(fate)
        if entry.recheck:
            if fate.is_retry:
                self._schedule(key, entry, fate)
            else:
                self.rechecks.clear(key)
                with self._cond:
                    self._recheck_work.pop(key, None)
        with self._cond:
            self._in_flight.discard(key)
            following = self._next.pop(key, None)
            if following is not None:
                # Accepted while this one ran: it may exceed the bound by the few in flight.
                self.queue.put(key, following, force=True)
            self._track_depth()
            self._cond.notify_all()
        self.wake()

    def _schedule(self, key: K, entry: _Entry, fate: Disposition) -> None:
        if self.rechecks.schedule(key, fate) is not None:
            with self._cond:
                self._recheck_work[key] = entry
