"""``handler.events`` on recorded payloads of every source (tests/fixtures/events/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handler.events import (
    ObjectEvent,
    is_sqs_event,
    lambda_sqs_messages,
    parse_body,
    parse_notification,
    sqs_messages,
)

FIXTURES = Path(__file__).parent / "fixtures" / "events"
#: The key moto, AWS and MinIO were (or would be) sent in the recorded uploads.
UPLOADED_KEY = "pairs/my pair+1/ä b.jpg"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def only_event(doc: Any, **kw: Any) -> ObjectEvent:
    parsed = parse_notification(doc, **kw)
    assert not parsed.errors, parsed.errors
    assert len(parsed.events) == 1, parsed.events
    return parsed.events[0]


def test_aws_notification_keys_are_form_decoded() -> None:
    """``+`` is a space, ``%2B`` a plus, ``%2F`` a slash (AWS documents ``unquote_plus``)."""
    event = only_event(load("aws_s3_notification.json"))
    assert event == ObjectEvent(
        bucket="photos",
        key="pairs/summer 2026/a+b (1).jpg",
        kind="created",
        size=1048576,
        etag="d41d8cd98f00b204e9800998ecf8427e-2",
        source="aws:s3",
        name="ObjectCreated:CompleteMultipartUpload",
    )


def test_sam_generated_event_with_percent_twenty() -> None:
    event = only_event(load("sam_s3_put.json"))
    assert (event.bucket, event.key, event.size) == ("example-bucket", "test/my pair/key.png", 1024)


def test_moto_sqs_messages_test_event_put_and_delete() -> None:
    """moto's real S3->SQS messages: the TestEvent yields nothing, the delete is ``removed``."""
    messages = sqs_messages(load("moto_sqs_s3_direct.json"))
    parsed = [m.parse() for m in messages]
    assert all(not p.errors for p in parsed)
    assert parsed[0].events == []  # s3:TestEvent
    created, removed = parsed[1].events[0], parsed[2].events[0]
    assert (created.kind, created.key, created.size) == ("created", UPLOADED_KEY, 3)
    assert created.etag == "900150983cd24fb0d6963f7d28e17f72"
    assert (removed.kind, removed.key) == ("removed", UPLOADED_KEY)
    assert messages[1].receipt_handle and messages[1].message_id


def test_sns_envelope_in_sqs() -> None:
    messages = sqs_messages(load("moto_sqs_sns_s3.json"))
    assert messages[0].parse().events == []  # the TestEvent, wrapped in SNS
    assert only_event(json.loads(messages[1].body)).key == UPLOADED_KEY


def test_sns_records_of_a_lambda_invocation() -> None:
    event = only_event(load("sns_lambda_s3.json"))
    assert (event.bucket, event.key) == ("photos", UPLOADED_KEY)


def test_eventbridge_keys_are_raw() -> None:
    """EventBridge sends the key as is: ``+`` stays a plus."""
    event = only_event(load("aws_eventbridge_object_created.json"))
    assert event.key == "pairs/summer 2026/a+b (1).jpg"
    assert (event.source, event.kind, event.etag) == (
        "aws.s3",
        "created",
        "b1946ac92492d2347c6235b4d2611184",
    )


def test_eventbridge_via_sqs_from_moto() -> None:
    kinds = [only_event(json.loads(m["Body"])) for m in load("moto_sqs_eventbridge.json")]
    assert [(e.kind, e.key) for e in kinds] == [
        ("created", UPLOADED_KEY),
        ("other", UPLOADED_KEY),  # Object Tags Added
        ("removed", UPLOADED_KEY),
    ]


def test_minio_target_payload_with_wrapper() -> None:
    """MinIO's webhook/AMQP/NATS payload: wrapper, ``minio:s3``, empty region, extra fields."""
    doc = load("minio_webhook_put.json")
    event = only_event(doc)
    assert (event.bucket, event.key, event.source) == ("photos", UPLOADED_KEY, "minio:s3")
    assert event.name == "s3:ObjectCreated:Put" and event.kind == "created"
    assert doc["Key"] == f"photos/{UPLOADED_KEY}"  # the wrapper's own key is the raw one
    deleted = only_event(load("minio_webhook_delete.json"))
    assert (deleted.kind, deleted.key) == ("removed", "pairs/p1/a.jpg")


def test_minio_listen_stream_keys_are_raw() -> None:
    """The listen stream's keys are not encoded: unquoting would turn ``+`` into a space and
    ``%2B`` into ``+``. Keep-alive lines (``{"Records":null}``, bare spaces) yield nothing."""
    lines = (FIXTURES / "minio_listen_stream.jsonl").read_text(encoding="utf-8").splitlines()
    events: list[ObjectEvent] = []
    for line in lines:
        if line.strip():
            parsed = parse_body(line, raw_keys=True)
            assert not parsed.errors
            events.extend(parsed.events)
    assert [e.key for e in events] == ["pairs/my pair+1/ä b%2B.jpg"]


def test_lambda_sqs_batch_errors_stay_per_record() -> None:
    event = load("lambda_sqs_batch.json")
    assert is_sqs_event(event)
    messages = lambda_sqs_messages(event)
    parsed = {m.message_id: m.parse() for m in messages}
    ok = [mid for mid, p in parsed.items() if not p.errors]
    bad = [mid for mid, p in parsed.items() if p.errors]
    assert bad == ["0d5a3f1e-malformed", "5b1c2d3e-not-json"]
    assert len(ok) == 4
    keys = [e.key for mid in ok for e in parsed[mid].events if e.kind == "created"]
    assert keys == [UPLOADED_KEY, UPLOADED_KEY]  # direct and via SNS
    assert "s3.bucket.name" in str(parsed["0d5a3f1e-malformed"].errors[0])
    assert "not valid JSON" in str(parsed["5b1c2d3e-not-json"].errors[0])


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a JSON object"),
        ({"Records": "x"}, "must be a list"),
        ({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}, '"s3"'),
        (
            {
                "Records": [
                    {
                        "eventSource": "aws:s3",
                        "eventName": "ObjectCreated:Put",
                        "s3": {"bucket": {"name": "b"}, "object": {"key": ""}},
                    }
                ]
            },
            '"s3.object.key"',
        ),
        ({"Records": [{"eventSource": "aws:dynamodb"}]}, "unsupported eventSource"),
        ({"Type": "Notification", "Message": 3}, "Message"),
        ({"hello": "world"}, "unrecognised event"),
    ],
)
def test_malformed_events_give_clear_errors(doc: Any, message: str) -> None:
    parsed = parse_notification(doc)
    assert parsed.events == []
    assert len(parsed.errors) == 1 and message in str(parsed.errors[0])


def test_one_bad_record_does_not_hide_the_good_one() -> None:
    good = load("aws_s3_notification.json")["Records"][0]
    parsed = parse_notification({"Records": [{"eventSource": "aws:s3"}, good]})
    assert [e.key for e in parsed.events] == ["pairs/summer 2026/a+b (1).jpg"]
    assert len(parsed.errors) == 1


def test_odd_sizes_are_dropped_not_fatal() -> None:
    record = load("aws_s3_notification.json")["Records"][0]
    for size, expected in ((None, None), ("12", 12), (-1, None), (True, None), ("x", None)):
        record["s3"]["object"]["size"] = size
        assert only_event({"Records": [record]}).size == expected


def test_nested_envelopes_are_bounded() -> None:
    body = json.dumps(load("aws_s3_notification.json"))
    for _ in range(3):
        body = json.dumps({"Type": "Notification", "Message": body})
    assert len(parse_body(body).events) == 1
    for _ in range(3):  # (each level doubles the escaping: keep it small)
        body = json.dumps({"Type": "Notification", "Message": body})
    assert "nested envelopes" in str(parse_body(body).errors[0])
    assert "not valid JSON" in str(parse_body("[" * 100_000).errors[0])


def test_sqs_detection() -> None:
    assert not is_sqs_event(load("aws_s3_notification.json"))
    assert not is_sqs_event({"Records": []})
    assert not is_sqs_event("text")


def test_seaweedfs_filer_webhook_recorded_from_weed() -> None:
    """Recorded from ``weed mini`` 4.48 (``notification.webhook``) for one S3 upload: the
    filer reports the folders it made, its ``.system`` bookkeeping and the object itself."""
    lines = (FIXTURES / "seaweedfs_filer_webhook.jsonl").read_text(encoding="utf-8").splitlines()
    events = [only_event(json.loads(line)) for line in lines]
    created = [e for e in events if e.kind == "created"]
    assert created == [
        ObjectEvent(
            bucket="photos",
            key="incoming/my pair+1/ä b.jpg",  # the filer path is raw: no unquoting
            kind="created",
            size=3,
            etag="900150983cd24fb0d6963f7d28e17f72",  # the S3 ETag, not the base64 md5
            source="seaweedfs:filer",
            name="create",
        )
    ]
    assert all(e.kind == "other" for e in events if e not in created)


@pytest.mark.parametrize(
    ("event_type", "path", "kind"),
    [
        ("update", "/buckets/b/p/x.jpg", "created"),  # an object written over another
        ("delete", "/buckets/b/p/x.jpg", "removed"),
        ("rename", "/buckets/b/p/x.jpg", "other"),
        ("create", "/elsewhere/p/x.jpg", "other"),  # a filer path outside the buckets
        ("create", "/buckets/b", "other"),
    ],
)
def test_seaweedfs_event_kinds(event_type: str, path: str, kind: str) -> None:
    entry = {"name": "x.jpg", "attributes": {"file_size": 10}}
    side = "old_entry" if event_type == "delete" else "new_entry"
    doc = {"event_type": event_type, "key": path, "message": {side: entry}}
    assert only_event(doc).kind == kind


def test_seaweedfs_malformed_notification_is_an_error() -> None:
    parsed = parse_notification({"event_type": "create", "key": 7, "message": {}})
    assert not parsed.events and "key" in str(parsed.errors[0])
