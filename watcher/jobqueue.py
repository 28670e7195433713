"""The pending-work queue: FIFO, bounded, and a key is in it at most once.

A burst of events for one pair (two images, their temp files, a replace) coalesces into one
entry; the newest value offered for a key replaces the one waiting. When the queue is full
``put`` refuses; the caller then drops the event and looks again later (the folder source
rescans once the queue has drained), which is cheaper and safer than buffering without limit
(jobs are idempotent, so a rescan loses nothing).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CoalescingQueue(Generic[K, V]):
    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: K, value: V, *, force: bool = False) -> bool:
        """Queue ``key`` (a waiting one keeps its place and takes the new ``value``).

        False only when the queue is full; ``force`` queues anyway (work accepted earlier).
        """
        with self._lock:
            if key in self._items:
                self._items[key] = (value, self._items[key][1])
                return True
            if len(self._items) >= self.maxsize and not force:
                return False
            self._items[key] = (value, time.monotonic())
            return True

    def pop(self) -> tuple[K, V, float] | None:
        """The oldest key, its value and how long it waited (seconds), or None when empty."""
        with self._lock:
            if not self._items:
                return None
            key, (value, queued_at) = self._items.popitem(last=False)
        return key, value, time.monotonic() - queued_at

    def remove(self, key: K) -> bool:
        """Take ``key`` out of the queue (its waiter went away); False if it was not waiting."""
        with self._lock:
            return self._items.pop(key, None) is not None

    def get(self, key: K) -> V | None:
        """The value waiting for ``key``, left in the queue."""
        with self._lock:
            found = self._items.get(key)
        return found[0] if found is not None else None

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
