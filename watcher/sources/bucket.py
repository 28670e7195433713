"""What the bucket sources (``watch sqs``, ``watch minio``, ``watch poll``) share.

Refusing a bucket outside ``allowed_buckets`` before anything is built, listing a prefix as
creation events (what a poller or a reconnect sees), and handling one event with the runner's
manifest index (asked which manifests read the object, taught what each manifest read), and
one delivery of events likewise (an SQS message, a webhook request).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from handler.bucket_jobs import BucketJobs, Delivery, EventReport
from handler.config import Settings
from handler.events import ObjectEvent, Parsed, normalise_etag
from watcher import prometheus
from watcher.runner import Runner


def bucket_refused(settings: Settings, bucket: str) -> bool:
    """A watched bucket outside ``allowed_buckets`` (``watch minio``/``poll``): said on stderr,
    before anything is built, for the command to exit 2."""
    allowed = settings.allowed_buckets
    if allowed is None or bucket in allowed:
        return False
    print(
        f"pairwatch: bucket {bucket!r} is not in allowed_buckets ({', '.join(allowed)})",
        file=sys.stderr,
    )
    return True


def list_events(jobs: BucketJobs, bucket: str, prefix: str) -> Iterator[ObjectEvent]:
    """Every object under ``prefix`` as a creation event (what a poller or a reconnect sees)."""
    paginator = jobs.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield ObjectEvent(
                bucket=bucket,
                key=item["Key"],
                kind="created",
                size=item.get("Size"),
                etag=normalise_etag(item.get("ETag")),
                source="listing",
            )


def run_event(
    jobs: BucketJobs, runner: Runner[Any], event: ObjectEvent, queued_ms: float, source: str
) -> EventReport:
    """One object event, on a runner worker thread (counted in the metrics under ``source``)."""
    now = time.time()
    report = jobs.handle(event, now=now, readers=runner.manifests.readers, queued_ms=queued_ms)
    runner.record(report.reports, source)
    prometheus.record_event_report(report, source)
    return report


def run_delivery(
    jobs: BucketJobs,
    runner: Runner[Any],
    parsed: Parsed,
    queued_ms: float | None,
    source: str,
    **context: object,
) -> Delivery:
    """One delivery of events (an SQS message, a webhook request), on a runner worker thread
    under the deadline it started (counted in the metrics under ``source``)."""
    delivery = jobs.handle_parsed(
        parsed,
        now=time.time(),
        readers=runner.manifests.readers,
        queued_ms=queued_ms,
        deadline=None,  # (the one the runner's worker started)
        **context,
    )
    runner.record(delivery.reports, source)
    prometheus.record_delivery(delivery, source)
    return delivery
