"""Every source's object notification, normalised into one ``ObjectEvent`` type.

Sources and their key encodings (see tests/fixtures/events for a recorded payload of each):

* S3 notifications from AWS (``aws:s3``) and from MinIO's targets (``minio:s3``, optionally
  inside MinIO's ``{"EventName", "Key", "Records"}`` wrapper): keys are form-encoded
  (``+`` for a space, ``%2F`` possible) and decoded with ``unquote_plus``.
* MinIO's ListenBucketNotification stream: the same records, but keys arrive raw; the caller says
  so with ``raw_keys=True``. Unquoting them would turn a literal ``+`` into a space.
* EventBridge ``Object Created``/``Object Deleted`` events: raw keys.
* SeaweedFS's filer webhook (``notification.webhook``): ``{"event_type", "key":
  "/buckets/<bucket>/<key>", "message": {"new_entry": ...}}`` with the filer path raw; only files
  under the filer's buckets folder are S3 objects, everything else (folders, ``/buckets/.system``)
  is ``kind="other"``.
* SNS envelopes (as delivered to SQS, and the ``aws:sns`` records of a Lambda invocation) around
  any of the above, the Lambda SQS event (``Records[].body``) and SQS ``ReceiveMessage`` messages.

``s3:TestEvent`` yields no events. Deletes become ``kind="removed"`` events, which the job layer
ignores. A malformed record becomes an ``EventError`` for that record only; the others are kept.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_plus

from handler.disposition import Disposition
from handler.logs import get_logger

EventKind = Literal["created", "removed", "other"]
#: SQS -> SNS -> event is two; deeper nesting is not something any AWS service produces.
MAX_ENVELOPES = 4


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """One object changed in one bucket. ``key`` is always the decoded, real object key."""

    bucket: str
    key: str
    kind: EventKind
    size: int | None = None
    #: Without the quotes S3 puts around ETags in HTTP headers.
    etag: str | None = None
    #: Where it came from: ``aws:s3``, ``minio:s3``, ``aws.s3`` (EventBridge), ``listing``.
    source: str = ""
    #: The source's own event name (``ObjectCreated:Put``, ``s3:ObjectCreated:Put``, ...).
    name: str = ""


class EventError(ValueError):
    """A record that is not a valid object notification: an error for that record only."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one delivery (an SQS message, a stream line, an invocation) held."""

    events: list[ObjectEvent] = field(default_factory=list)
    errors: list[EventError] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        self.events.extend(other.events)
        self.errors.extend(other.errors)


@dataclass(frozen=True, slots=True)
class QueueMessage:
    """One SQS message, from ``ReceiveMessage`` or from a Lambda SQS event record."""

    message_id: str
    body: str
    receipt_handle: str | None = None
    #: ``ApproximateReceiveCount``: deliveries so far, this one included (drives the back-off).
    receive_count: int | None = None
    #: Lambda records only: the queue's ARN (``eventSourceARN``), from which its URL is found.
    source_arn: str | None = None

    def parse(self) -> Parsed:
        return parse_body(self.body)

    def left_for_retry(self, fate: Disposition, now: float, log: Any) -> int:
        """The seconds this retried message stays invisible (``Disposition.visibility_s``),
        logged as ``message_left_for_retry``: the one account of it for the Lambda and
        ``watch sqs``, which then set the visibility their own way."""
        seconds = fate.visibility_s(now, self.receive_count)
        log.info(
            "message_left_for_retry",
            message_id=self.message_id,
            receive_count=self.receive_count,
            retry_after_s=seconds,
            reason=fate.reason,
        )
        return seconds


def normalise_etag(etag: str | None) -> str | None:
    """ETags compare without their quotes (events omit them, HEAD responses include them)."""
    if etag is None:
        return None
    return etag.strip().strip('"') or None


def parse_body(body: str | bytes, *, raw_keys: bool = False, depth: int = 0) -> Parsed:
    """Parse a JSON text (an SQS body, an SNS message, a stream line) into events."""
    if depth > MAX_ENVELOPES:
        return Parsed(errors=[EventError(f"more than {MAX_ENVELOPES} nested envelopes")])
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return Parsed(errors=[EventError(f"event is not valid JSON: {exc}")])
    return parse_notification(doc, raw_keys=raw_keys, depth=depth)


def parse_notification(doc: Any, *, raw_keys: bool = False, depth: int = 0) -> Parsed:
    """Any supported notification document, already decoded from JSON, into events.

    ``raw_keys`` is for MinIO's listen stream only: its keys are not URL-encoded.
    """
    log = get_logger()
    if not isinstance(doc, Mapping):
        return Parsed(errors=[EventError(f"event must be a JSON object, not {type(doc).__name__}")])
    if doc.get("Event") == "s3:TestEvent":
        log.debug("event_ignored", reason="s3:TestEvent", bucket=doc.get("Bucket"))
        return Parsed()
    if doc.get("Type") == "Notification" and "Message" in doc:
        return _parse_sns(doc.get("Message"), depth)
    if doc.get("source") == "aws.s3" and "detail" in doc:
        return _wrap(_parse_eventbridge, doc)
    if "event_type" in doc and "message" in doc:
        return _wrap(parse_seaweedfs_filer_event, doc)
    if "Records" in doc:
        records = doc["Records"]
        if records is None:  # MinIO's keep-alive line
            return Parsed()
        if not isinstance(records, list):
            return Parsed(errors=[EventError('"Records" must be a list')])
        parsed = Parsed()
        for record in records:
            parsed.extend(_parse_record(record, raw_keys=raw_keys, depth=depth))
        return parsed
    return Parsed(errors=[EventError(f"unrecognised event with keys {sorted(doc)[:8]}")])


def _parse_record(record: Any, *, raw_keys: bool, depth: int) -> Parsed:
    if not isinstance(record, Mapping):
        return Parsed(errors=[EventError("a record must be a JSON object")])
    source = record.get("eventSource") or record.get("EventSource")
    if source == "aws:sns":
        sns = record.get("Sns")
        if not isinstance(sns, Mapping):
            return Parsed(errors=[EventError('aws:sns record without an "Sns" object')])
        return _parse_sns(sns.get("Message"), depth)
    if source == "aws:sqs":
        return parse_body(str(record.get("body", "")), depth=depth + 1)
    if source in ("aws:s3", "minio:s3"):
        return _wrap(_parse_s3_record, record, raw_keys)
    return Parsed(errors=[EventError(f"unsupported eventSource {source!r}")])


def _parse_sns(message: Any, depth: int) -> Parsed:
    if not isinstance(message, str):
        return Parsed(errors=[EventError('SNS notification without a string "Message"')])
    return parse_body(message, depth=depth + 1)


def _wrap(parse: Callable[..., ObjectEvent], *args: Any) -> Parsed:
    try:
        event = parse(*args)
    except EventError as exc:
        return Parsed(errors=[exc])
    return Parsed(events=[event])


def _kind(name: str) -> EventKind:
    if "ObjectCreated" in name:
        return "created"
    if "ObjectRemoved" in name:
        return "removed"
    return "other"


def _parse_s3_record(record: Mapping[str, Any], raw_keys: bool) -> ObjectEvent:
    name = _string(record, "eventName")
    s3 = _mapping(record, "s3")
    bucket = _string(_mapping(s3, "bucket", "s3."), "name", "s3.bucket.")
    obj = _mapping(s3, "object", "s3.")
    key = _string(obj, "key", "s3.object.")
    return ObjectEvent(
        bucket=bucket,
        key=key if raw_keys else unquote_plus(key),
        kind=_kind(name),
        size=_size(obj.get("size")),
        etag=normalise_etag(_optional_string(obj.get("eTag"))),
        source=str(record.get("eventSource")),
        name=name,
    )


def _parse_eventbridge(doc: Mapping[str, Any]) -> ObjectEvent:
    name = _string(doc, "detail-type")
    detail = _mapping(doc, "detail")
    obj = _mapping(detail, "object", "detail.")
    kind: EventKind = (
        "created"
        if name == "Object Created"
        else "removed"
        if name == "Object Deleted"
        else "other"
    )
    return ObjectEvent(
        bucket=_string(_mapping(detail, "bucket", "detail."), "name", "detail.bucket."),
        key=_string(obj, "key", "detail.object."),
        kind=kind,
        size=_size(obj.get("size")),
        # AWS documents ``etag``; moto sends ``eTag``.
        etag=normalise_etag(_optional_string(obj.get("etag", obj.get("eTag")))),
        source="aws.s3",
        name=name,
    )


#: Where SeaweedFS's filer keeps S3 buckets (its default ``-s3.bucketsFolder``).
SEAWEEDFS_BUCKETS_FOLDER = "/buckets/"
_SEAWEEDFS_KINDS: dict[str, EventKind] = {
    "create": "created",
    "update": "created",
    "delete": "removed",
}


def parse_seaweedfs_filer_event(doc: Mapping[str, Any]) -> ObjectEvent:
    """One SeaweedFS filer webhook notification (recorded: tests/fixtures/events).

    An ``update`` is an object written over an existing one, so it counts as a creation; a
    ``rename`` names the old path in ``key``, which no longer exists. The ETag is the S3 one the
    gateway stores (``Seaweed-X-Amz-ETag``, base64 of the quoted-less hex string).
    """
    event_type = _string(doc, "event_type")
    path = _string(doc, "key")
    message = _mapping(doc, "message")
    # A delete carries only the ``old_entry``.
    entry = message.get("new_entry") or message.get("old_entry")
    in_buckets = path.startswith(SEAWEEDFS_BUCKETS_FOLDER)
    bucket, _, key = (
        path[len(SEAWEEDFS_BUCKETS_FOLDER) :].partition("/") if in_buckets else ("", "", "")
    )
    is_object = (
        bool(bucket)
        and not bucket.startswith(".")
        and bool(key)
        and isinstance(entry, Mapping)
        and not entry.get("is_directory")
    )
    kind: EventKind = _SEAWEEDFS_KINDS.get(event_type, "other") if is_object else "other"
    size = etag = None
    if isinstance(entry, Mapping):
        attributes = entry.get("attributes")
        size = _size(attributes.get("file_size")) if isinstance(attributes, Mapping) else None
        etag = _seaweedfs_etag(entry.get("extended"))
    return ObjectEvent(
        bucket=bucket,
        key=key or path,
        kind=kind,
        size=size,
        etag=etag,
        source="seaweedfs:filer",
        name=event_type,
    )


def _seaweedfs_etag(extended: Any) -> str | None:
    if not isinstance(extended, Mapping) or not isinstance(extended.get("Seaweed-X-Amz-ETag"), str):
        return None
    try:
        return normalise_etag(base64.b64decode(extended["Seaweed-X-Amz-ETag"]).decode("ascii"))
    except (binascii.Error, UnicodeDecodeError):
        return None


def _mapping(doc: Mapping[str, Any], name: str, where: str = "") -> Mapping[str, Any]:
    value = doc.get(name)
    if not isinstance(value, Mapping):
        raise EventError(f'event field "{where}{name}" is missing or not an object')
    return value


def _string(doc: Mapping[str, Any], name: str, where: str = "") -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise EventError(f'event field "{where}{name}" is missing or not a non-empty string')
    return value


def _optional_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _size(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        size = int(value)
    except ValueError:
        return None
    return size if size >= 0 else None


# --- SQS -----------------------------------------------------------------------------------------


def is_sqs_event(event: Any) -> bool:
    """Is ``event`` a Lambda SQS batch (``Records[].eventSource == "aws:sqs"``)?"""
    if not isinstance(event, Mapping):
        return False
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, Mapping) and r.get("eventSource") == "aws:sqs" for r in records)
    )


def lambda_sqs_messages(event: Mapping[str, Any]) -> list[QueueMessage]:
    """The messages of a Lambda SQS event, in order."""
    return [
        QueueMessage(
            message_id=str(record.get("messageId", "")),
            body=str(record.get("body", "")),
            receipt_handle=_optional_string(record.get("receiptHandle")),
            receive_count=_count(_attributes(record, "attributes")),
            source_arn=_optional_string(record.get("eventSourceARN")),
        )
        for record in event["Records"]
    ]


def sqs_messages(messages: Sequence[Mapping[str, Any]]) -> list[QueueMessage]:
    """The ``Messages`` of an SQS ``ReceiveMessage`` response."""
    return [
        QueueMessage(
            message_id=str(message.get("MessageId", "")),
            body=str(message.get("Body", "")),
            receipt_handle=_optional_string(message.get("ReceiptHandle")),
            receive_count=_count(_attributes(message, "Attributes")),
        )
        for message in messages
    ]


def _attributes(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    found = record.get(name)
    return found if isinstance(found, Mapping) else {}


def _count(attributes: Mapping[str, Any]) -> int | None:
    try:
        return int(attributes["ApproximateReceiveCount"])
    except (KeyError, TypeError, ValueError):
        return None
