""" "Look again later", keyed, with one policy (``handler.disposition``'s back-off).

One component for every source: a lone image is looked at again when its partner is due
(``retry`` with ``at``), a failure of the moment after the back-off (5 s, 30 s, 120 s, then
every 300 s), until ``MAX_ATTEMPTS`` failures in a row, when it is dropped with a
``retries_exhausted`` error log (a restart, rescan or new event starts afresh). A key has at
most one pending recheck: scheduling it again replaces the earlier one. The clock is injectable
(Unix seconds), so the policy is tested without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from handler.disposition import MAX_ATTEMPTS, Disposition, retry_delay
from handler.logs import get_logger

K = TypeVar("K", bound=Hashable)


class Rechecks(Generic[K]):
    def __init__(
        self, clock: Callable[[], float] = time.time, max_attempts: int = MAX_ATTEMPTS
    ) -> None:
        self.clock = clock
        self.max_attempts = max_attempts
        self._due: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._log = get_logger()

    def schedule(self, key: K, fate: Disposition) -> float | None:
        """Look at ``key`` again as ``fate`` (a retry) asks; the Unix time it is due, or None
        when its failures are exhausted (logged) and it is dropped."""
        with self._lock:
            failures = self._failures.get(key, 0)
            if fate.at is None:
                failures += 1
                if failures >= self.max_attempts:
                    self._forget(key)
                    self._log.error(
                        "retries_exhausted", key=str(key), attempts=failures, reason=fate.reason
                    )
                    return None
                self._failures[key] = failures
            now = self.clock()
            due = now + retry_delay(fate, now, failures)
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            if len(self._heap) > 2 * len(self._due) + 64:
                self._compact()
        if fate.at is None:
            self._log.info(
                "retry_scheduled",
                key=str(key),
                attempts=failures,
                delay_s=round(due - now, 3),
                reason=fate.reason,
            )
        return due

    def clear(self, key: K) -> None:
        """``key`` is done (or rejected): forget its recheck and its failures."""
        with self._lock:
            self._forget(key)

    def due(self) -> list[K]:
        """Keys whose recheck is due now, earliest first (their failure counts are kept)."""
        now = self.clock()
        out: list[K] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                at, _, key = heapq.heappop(self._heap)
                if self._due.get(key) == at:
                    del self._due[key]
                    out.append(key)
        return out

    def next_due(self) -> float | None:
        """Seconds until the earliest recheck (0 when one is due), None when there is none."""
        with self._lock:
            while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)
            if not self._heap:
                return None
            return max(0.0, self._heap[0][0] - self.clock())

    def failures(self, key: K) -> int:
        with self._lock:
            return self._failures.get(key, 0)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._due

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

    def _forget(self, key: K) -> None:
        self._due.pop(key, None)
        self._failures.pop(key, None)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._due.get(entry[2]) == entry[0]]
        heapq.heapify(self._heap)
