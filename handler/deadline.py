"""One pair's time limit (``processing_timeout``), from the moment a worker takes the pair.

A ``Deadline`` is made by whoever takes a pair (a runner worker, ``serve`` once a compare slot
is free; the Lambda's batch thread and other direct callers get one when the job starts) and
handed down through the job into ``compare_pair``, the detection, the comparator and the result
write. The runner hands it to the unit of work it runs as the thread's current deadline
(``applied``), so that sources, which know only their transport, need not carry it.

It is the one object of the job that knows the clock (the job itself never sleeps): the stages
declare themselves (``enter(stage)``) and ask it (``check()``) between units of work (a strip
of pixels, a metric, a chunk of a download), and it raises ``ComparisonTimeout``
naming the stage the pair was in, so a timed-out pair stops within about a second and its
result says where (``result.error.stage``).

Three kinds of work cannot ask between units, and are bounded here too:

* libvips computations that write an image (a large input shrunk to its prepared size) are
  killed from libvips' own eval callback once the deadline has passed (``handler.vips``);
* the VL model runs in another process or on a server: it gets the deadline as a
  ``time.monotonic()`` instant (``expires_at_monotonic``), which every process of the machine
  shares, and stops or is killed there;
* object-store requests: while a job runs its deadline is the thread's *current* one
  (``applied``), and the S3 client bounds each request's read timeout by what is left
  (``handler.aws_clients``) without every storage method carrying it.

A pair nobody waits for any more (``serve``: its client hung up) is stopped by the same
mechanism, at the same places: ``abandon(error)`` makes the next ``check`` (a stage boundary,
a strip, a metric) raise that error instead of letting the pair run on.

The processing_timeout of a deployment is a ceiling: a manifest or an upload may ask for less
time for its pair (``capped``), never for more, so a slot is never held longer than the
deployment promises (``/readyz`` relies on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from handler.errors import ComparisonTimeout, PairError

#: The stages of a pair, in order (the same names as ``timings_ms`` and the stage metric).
STAGES = ("fetch", "prepare", "detect", "compare", "write")

_CURRENT: ContextVar[Deadline | None] = ContextVar("pairwatch_deadline", default=None)


class Deadline:
    """``seconds`` from when it was made (``clock``: ``time.monotonic`` unless a test moves
    one by hand). ``stage`` is the stage the pair is in, as the stages declare it."""

    def __init__(
        self,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
    ) -> None:
        if seconds <= 0:
            raise ValueError("a deadline needs a positive number of seconds")
        self.seconds = seconds
        self.clock = clock
        self.started = clock() if started is None else started
        self.stage = STAGES[0]
        self._stage_started = self.started
        # Shared with the deadlines made from this one for the same pair (``capped``,
        # ``extended``): abandoning the pair stops it whichever of them it holds.
        self._abandoned: list[PairError] = []

    @property
    def expires_at(self) -> float:
        """The instant on ``clock`` past which the pair has timed out."""
        return self.started + self.seconds

    def remaining(self) -> float:
        """Seconds left (0 once expired)."""
        return max(0.0, self.expires_at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.expires_at

    def expires_at_monotonic(self) -> float:
        """The same instant on ``time.monotonic()``, which other processes of the machine (the
        VL worker) read too: what a stage hands to work that runs elsewhere."""
        return time.monotonic() + self.remaining()

    def enter(self, stage: str) -> None:
        """The pair moves on to ``stage``; raises ``ComparisonTimeout`` if time is up."""
        if stage != self.stage:
            self.stage = stage
            self._stage_started = self.clock()
        self.check()

    def check(self) -> None:
        """Raise ``ComparisonTimeout`` (naming the current stage) once time is up, or the
        error the pair was abandoned with."""
        if self._abandoned:
            raise self._abandoned[0]
        if self.expired():
            raise self.timeout()

    def abandon(self, error: PairError) -> None:
        """Nobody waits for the pair any more: its next ``check`` raises ``error`` (any thread
        may call this; the pair's own thread stops at its next unit of work)."""
        if not self._abandoned:
            self._abandoned.append(error)

    def timeout(self, why: str = "") -> ComparisonTimeout:
        """The error of a pair stopped by this deadline in its current stage."""
        reason = f": {why}" if why else ""
        return ComparisonTimeout(
            f"the pair did not finish within processing_timeout ({self.seconds:g} s); "
            f"stopped during {self.stage}{reason}",
            details={"stage": self.stage},
        )

    def stage_ms(self) -> float:
        """Milliseconds spent in the current stage so far (a timed-out result's timings)."""
        return round((self.clock() - self._stage_started) * 1000, 2)

    def capped(self, seconds: float) -> Deadline:
        """The same start, at most ``seconds`` long (a pair that asks for less time)."""
        if seconds >= self.seconds:
            return self
        capped = Deadline(seconds, clock=self.clock, started=self.started)
        capped.stage, capped._stage_started = self.stage, self._stage_started
        capped._abandoned = self._abandoned
        return capped

    def renewed(self) -> Deadline:
        """As long, starting now: the next pair of one unit of work (an event touching a folder
        pair and the manifests beside it) gets its own time, as one pair per unit would."""
        return Deadline(self.seconds, clock=self.clock)

    def extended(self, seconds: float) -> Deadline:
        """At least ``seconds`` from now: a result is still written when the comparison used
        the time up (its write gets this grace), and the write itself stays bounded."""
        if self.remaining() >= seconds:
            return self
        grace = Deadline(seconds, clock=self.clock)
        grace.stage, grace._stage_started = self.stage, self.clock()
        grace._abandoned = self._abandoned
        return grace

    @contextmanager
    def applied(self) -> Iterator[Deadline]:
        """Make this the thread's current deadline for the block (see ``current``)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def current() -> Deadline | None:
    """The deadline of the pair this thread is working on (``Deadline.applied``), if any."""
    return _CURRENT.get()


def current_or_new(seconds: float) -> Deadline:
    """The deadline the taker of this unit of work started (the runner applies one to every
    unit it runs), else one of ``seconds`` from now (a direct call: a test, a benchmark)."""
    return _CURRENT.get() or Deadline(seconds)
