"""``handler.disposition``: combining a delivery's records, and the one back-off policy."""

from __future__ import annotations

import pytest

from handler.disposition import (
    BACKOFF_S,
    backoff,
    combine,
    done,
    reject,
    retry,
    retry_delay,
)


def test_combine_any_retry_wins_at_the_earliest_time() -> None:
    fate = combine([done(), retry("partner", at=200.0), reject("bad key"), retry("other", 100.0)])
    assert (fate.kind, fate.at) == ("retry", 100.0)
    assert "partner" in fate.reason and "other" in fate.reason


def test_combine_a_backoff_retry_is_sooner_than_any_fixed_time() -> None:
    fate = combine([retry("partner", at=200.0), retry("throttled")])
    assert (fate.kind, fate.at) == ("retry", None)


def test_combine_reject_beats_done_and_empty_is_done() -> None:
    assert combine([done("a"), reject("hostile key")]).kind == "reject"
    assert combine([done("a"), done("b")]) == done("a; b")
    assert combine([]).kind == "done"


def test_backoff_grows_then_repeats_its_last_step() -> None:
    assert [backoff(n) for n in range(1, len(BACKOFF_S) + 3)] == [
        *BACKOFF_S,
        BACKOFF_S[-1],
        BACKOFF_S[-1],
    ]
    assert tuple(sorted(BACKOFF_S)) == BACKOFF_S


def test_retry_delay_uses_the_due_time_when_there_is_one() -> None:
    assert retry_delay(retry("partner", at=1030.0), now=1000.0, failures=5) == pytest.approx(30)
    assert retry_delay(retry("partner", at=900.0), now=1000.0, failures=1) == 0.0
    assert retry_delay(retry("throttled"), now=1000.0, failures=2) == BACKOFF_S[1]
