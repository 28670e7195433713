"""The process's memory budget for decoding, counted in megapixels (``decode_budget_mp``).

Decoding and native-resolution detection hold memory in proportion to the pixels in hand (the
strips in flight, libvips' rows, the shrunk copies, Pillow's whole decodes of BMP and HEIC). A
lock around them kept a 100 MP pair's peak flat but made 1 MP pairs wait in line on idle
cores; a budget lets small pairs decode side by side while a large one runs alone.

Each pair takes its inputs' megapixels before it decodes and gives them back once its
prepared images exist. A request larger than the whole budget is granted the whole budget: it
waits until nothing else holds any, then runs alone (never forever). Grants are first come,
first served: a large pair waiting for the budget to drain is not overtaken by small ones that
arrive after it, so it cannot starve.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from handler.config import DEFAULT_DECODE_BUDGET_MP
from handler.errors import ComparisonTimeout

__all__ = ["DEFAULT_DECODE_BUDGET_MP", "DecodeBudget", "process_budget"]


class DecodeBudget:
    """A counting semaphore in megapixels, first come first served; thread-safe."""

    def __init__(self, megapixels: float) -> None:
        if megapixels <= 0:
            raise ValueError("a decode budget must be positive")
        self.total = float(megapixels)
        self._used = 0.0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @property
    def in_use(self) -> float:
        with self._cond:
            return self._used

    @property
    def waiting(self) -> int:
        """Requests queued for room."""
        with self._cond:
            return len(self._queue)

    def acquire(self, megapixels: float, timeout: float | None = None) -> float | None:
        """Take ``megapixels`` (at most the whole budget); the amount taken, to be given back
        with ``release``, or None when ``timeout`` seconds passed first (nothing taken)."""
        wanted = min(max(megapixels, 0.0), self.total)
        ticket = object()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._used + wanted > self.total:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(left)
                self._used += wanted
                return wanted
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now (or the head gave up waiting).
                self._cond.notify_all()

    def release(self, granted: float) -> None:
        with self._cond:
            self._used = max(0.0, self._used - granted)
            self._cond.notify_all()

    @contextmanager
    def held(self, megapixels: float, *, timeout: float | None = None) -> Iterator[float]:
        """``acquire`` for the block; ``ComparisonTimeout`` when not granted within ``timeout``."""
        granted = self.acquire(megapixels, timeout)
        if granted is None:
            raise ComparisonTimeout(
                f"no room to decode {megapixels:.1f} megapixels within {timeout:g} s "
                f"(decode_budget_mp {self.total:g}, busy with other pairs)"
            )
        try:
            yield granted
        finally:
            self.release(granted)


@cache
def process_budget(megapixels: float) -> DecodeBudget:
    """The process's budget of ``megapixels`` (one per distinct setting, shared by every pair)."""
    return DecodeBudget(megapixels)
