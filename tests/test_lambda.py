"""``handler.app.lambda_handler`` on real SQS messages from moto's S3 -> SQS notifications.

The S3 bucket, its suffix-filtered notification, the queue and its dead-letter queue are real
(moto in server mode on 127.0.0.1). What stands in for AWS Lambda itself, which is outside the
project: turning received messages into the Lambda SQS event (the documented record shape),
deleting the messages not named in ``batchItemFailures`` (what the event source mapping does
with ``ReportBatchItemFailures``), and a context object with ``get_remaining_time_in_millis``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import handler.app as app
from tests.support import scenes
from tests.support.s3_servers import (
    aws_env,
    client,
    moto_server,
    notified_bucket,
    queue_depth,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)
FIXTURES = Path(__file__).parent / "fixtures" / "events"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def lambda_env(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The function's configuration, as its environment variables; a fresh cold start."""
    for name, value in aws_env(endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PAIRWATCH_COMPARATOR", "metrics")
    monkeypatch.setenv("PAIRWATCH_LOG_FORMAT", "json")
    monkeypatch.setattr(app, "_runtime", None)
    yield
    structlog.reset_defaults()  # the cold start configured logging for the whole process


@pytest.fixture(scope="module")
def jpegs() -> tuple[bytes, bytes]:
    photo = scenes.photo("chelsea").resize((150, 100))
    return scenes.encode(photo), scenes.encode(photo, quality=70)


class Context:
    """Lambda's context object: only what the handler reads."""

    def __init__(self, remaining_ms: list[int]) -> None:
        self.aws_request_id = "test-request"
        self._remaining = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self._remaining.pop(0) if len(self._remaining) > 1 else self._remaining[0]


def receive_all(
    sqs: Any, queue_url: str, expected: int, visibility: int = 3
) -> list[dict[str, Any]]:
    """Receive until ``expected`` messages are in hand (S3 notifies asynchronously).

    They stay invisible for ``visibility`` seconds (3: enough to collect and handle them before
    SQS hands them out again); one not deleted by then is redelivered (the DLQ counts those).
    """
    messages: list[dict[str, Any]] = []

    def more() -> bool:
        response = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=visibility,
            MessageSystemAttributeNames=["All"],
        )
        messages.extend(response.get("Messages", []))
        return len(messages) >= expected

    wait_for(more, 20, 0, f"{expected} messages")
    return messages


def as_lambda_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }


def run_batch(
    sqs: Any, queue_url: str, messages: list[dict[str, Any]], context: Context
) -> list[str]:
    """Invoke the handler like the event source mapping does; returns the failed ids."""
    response = app.lambda_handler(as_lambda_event(messages, queue_arn(sqs, queue_url)), context)
    failed = [item["itemIdentifier"] for item in response["batchItemFailures"]]
    for message in messages:
        if message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return failed


def queue_arn(sqs: Any, queue_url: str) -> str:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    return str(attributes["Attributes"]["QueueArn"])


def key_of(message: dict[str, Any]) -> str | None:
    records = json.loads(message["Body"]).get("Records") or [{}]
    key = records[0].get("s3", {}).get("object", {}).get("key")
    return str(key) if key else None


def get_json(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[no-any-return]


def test_sqs_batch_results_partial_failures_and_dead_letter_queue(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes]
) -> None:
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint)
    a, b = jpegs
    pairs = ["in/pair one", "in/plus+sign ü"]
    for folder in pairs:
        s3.put_object(Bucket=setup.bucket, Key=f"{folder}/a.jpg", Body=a)
        s3.put_object(Bucket=setup.bucket, Key=f"{folder}/b.jpg", Body=b)
    # A poison pair: its keys carry a control character, refused on every delivery.
    s3.put_object(Bucket=setup.bucket, Key="in/bad\x07pair/a.jpg", Body=a)
    s3.put_object(Bucket=setup.bucket, Key="in/notes.txt", Body=b"not notified (suffix filter)")
    messages = receive_all(sqs, setup.queue_url, 1 + 4 + 1)  # TestEvent, 4 images, poison

    failed = run_batch(sqs, setup.queue_url, messages, Context([900_000]))
    assert [key_of(m) for m in messages if m["MessageId"] in failed] == ["in%2Fbad%07pair%2Fa.jpg"]
    for folder in pairs:
        result = get_json(s3, setup.bucket, f"{folder}/result.json")
        assert result["status"] == "ok" and result["is_similar"] is True
        assert [i["name"] for i in result["inputs"]] == ["a.jpg", "b.jpg"]
        assert all(i["etag"] for i in result["inputs"])
        head = s3.head_object(Bucket=setup.bucket, Key=f"{folder}/diff.png")
        assert head["ContentType"] == "image/png"

    # Redeliveries of the poison message fail again; then SQS moves it to the DLQ.
    redelivered = receive_all(sqs, setup.queue_url, 1, visibility=1)
    assert run_batch(sqs, setup.queue_url, redelivered, Context([900_000])) == [
        redelivered[0]["MessageId"]
    ]
    # Past maxReceiveCount (2), the next receive finds it moved to the DLQ instead.
    assert sqs.receive_message(QueueUrl=setup.queue_url, WaitTimeSeconds=2).get("Messages") is None
    assert queue_depth(sqs, setup.queue_url) == 0
    assert queue_depth(sqs, setup.dlq_url) == 1
    dead = sqs.receive_message(QueueUrl=setup.dlq_url)["Messages"]
    assert key_of(dead[0]) == "in%2Fbad%07pair%2Fa.jpg"


def test_stops_taking_pairs_when_time_runs_low(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes]
) -> None:
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint, suffixes=(".jpg",))
    a, b = jpegs
    s3.put_object(Bucket=setup.bucket, Key="one/a.jpg", Body=a)
    s3.put_object(Bucket=setup.bucket, Key="one/b.jpg", Body=b)
    s3.put_object(Bucket=setup.bucket, Key="two/a.jpg", Body=a)
    s3.put_object(Bucket=setup.bucket, Key="two/b.jpg", Body=b)
    messages = receive_all(sqs, setup.queue_url, 5)
    messages = [m for m in messages if key_of(m)]  # the TestEvent aside
    # 60 s left for the first two messages, then 5 s (< the 30 s default reserve).
    failed = run_batch(sqs, setup.queue_url, messages, Context([60_000, 60_000, 5_000]))
    assert failed == [m["MessageId"] for m in messages[2:]]
    # The two handled messages' pairs are complete (both images were there): each has its
    # result before any handed-back message is redelivered.
    done = [key_of(m) for m in messages[:2]]
    for folder in {k.split("%2F")[0] for k in done if k}:
        assert get_json(s3, setup.bucket, f"{folder}/result.json")["status"] == "ok"
    # The handed-back messages are redelivered and complete the job.
    again = receive_all(sqs, setup.queue_url, 2)
    assert run_batch(sqs, setup.queue_url, again, Context([900_000])) == []
    for folder in ("one", "two"):
        assert get_json(s3, setup.bucket, f"{folder}/result.json")["status"] == "ok"


def test_direct_s3_invocation_and_malformed_event(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes]
) -> None:
    """S3 -> Lambda without a queue: Lambda's own retries apply, so failures raise."""
    s3 = client("s3", endpoint)
    setup = notified_bucket(endpoint)
    a, b = jpegs
    s3.put_object(Bucket=setup.bucket, Key="d/a.jpg", Body=a)
    s3.put_object(Bucket=setup.bucket, Key="d/b.jpg", Body=b)
    event = json.loads((FIXTURES / "aws_s3_notification.json").read_text())
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = setup.bucket
    record["s3"]["object"]["key"] = "d%2Fb.jpg"
    assert app.lambda_handler(event, Context([900_000])) == {"events": 1}
    assert get_json(s3, setup.bucket, "d/result.json")["status"] == "ok"
    with pytest.raises(RuntimeError, match="failed"):
        app.lambda_handler({"Records": [{"eventSource": "aws:s3"}]}, Context([900_000]))
    # Test events are acknowledged, not errors.
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": setup.bucket}
    assert app.lambda_handler(test_event, Context([900_000])) == {"events": 0}


def test_input_prefix_confines_keys_and_manifests(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PAIRWATCH_INPUT_PREFIX, keys elsewhere are not pairs and manifests cannot escape."""
    monkeypatch.setenv("PAIRWATCH_INPUT_PREFIX", "incoming")
    s3 = client("s3", endpoint)
    setup = notified_bucket(endpoint)
    a, b = jpegs
    s3.put_object(Bucket=setup.bucket, Key="private/a.jpg", Body=a)
    s3.put_object(Bucket=setup.bucket, Key="private/b.jpg", Body=b)
    s3.put_object(Bucket=setup.bucket, Key="incoming/b.jpg", Body=b)
    manifest = json.dumps({"a": "../private/a.jpg", "b": "b.jpg"}).encode()
    s3.put_object(Bucket=setup.bucket, Key="incoming/escape.pair.json", Body=manifest)
    event = json.loads((FIXTURES / "aws_s3_notification.json").read_text())
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = setup.bucket

    record["s3"]["object"]["key"] = "private%2Fb.jpg"
    app.lambda_handler(event, Context([900_000]))
    assert "Contents" not in s3.list_objects_v2(Bucket=setup.bucket, Prefix="private/result")

    record["s3"]["object"]["key"] = "incoming%2Fescape.pair.json"
    app.lambda_handler(event, Context([900_000]))
    result = get_json(s3, setup.bucket, "incoming/escape.result.json")
    assert result["status"] == "error"
    assert (result["error"]["type"], result["error"]["input"]) == ("path_outside_root", "a")


def test_a_lone_image_message_comes_back_when_its_partner_is_due(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handed back with its visibility set to the partner's due time (the queue's own timeout
    is 1 s); redelivered then, it gets its incomplete_pair result and is done."""
    monkeypatch.setenv("PAIRWATCH_PAIR_TIMEOUT", "5")
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint, suffixes=(".jpg",), max_receives=3)
    s3.put_object(Bucket=setup.bucket, Key="lone/a.jpg", Body=jpegs[0])
    messages = receive_all(sqs, setup.queue_url, 2)  # the TestEvent and the image's
    lone = [m["MessageId"] for m in messages if key_of(m)]
    assert run_batch(sqs, setup.queue_url, messages, Context([900_000])) == lone
    hidden = sqs.receive_message(QueueUrl=setup.queue_url, WaitTimeSeconds=2)
    assert "Messages" not in hidden  # not back after the queue's 1 s
    again = receive_all(sqs, setup.queue_url, 1, visibility=5)
    assert run_batch(sqs, setup.queue_url, again, Context([900_000])) == []
    result = get_json(s3, setup.bucket, "lone/result.json")
    assert result["error"]["type"] == "incomplete_pair"


def test_a_failure_of_the_moment_keeps_the_message_with_a_back_off(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 8: the result cannot be stored (the output bucket is refused): the message is not
    done, and it stays hidden for the back-off's first step (5 s), not the queue's 1 s."""
    monkeypatch.setenv("PAIRWATCH_OUTPUT_BUCKET", "Not_A_Valid_Bucket")
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint, suffixes=(".jpg",))
    s3.put_object(Bucket=setup.bucket, Key="p/a.jpg", Body=jpegs[0])
    s3.put_object(Bucket=setup.bucket, Key="p/b.jpg", Body=jpegs[1])
    messages = receive_all(sqs, setup.queue_url, 3)  # the TestEvent and both images'
    failed = run_batch(sqs, setup.queue_url, messages, Context([900_000]))
    assert sorted(failed) == sorted(m["MessageId"] for m in messages if key_of(m))
    assert "Messages" not in sqs.receive_message(QueueUrl=setup.queue_url, WaitTimeSeconds=3)
    back = receive_all(sqs, setup.queue_url, 2)
    assert sorted(m["MessageId"] for m in back) == sorted(failed)
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in back} == {"2"}


def test_allowed_buckets_refuses_other_buckets_events(
    endpoint: str, lambda_env: None, jpegs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SQS message naming another bucket is handed back (its queue's dead-letter policy ends
    it); a direct invocation raises (Lambda's own retries and on-failure destination)."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint, suffixes=(".jpg",))
    monkeypatch.setenv("PAIRWATCH_ALLOWED_BUCKETS", "not-" + setup.bucket)
    s3.put_object(Bucket=setup.bucket, Key="p/a.jpg", Body=jpegs[0])
    s3.put_object(Bucket=setup.bucket, Key="p/b.jpg", Body=jpegs[1])
    messages = [m for m in receive_all(sqs, setup.queue_url, 3) if key_of(m)]
    failed = run_batch(sqs, setup.queue_url, messages, Context([900_000]))
    assert sorted(failed) == sorted(m["MessageId"] for m in messages)
    assert "Contents" not in s3.list_objects_v2(Bucket=setup.bucket, Prefix="p/result")
    event = json.loads((FIXTURES / "aws_s3_notification.json").read_text())
    event["Records"][0]["s3"]["bucket"]["name"] = setup.bucket
    event["Records"][0]["s3"]["object"]["key"] = "p%2Fb.jpg"
    with pytest.raises(RuntimeError, match="allowed_buckets"):
        app.lambda_handler(event, Context([900_000]))
