"""``handler.disposition``: combining a delivery's records, and the one back-off policy."""

from __future__ import annotations

import pytest

from handler.disposition import (
    BACKOFF_S,
    SQS_MAX_VISIBILITY_S,
    backoff,
    combine,
    done,
    reject,
    retry,
    retry_delay,
)
from handler.events import QueueMessage
from handler.logs import get_logger
from tests.support.logs import captured_logs


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


def test_visibility_rounds_up_and_stops_at_sqs_twelve_hours() -> None:
    assert retry("partner", at=1000.2).visibility_s(now=1000.0, receive_count=1) == 1
    assert retry("partner", at=1030.0).visibility_s(now=1000.0, receive_count=1) == 30
    assert retry("partner", at=1e9).visibility_s(now=0.0, receive_count=1) == SQS_MAX_VISIBILITY_S
    # No receive count (a direct test message) backs off as a first failure.
    assert retry("throttled").visibility_s(now=0.0, receive_count=None) == BACKOFF_S[0]
    assert retry("throttled").visibility_s(now=0.0, receive_count=3) == BACKOFF_S[2]


def test_a_message_left_for_retry_is_logged_once_with_its_seconds() -> None:
    message = QueueMessage("m-1", "{}", receive_count=2)
    with captured_logs() as logs:
        seconds = message.left_for_retry(retry("lone image", at=100.5), 40.0, get_logger())
    assert seconds == 61
    [entry] = [e for e in logs if e["event"] == "message_left_for_retry"]
    assert (entry["message_id"], entry["receive_count"], entry["retry_after_s"]) == ("m-1", 2, 61)
    assert entry["reason"] == "lone image"
