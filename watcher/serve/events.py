"""``POST /v1/events``: object notifications over HTTP, handled like every bucket watcher's.

MinIO's webhook target, SeaweedFS's filer webhook and plain S3 event JSON are parsed by
``handler.events`` and handled by ``handler.bucket_jobs.BucketJobs``, which fetch the objects
from the configured S3 endpoint and write the results back. The answer waits for the pairs:

* 200 — every record is done, refused for good, or recorded for a later look (a lone image:
  it is looked at again when its ``pair_timeout`` is up, in memory). Refused for good (a
  hostile key; a bucket that is not a bucket name, not in ``allowed_buckets`` or missing) is
  logged (``event_rejected``), counted (``pairwatch_events_total{outcome="rejected"}``) and
  *acknowledged*: MinIO and SeaweedFS deliver again whatever is not answered 2xx, forever with
  MinIO's ``queue_dir``, so a 4xx or 5xx would only repeat it;
* 503 with ``Retry-After`` — a record may succeed later (a manifest whose images are on their
  way, throttling, an unwritable result, a pair out of time): the sender delivers it again;
* 400 malformed, 401 wrong or missing token, 408 a body that stalls (``upload_idle_timeout``),
  413 body too large, 429 busy.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from handler.bucket_jobs import BucketJobs, Delivery
from handler.compare import Comparator
from handler.config import Settings
from handler.deadline import Deadline
from handler.disposition import backoff, retry
from handler.events import ObjectEvent, Parsed, parse_body
from handler.logs import get_logger
from watcher import prometheus
from watcher.rechecks import Rechecks
from watcher.serve.admission import Admission, Busy
from watcher.serve.connection import Connection, UploadStalled
from watcher.serve.responses import error_response

#: A notification is a few KB; MinIO batches nothing into one webhook request.
MAX_EVENT_BYTES = 1024 * 1024
#: ``pairwatch_events_total`` source for records refused before they had one.
WEBHOOK_SOURCE = "webhook"
#: How often due rechecks (lone images) are looked at.
RECHECK_PERIOD = 1.0


class BodyTooLarge(Exception):
    pass


@dataclass
class EventsEndpoint:
    """The webhook's collaborators: the token, the bucket jobs and the shared admission."""

    token: bytes
    jobs: BucketJobs
    admission: Admission
    limiter: anyio.CapacityLimiter
    #: Lone images to look at again when their partner is due, keyed by (bucket, key).
    rechecks: Rechecks[tuple[str, str]] = field(default_factory=Rechecks)
    waiting: dict[tuple[str, str], ObjectEvent] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        settings: Settings,
        comparator: Comparator,
        admission: Admission,
        limiter: anyio.CapacityLimiter,
        endpoint_url: str | None,
        region: str | None,
    ) -> EventsEndpoint:
        assert settings.events_token is not None
        jobs = BucketJobs.from_settings(
            settings, comparator, endpoint_url=endpoint_url, region=region
        )
        token = settings.events_token.get_secret_value().encode()
        return cls(token, jobs, admission, limiter)

    def authorized(self, header: str | None) -> bool:
        """``Bearer <token>``, compared in constant time (no early exit on the first byte)."""
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token)

    async def handle(self, request: Request) -> Response:
        log = get_logger()
        if not self.authorized(request.headers.get("authorization")):
            log.warning("event_unauthorized", has_token="authorization" in request.headers)
            prometheus.record_event(WEBHOOK_SOURCE, "unauthorized")
            return error_response(
                401,
                "unauthorized",
                "missing or wrong bearer token",
                **{"WWW-Authenticate": "Bearer"},
            )
        connection = Connection(request.receive, self.jobs.settings.upload_idle_timeout)
        try:
            body = await _read_capped(connection.stream(), MAX_EVENT_BYTES)
        except UploadStalled as exc:
            log.warning("event_refused", reason="too slow", error=str(exc))
            return error_response(408, "upload_timeout", str(exc), Connection="close")
        except BodyTooLarge:
            return error_response(
                413,
                "body_too_large",
                f"events are at most {MAX_EVENT_BYTES} bytes",
                Connection="close",  # the rest of the body is not read
            )
        except ClientDisconnect:
            return Response(status_code=400)
        parsed = parse_body(body)
        if parsed.errors and not parsed.events:
            for error in parsed.errors:
                log.error("event_malformed", error=str(error))
            prometheus.record_event(WEBHOOK_SOURCE, "malformed", len(parsed.errors))
            return error_response(400, "malformed_event", "; ".join(map(str, parsed.errors))[:1000])
        try:
            delivery = await self.deliver(parsed)
        except Busy as exc:
            return error_response(
                429, "busy", "too many pairs in flight", **{"Retry-After": str(exc.retry_after)}
            )
        fate = delivery.disposition
        if fate.is_retry and fate.at is None:
            return error_response(
                503,
                "retry",
                "some records could not be handled yet; deliver again",
                **{"Retry-After": str(int(backoff(1)))},
            )
        return JSONResponse(_summary(delivery, parsed))

    async def deliver(self, parsed: Parsed) -> Delivery:
        """Handle one delivery in a worker thread inside an admission slot; lone images are
        filed for a look when their partner is due."""
        async with self.admission.admit() as ticket, ticket.compare():
            delivery: Delivery = await anyio.to_thread.run_sync(
                partial(self._handle, parsed), limiter=self.limiter
            )
        prometheus.record_delivery(delivery, WEBHOOK_SOURCE)
        for handled in delivery.events:
            key = (handled.event.bucket, handled.event.key)
            if handled.disposition.is_retry and handled.disposition.at is not None:
                self.waiting[key] = handled.event
                self.rechecks.schedule(key, handled.disposition)
            elif not handled.disposition.is_retry:
                self.rechecks.clear(key)
                self.waiting.pop(key, None)
        return delivery

    def _handle(self, parsed: Parsed) -> Delivery:
        """On a worker thread, holding a compare slot: the first pair's time starts now."""
        deadline = Deadline(self.jobs.settings.comparison.processing_timeout)
        return self.jobs.handle_parsed(parsed, now=time.time(), deadline=deadline)

    async def recheck_loop(self) -> None:
        """Look again at lone images whose partner is due (``incomplete_pair`` otherwise)."""
        while True:
            await anyio.sleep(RECHECK_PERIOD)
            for key in self.rechecks.due():
                event = self.waiting.pop(key, None)
                if event is None:
                    continue
                try:
                    await self.deliver(Parsed(events=[event]))
                except Busy:
                    self.waiting[key] = event
                    self.rechecks.schedule(key, retry("busy", at=time.time() + backoff(1)))


async def _read_capped(stream: AsyncIterator[bytes], limit: int) -> bytes:
    body = bytearray()
    async for chunk in stream:
        body.extend(chunk)
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def _summary(delivery: Delivery, parsed: Parsed) -> dict[str, Any]:
    handled = [r for r in delivery.events if not r.disposition.is_reject]
    refused = [r for r in delivery.events if r.disposition.is_reject]
    return {
        "events": len(parsed.events),
        "malformed": len(parsed.errors),
        "refused": len(refused),
        "outcomes": [
            {"bucket": r.event.bucket, "key": r.event.key, "outcome": prometheus.event_outcome(r)}
            for r in handled
        ],
        "rejected": [
            {
                "bucket": r.event.bucket[:100],
                "key": r.event.key[:300],
                "reason": r.disposition.reason,
            }
            for r in refused
        ],
    }
