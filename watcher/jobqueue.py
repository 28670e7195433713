"""The pending-pair queue: FIFO, bounded, and a pair is in it at most once.

A burst of events for one pair (two images, their temp files, a replace) coalesces into one
entry. When the queue is full ``put`` refuses; the watcher then rescans the folder once the
queue has drained, which is cheaper and safer than buffering without limit (jobs are
idempotent, so a rescan loses nothing).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class CoalescingQueue(Generic[K]):
    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self._items: OrderedDict[K, float] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: K) -> bool:
        """Queue ``key`` unless it is already waiting. False only when the queue is full."""
        with self._lock:
            if key in self._items:
                return True
            if len(self._items) >= self.maxsize:
                return False
            self._items[key] = time.monotonic()
            return True

    def pop(self) -> tuple[K, float] | None:
        """The oldest key and how long it waited (seconds), or None when empty."""
        with self._lock:
            if not self._items:
                return None
            key, queued_at = self._items.popitem(last=False)
        return key, time.monotonic() - queued_at

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
