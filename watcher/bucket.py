"""What the bucket watchers (``watch sqs``, ``watch minio``, ``watch poll``) share.

``s3://BUCKET/PREFIX`` parsing, the common options, building the job runner once per process,
listing a prefix as creation events, and a retry schedule for pairs that must be looked at again
(a lone image waiting for its partner, a manifest waiting for its images, a transient failure).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from handler.bucket_jobs import BucketJobs
from handler.compare import create_comparator
from handler.config import Settings
from handler.errors import PairError
from handler.events import ObjectEvent, Parsed, normalise_etag
from handler.s3_storage import normalise_prefix, s3_client
from watcher.shutdown import StopFlag

#: Delays before a delivery that failed (throttling, network, an unwritable output) is retried.
#: ``watch minio`` gives up after the last one with an error log line; ``watch poll``, which
#: sees the key in every listing anyway, repeats the last one.
RETRY_DELAYS = (5.0, 30.0, 120.0)


@dataclass(frozen=True)
class BucketURL:
    bucket: str
    prefix: str


def parse_s3_url(text: str) -> BucketURL:
    """``s3://BUCKET`` or ``s3://BUCKET/PREFIX`` (the prefix is a folder: ``a/b`` = ``a/b/``)."""
    if not text.startswith("s3://"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an s3://BUCKET/PREFIX URL")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise argparse.ArgumentTypeError(f"{text!r} names no bucket")
    try:
        return BucketURL(bucket, normalise_prefix(prefix))
    except PairError as exc:  # PathOutsideRoot: "..", "." or empty segments, control characters
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint (MinIO, SeaweedFS, moto...); default: AWS_ENDPOINT_URL, "
        "else AWS itself",
    )
    parser.add_argument(
        "--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)"
    )


def build_jobs(
    settings: Settings, endpoint_url: str | None, region: str | None, prefix: str = ""
) -> BucketJobs:
    """One comparator (a loaded model, for ``vl``) and one S3 client for the whole process."""
    comparator = create_comparator(settings)
    return BucketJobs(settings, comparator, s3_client(endpoint_url, region), prefix=prefix)


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


#: What a retry is filed under: an object's (bucket, key).
RetryKey = tuple[str, str]


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    parsed: Parsed = field(compare=False)
    attempt: int = field(default=0, compare=False)
    key: RetryKey | None = field(default=None, compare=False)
    cancelled: bool = field(default=False, compare=False)


class RetrySchedule:
    """Deliveries to handle again later, earliest first (in-memory: a restart re-lists).

    An entry added with a ``key`` replaces that key's pending entry: the listing replayed after
    every reconnect reports the same lone image again, and without this each replay would add
    one more retry of it.
    """

    def __init__(self) -> None:
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._by_key: dict[RetryKey, _Due] = {}
        self._cancelled = 0

    def add(
        self, parsed: Parsed, delay: float, attempt: int = 0, *, key: RetryKey | None = None
    ) -> None:
        item = _Due(time.monotonic() + delay, next(self._seq), parsed, attempt, key)
        if key is not None:
            replaced = self._by_key.get(key)
            if replaced is not None:
                # Left in the heap (removing from its middle is O(n)); skipped when popped.
                replaced.cancelled = True
                self._cancelled += 1
            self._by_key[key] = item
        heapq.heappush(self._heap, item)
        if self._cancelled > len(self._heap) // 2:
            self._heap = [d for d in self._heap if not d.cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def due(self) -> list[tuple[Parsed, int]]:
        now = time.monotonic()
        out = []
        while self._heap and self._heap[0].at <= now:
            item = heapq.heappop(self._heap)
            if item.cancelled:
                self._cancelled -= 1
                continue
            if item.key is not None:
                del self._by_key[item.key]
            out.append((item.parsed, item.attempt))
        return out

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled


def sleep_unless_stopped(stop: StopFlag, seconds: float, step: float = 0.2) -> None:
    """Sleep in short steps so that a SIGTERM is answered quickly."""
    end = time.monotonic() + seconds
    while not stop.requested:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
