"""Admission control for ``pairwatch serve``: ``concurrency`` pairs at once, ``queue_size`` waiting.

A request takes a place *before* its upload is read, so the bodies in memory are bounded by
``concurrency`` x 2 x ``max_input_bytes`` whatever the number of clients; one that finds every
place taken is refused at once (429 with ``Retry-After``) instead of piling up. Leaving the block
(answered, failed, or the client gone) frees the place.

This is serve's own small component because the HTTP layer needs a non-blocking "is there
room?" answer; the pair jobs themselves stay the runner's and the pipeline's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from watcher import metrics

#: Weight of the newest hold time in the running mean that ``Retry-After`` is estimated from.
_SMOOTHING = 0.2


class Busy(Exception):
    """Every slot and queue place is taken; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy: retry in {retry_after} s")
        self.retry_after = retry_after


class Admission:
    """At most ``concurrency`` holders at once and ``queue_size`` waiters; beyond that ``Busy``.

    Lives on the event loop (no locks: every method runs between two awaits).
    """

    def __init__(self, concurrency: int, queue_size: int) -> None:
        if concurrency < 1 or queue_size < 0:
            raise ValueError("concurrency must be >= 1 and queue_size >= 0")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.in_flight = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._mean_hold = 1.0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; raises ``Busy`` at once when there is no room."""
        if self.in_flight + self.waiting >= self.concurrency + self.queue_size:
            raise Busy(self.retry_after())
        if self._slots is None:  # created on the running loop, not at import or app build
            self._slots = asyncio.Semaphore(self.concurrency)
        self.waiting += 1
        metrics.QUEUE_DEPTH.inc()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            metrics.QUEUE_DEPTH.dec()
        self.in_flight += 1
        started = time.monotonic()
        try:
            with metrics.in_flight():
                yield
        finally:
            self.in_flight -= 1
            self._slots.release()
            held = time.monotonic() - started
            self._mean_hold += _SMOOTHING * (held - self._mean_hold)

    def retry_after(self) -> int:
        """Whole seconds until a place is likely free: the queue ahead, drained at the mean
        hold time per slot (at least 1)."""
        rounds = (self.waiting + 1) / self.concurrency
        return max(1, math.ceil(rounds * self._mean_hold))
