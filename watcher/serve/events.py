"""``POST /v1/events``: object notifications over HTTP, handled like every bucket watcher's.

MinIO's webhook target, SeaweedFS's filer webhook and plain S3 event JSON are parsed by
``handler.events`` and handled by ``handler.bucket_jobs.BucketJobs``, which fetch the objects
from the configured S3 endpoint and write the results back. The answer waits for the pairs:

* 200 — every record is done, refused for good, or recorded for a later look (a lone image:
  the process's runner looks at it again when its ``pair_timeout`` is up, in memory, with the
  same recheck policy as every watcher). Refused for good (a
  hostile key; a bucket that is not a bucket name, not in ``allowed_buckets`` or missing) is
  logged (``event_rejected``), counted (``pairwatch_events_total{outcome="rejected"}``) and
  *acknowledged*: MinIO and SeaweedFS deliver again whatever is not answered 2xx, forever with
  MinIO's ``queue_dir``, so a 4xx or 5xx would only repeat it;
* 503 with ``Retry-After`` — a record may succeed later (a manifest whose images are on their
  way, throttling, an unwritable result, a pair out of time): the sender delivers it again;
* 400 malformed, 401 wrong or missing token, 408 a body that stalls (``upload_idle_timeout``),
  413 body too large, 429 busy.

A delivery is one unit of work of the process's runner (``Runner.submit``), sharing its
``concurrency`` and queue with the uploads; its deadline starts when a worker takes it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from handler.bucket_jobs import BucketJobs, Delivery
from handler.config import Settings
from handler.disposition import Disposition, backoff
from handler.events import ObjectEvent, Parsed, parse_body
from handler.logs import get_logger
from watcher import prometheus
from watcher.serve.admission import Admission, Busy
from watcher.serve.connection import Connection, UploadStalled
from watcher.serve.responses import error_response
from watcher.sources.bucket import run_delivery

#: A notification is a few KB; MinIO batches nothing into one webhook request.
MAX_EVENT_BYTES = 1024 * 1024
#: ``pairwatch_events_total`` source for records refused before they had one.
WEBHOOK_SOURCE = "webhook"


class BodyTooLarge(Exception):
    pass


@dataclass
class EventsEndpoint:
    """The webhook's collaborators: the token, the bucket jobs and the shared admission (in
    front of the process's one runner)."""

    token: bytes
    jobs: BucketJobs
    admission: Admission
    #: Runner keys of deliveries (each its own unit of work).
    delivery_ids: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def build(
        cls,
        settings: Settings,
        admission: Admission,
        endpoint_url: str | None,
        region: str | None,
    ) -> EventsEndpoint:
        assert settings.events_token is not None
        jobs = BucketJobs.from_settings(
            settings, admission.runner.comparator, endpoint_url=endpoint_url, region=region
        )
        token = settings.events_token.get_secret_value().encode()
        return cls(token, jobs, admission)

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
        """Handle one delivery as a unit of work of the runner; lone images are handed to the
        runner's rechecks for a look when their partner is due."""
        handled: list[Delivery] = []

        def work(queued_ms: float) -> Disposition:
            handled.append(self._handle(parsed, queued_ms))
            return handled[0].disposition

        async with self.admission.admit() as ticket:
            future = ticket.submit(("webhook", next(self.delivery_ids)), work)
            await asyncio.wrap_future(future)
        if not handled:
            raise RuntimeError("the delivery's work failed (work_failed)")
        delivery = handled[0]
        runner = self.admission.runner
        for one in delivery.events:
            key = (one.event.bucket, one.event.key)
            if one.disposition.is_retry and one.disposition.at is not None:
                runner.recheck_later(key, self._recheck(one.event), one.disposition)
            elif not one.disposition.is_retry:
                runner.forget(key)
        return delivery

    def _handle(self, parsed: Parsed, queued_ms: float | None = None) -> Delivery:
        """On a runner worker, under the deadline it started when it took the work; the
        runner's manifest index answers (and learns) which manifests read an object, as in
        every bucket watcher."""
        return run_delivery(self.jobs, self.admission.runner, parsed, queued_ms, WEBHOOK_SOURCE)

    def _recheck(self, event: ObjectEvent) -> Callable[[float], Disposition]:
        """The runner's recheck of a lone image (``incomplete_pair`` once its partner is due)."""
        return lambda queued_ms: self._handle(Parsed(events=[event]), queued_ms).disposition


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
