"""``watcher.jobqueue.CoalescingQueue``: FIFO, bounded, one entry per key."""

from __future__ import annotations

from watcher.jobqueue import CoalescingQueue


def test_fifo_and_coalescing_keeps_the_place_and_takes_the_newest_value() -> None:
    queue: CoalescingQueue[str, int] = CoalescingQueue(10)
    assert queue.put("a", 1) and queue.put("b", 2) and queue.put("a", 3)
    assert len(queue) == 2 and "a" in queue and queue.get("a") == 3
    first, second = queue.pop(), queue.pop()
    assert first is not None and first[:2] == ("a", 3) and first[2] >= 0
    assert second is not None and second[:2] == ("b", 2)
    assert queue.pop() is None


def test_bounded_unless_forced() -> None:
    queue: CoalescingQueue[str, None] = CoalescingQueue(2)
    assert queue.put("a", None) and queue.put("b", None)
    assert not queue.put("c", None)
    assert queue.put("a", None)  # already waiting: coalesced, not refused
    assert queue.put("c", None, force=True) and len(queue) == 3
