"""handler.budget.DecodeBudget: megapixels shared by threads, first come first served, a request
larger than the whole budget runs alone, a wait can time out. Real threads; events order them."""

from __future__ import annotations

import threading
import time

import pytest

from handler.budget import DecodeBudget, process_budget
from handler.config import load_settings
from handler.errors import ComparisonTimeout


def _taker(budget: DecodeBudget, megapixels: float, log: list[str], name: str) -> threading.Thread:
    def take() -> None:
        granted = budget.acquire(megapixels)
        assert granted is not None
        log.append(f"{name} in")

    thread = threading.Thread(target=take)
    thread.start()
    return thread


def _waiting(budget: DecodeBudget, count: int) -> None:
    """Until ``count`` requests are queued (none granted)."""
    deadline = time.monotonic() + 10
    while budget.waiting < count:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.005)


def test_small_requests_share_and_a_large_one_waits_for_room() -> None:
    budget = DecodeBudget(10)
    assert budget.acquire(4) == 4 and budget.acquire(4) == 4  # side by side
    assert budget.in_use == 8
    log: list[str] = []
    large = _taker(budget, 6, log, "large")
    _waiting(budget, 1)
    assert log == []
    budget.release(4)
    large.join(5)
    assert log == ["large in"] and budget.in_use == 10


def test_a_request_larger_than_the_budget_runs_alone_and_never_deadlocks() -> None:
    budget = DecodeBudget(6)
    assert budget.acquire(1) == 1
    log: list[str] = []
    huge = _taker(budget, 200, log, "huge")
    _waiting(budget, 1)
    assert log == []  # not beside anything
    budget.release(1)
    huge.join(5)
    assert log == ["huge in"] and budget.in_use == 6  # granted the whole budget
    budget.release(6)
    assert budget.in_use == 0


def test_first_come_first_served_a_large_request_is_not_overtaken() -> None:
    """A small request arriving after a waiting large one queues behind it, although it would
    fit: otherwise a stream of small pairs could keep a large one waiting for ever."""
    budget = DecodeBudget(10)
    assert budget.acquire(3) == 3
    log: list[str] = []
    large = _taker(budget, 9, log, "large")
    _waiting(budget, 1)
    # 3 + 2 fits, yet it waits; once the large one is in, 9 + 2 does not (a 1 would, and
    # would race the assertion below).
    small = _taker(budget, 2, log, "small")
    _waiting(budget, 2)
    assert log == []
    budget.release(3)
    large.join(5)
    assert log == ["large in"]
    budget.release(9)
    small.join(5)
    assert log == ["large in", "small in"]


def test_a_wait_times_out_without_taking_anything() -> None:
    budget = DecodeBudget(4)
    assert budget.acquire(4) == 4
    started = time.monotonic()
    assert budget.acquire(1, timeout=0.1) is None
    assert 0.09 <= time.monotonic() - started < 2
    assert budget.in_use == 4 and budget.waiting == 0
    with pytest.raises(ComparisonTimeout, match="decode_budget_mp 4"), budget.held(2, timeout=0.05):
        pass
    budget.release(4)
    with budget.held(2, timeout=0.05) as granted:
        assert granted == 2 and budget.in_use == 2
    assert budget.in_use == 0


def test_a_request_that_gave_up_lets_the_next_one_in() -> None:
    """The head of the queue times out: the request behind it, which fits, is granted."""
    budget = DecodeBudget(10)
    assert budget.acquire(8) == 8
    gave_up = threading.Event()

    def large() -> None:
        assert budget.acquire(5, timeout=0.2) is None
        gave_up.set()

    thread = threading.Thread(target=large)
    thread.start()
    _waiting(budget, 1)
    log: list[str] = []
    small = _taker(budget, 2, log, "small")
    small.join(5)
    thread.join(5)
    assert gave_up.is_set() and log == ["small in"] and budget.in_use == 10


def test_the_setting_and_the_process_budget() -> None:
    settings = load_settings(decode_budget_mp=32)
    assert settings.decode_budget_mp == 32
    assert process_budget(32) is process_budget(32) and process_budget(32).total == 32
    assert load_settings().decode_budget_mp == 24
    with pytest.raises(ValueError, match="decode_budget_mp"):
        load_settings(decode_budget_mp=0)
    with pytest.raises(ValueError):
        DecodeBudget(0)
