"""Admission control for ``pairwatch serve``: ``concurrency`` pairs compare at once,
``queue_size`` more wait, and anything beyond is refused at once (429 with ``Retry-After``).

A request takes its place *before* its body is read. Of the admitted requests, at most
``2 x concurrency`` hold a body in memory (``Ticket.read_body``) — the ones comparing and as
many reading their upload meanwhile, so the next pair is in memory when a slot frees up — which
bounds upload memory by ``4 x concurrency x max_input_bytes`` whatever the number of clients.
The others wait with their bodies unread in the socket. Leaving a block (answered, failed, the
client gone: ``watcher.serve.connection`` cancels the waits of a client that left) frees what it
held.

This is serve's own small component because the HTTP layer needs a non-blocking "is there
room?" answer; the pair jobs themselves stay the runner's and the pipeline's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from watcher import prometheus

#: Weight of the newest compare time in the running mean ``Retry-After`` is estimated from.
_SMOOTHING = 0.2
#: Bodies in memory per compare slot: one comparing, one read ahead.
_BODIES_PER_SLOT = 2


class Busy(Exception):
    """Every slot and queue place is taken; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy: retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """An admitted request: ``read_body()`` waits until it may read its body (a request whose
    body is read already skips it), then ``compare()`` waits for a slot."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._body = False

    async def read_body(self) -> None:
        """Wait for permission to hold a body in memory, until the admitted block ends."""
        await self._admission._bodies.acquire()
        self._body = True

    @asynccontextmanager
    async def compare(self) -> AsyncIterator[None]:
        admission = self._admission
        await admission._slots.acquire()
        prometheus.QUEUE_DEPTH.dec()
        started = admission.clock()
        admission._holding[id(self)] = started
        try:
            with prometheus.in_flight():
                yield
        finally:
            del admission._holding[id(self)]
            admission._slots.release()
            prometheus.QUEUE_DEPTH.inc()
            admission.record_hold(admission.clock() - started)


class Admission:
    """``concurrency`` compare slots and ``queue_size`` waiting places; beyond that ``Busy``.

    Lives on one event loop (no locks: every method runs between two awaits). The
    ``pairwatch_queue_depth`` gauge counts admitted requests that are not comparing yet,
    ``pairwatch_in_flight`` the ones comparing.
    """

    def __init__(
        self, concurrency: int, queue_size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if concurrency < 1 or queue_size < 0:
            raise ValueError("concurrency must be >= 1 and queue_size >= 0")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.clock = clock
        self.admitted = 0
        #: When each held compare slot was taken (by ticket).
        self._holding: dict[int, float] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._bodies = asyncio.Semaphore(concurrency * _BODIES_PER_SLOT)
        self._mean_hold = 1.0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """Admit one request for the block; raises ``Busy`` at once when there is no room."""
        if self.admitted >= self.concurrency + self.queue_size:
            raise Busy(self.retry_after())
        self.admitted += 1
        prometheus.QUEUE_DEPTH.inc()
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if ticket._body:
                self._bodies.release()
            self.admitted -= 1
            prometheus.QUEUE_DEPTH.dec()

    def stalled_s(self) -> float:
        """Seconds since a compare slot last changed hands while every slot is held (0 while
        one is free): how long the server has made no progress at all."""
        if len(self._holding) < self.concurrency:
            return 0.0
        return self.clock() - max(self._holding.values())

    def record_hold(self, seconds: float) -> None:
        self._mean_hold += _SMOOTHING * (seconds - self._mean_hold)

    def retry_after(self) -> int:
        """Whole seconds until a place is likely free: the requests ahead, drained
        ``concurrency`` at a time at the mean compare time (at least 1)."""
        rounds = (self.admitted + 1) / self.concurrency
        return max(1, math.ceil(rounds * self._mean_hold))
