"""Admission for ``pairwatch serve``: a place before the body is read, 429 when there is none.

The pairs themselves are the process's one ``Runner``'s (``watcher.runner``): its
``concurrency`` workers compare, its queue holds the pairs waiting. What HTTP adds is the time
*before* a pair exists: a request takes its place when it arrives, before its body is read, so
that a full server answers 429 with ``Retry-After`` at once instead of reading uploads it cannot
take. A place counts against the same ``concurrency + queue_size`` as the runner's own work
(``Runner.load``), so uploads and webhook events share one bound.

Of the admitted requests, at most ``2 x concurrency`` hold a body in memory
(``Ticket.read_body``) — the ones comparing and as many reading their upload meanwhile, so the
next pair is in memory when a worker frees up — which bounds upload memory by
``4 x concurrency x max_input_bytes`` whatever the number of clients. The others wait with their
bodies unread in the socket. Leaving the admitted block (answered, failed, the client gone:
``watcher.serve.connection`` cancels the waits of a client that left) frees what it held.

``pairwatch_queue_depth`` counts admitted requests not yet handed to the runner (the runner
counts its own queue); ``pairwatch_in_flight`` is the runner's.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

import anyio

from handler.disposition import Disposition
from watcher import prometheus
from watcher.runner import Runner, Work

#: Bodies in memory per worker: one comparing, one read ahead.
_BODIES_PER_SLOT = 2


class Busy(Exception):
    """Every worker and queue place is taken; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy: retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """An admitted request: ``read_body()`` waits until it may read its body (a request whose
    body is read already skips it), then ``submit()`` hands its pair to the runner."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._body = False
        self._pending = True

    async def read_body(self) -> None:
        """Wait for permission to hold a body in memory, until the admitted block ends."""
        await self._admission._bodies.acquire()
        self._body = True

    def submit(self, key: Hashable, work: Work) -> Future[Disposition]:
        """The runner's future for ``work`` (its place was counted when it was admitted)."""
        self._leave_pending()
        future = self._admission.runner.submit(key, work, admitted=True)
        assert future is not None  # an admitted submit is always queued
        return future

    def _leave_pending(self) -> None:
        if self._pending:
            self._pending = False
            self._admission.pending -= 1
            prometheus.QUEUE_DEPTH.dec()


class Admission:
    """Places for requests before their pair reaches ``runner``; beyond them ``Busy``.

    Lives on one event loop (``pending`` and the body semaphore are touched between awaits
    only).
    """

    def __init__(self, runner: Runner[Any], queue_size: int) -> None:
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.runner = runner
        self.capacity = runner.concurrency + queue_size
        #: Admitted requests whose pair is not the runner's yet (reading or waiting to read).
        self.pending = 0
        self._bodies = anyio.Semaphore(runner.concurrency * _BODIES_PER_SLOT)

    @property
    def admitted(self) -> int:
        """Places taken: requests still reading, and the runner's work (queued or running)."""
        return self.pending + self.runner.load()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """Admit one request for the block; raises ``Busy`` at once when there is no room."""
        if self.admitted >= self.capacity:
            raise Busy(self.retry_after())
        self.pending += 1
        prometheus.QUEUE_DEPTH.inc()
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if ticket._body:
                self._bodies.release()
            ticket._leave_pending()

    def retry_after(self) -> int:
        """Whole seconds until a place is likely free: the work ahead, drained
        ``concurrency`` at a time at the runner's mean run time (at least 1)."""
        rounds = (self.admitted + 1) / self.runner.concurrency
        return max(1, math.ceil(rounds * self.runner.mean_run_s))
