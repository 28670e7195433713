"""Listen to a MinIO bucket's notifications and write results back beside the pairs.

``pairwatch watch minio s3://BUCKET/PREFIX`` holds MinIO's ListenBucketNotification stream open
through the ``minio`` SDK, for ``s3:ObjectCreated:*`` only (the SDK's default also asks for
``ObjectAccessed``, which our own GETs would fire) and with the region given, so the SDK does not
first ask the server for the bucket's location.

A stream loses whatever happens while it is down, and the SDK reconnects silently. So every
(re)connection is followed by one listing of the prefix: anything uploaded during the gap is
handled then, and pairs already done are skipped by the usual result check.

The stream is read on its own thread into a queue bounded by ``queue_size``, so a burst of events
or a slow pair does not stop the stream from being read until that queue is full. Once it is,
the reader waits for room, and so does the listing replayed after a (re)connect (it runs on the
reader thread, before the stream is read): meanwhile the stream is not read, and what MinIO
cannot hand over then may be lost. Only the listing after the next reconnect catches up on it,
so size ``queue_size`` for the largest burst expected.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import boto3
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.credentials.providers import Provider

from handler.aws_clients import CONNECT_TIMEOUT_S, MAX_ATTEMPTS, s3_endpoint
from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.disposition import Disposition
from handler.events import ObjectEvent, Parsed, parse_notification
from handler.logs import get_logger
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BucketURL
from watcher.runner import Runner
from watcher.sources.bucket import bucket_refused, list_events, run_event
from watcher.sources.command import watch

EVENTS = ("s3:ObjectCreated:*",)
#: A reconnection sooner than this after the previous one backs off (doubling, up to the max):
#: the SDK reconnects in a tight loop when a server answers with something it cannot parse.
MIN_CONNECTION_GAP = 1.0
MAX_BACKOFF = 30.0
#: Events per queued batch when a listing is replayed after a (re)connect.
LISTING_BATCH = 100
#: The notification stream is idle between events: its read timeout must outlast MinIO's
#: keep-alive (it sends a blank line every few seconds), not one request's answer.
STREAM_READ_TIMEOUT_S = 60.0


def run(args: argparse.Namespace, settings: Settings) -> int:
    url: BucketURL = args.url
    if bucket_refused(settings, url.bucket):
        return EXIT_USAGE
    endpoint = s3_endpoint(args.endpoint_url)
    if not endpoint:
        print("pairwatch: watch minio needs --endpoint-url (or AWS_ENDPOINT_URL)", file=sys.stderr)
        return EXIT_USAGE
    region = (
        args.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    try:
        client = minio_client(endpoint, region)
        # Lazy (nothing is sent), but refuses AWS endpoints and invalid bucket names now.
        client.listen_bucket_notification(url.bucket, prefix=url.prefix, events=EVENTS)
    except ValueError as exc:
        print(f"pairwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def build(runner: Runner[Any]) -> MinioSource:
        jobs = BucketJobs.from_settings(
            settings, runner.comparator, endpoint_url=endpoint, region=region, prefix=url.prefix
        )
        return MinioSource(client, jobs, url, runner, queue_size=settings.queue_size)

    watched = watch(
        settings,
        build,
        log=get_logger(bucket=url.bucket, prefix=url.prefix),
        started=lambda runner: {"source": "minio", "endpoint": endpoint},
        stopped=lambda listener: {"connections": listener.connections},
    )
    return EXIT_FAILED if watched is None else EXIT_OK


class _AwsChainCredentials(Provider):
    """Credentials from boto3's standard chain (env, profile, role), so both clients agree."""

    def __init__(self) -> None:
        self._session = boto3.Session()

    def retrieve(self) -> Credentials:
        found = self._session.get_credentials()
        if found is None:
            raise ValueError("no AWS credentials found (AWS_ACCESS_KEY_ID, a profile, a role)")
        frozen = found.get_frozen_credentials()
        return Credentials(frozen.access_key or "", frozen.secret_key or "", frozen.token)


def minio_client(endpoint: str, region: str) -> Minio:
    """A MinIO client with bounded connect/read timeouts and attempts (like the boto3 ones)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"endpoint {endpoint!r} must be http(s)://HOST[:PORT]")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S),
        retries=urllib3.Retry(
            total=MAX_ATTEMPTS - 1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )
    return Minio(
        parts.netloc,
        credentials=_AwsChainCredentials(),
        secure=parts.scheme == "https",
        region=region,
        http_client=http,
    )


class MinioSource:
    """MinIO's notification stream (plus a listing per (re)connect) as a source of object keys
    (``(bucket, key)``) for a ``Runner``."""

    def __init__(
        self,
        client: Minio,
        jobs: BucketJobs,
        url: BucketURL,
        runner: Runner[tuple[str, str]],
        *,
        queue_size: int,
    ) -> None:
        self.client = client
        self.jobs = jobs
        self.url = url
        self.runner = runner
        self.inbox: queue.Queue[Parsed] = queue.Queue(maxsize=queue_size)
        self.connections = 0
        self._waiting: deque[ObjectEvent] = deque()
        self._last_connect = 0.0
        self._backoff = 0.0
        self._stopped = threading.Event()
        self.log = get_logger(bucket=url.bucket, prefix=url.prefix)

    def start(self) -> None:
        threading.Thread(target=self._read, name="minio-listen", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def finished(self) -> bool:
        return False

    def next_wait(self) -> float | None:
        return None

    def pump(self) -> None:
        """Offer what the stream delivered, while the runner's queue has room (the bounded inbox
        then makes the stream reader wait: see the module's docstring)."""
        while True:
            if not self._waiting:
                try:
                    parsed = self.inbox.get_nowait()
                except queue.Empty:
                    return
                for error in parsed.errors:
                    self.log.error("event_malformed", error=str(error))
                self._waiting.extend(parsed.events)
                continue
            event = self._waiting[0]
            key = (event.bucket, event.key)
            if not self.runner.offer(key, partial(self._work, event)):
                return
            self._waiting.popleft()

    def _work(self, event: ObjectEvent, queued_ms: float) -> Disposition:
        report = run_event(self.jobs, self.runner, event, queued_ms, "minio")
        return report.disposition

    # --- the stream thread --------------------------------------------------------------------

    def _read(self) -> None:
        while not self._stopped.is_set():
            stream = self.client.listen_bucket_notification(
                self.url.bucket, prefix=self.url.prefix, events=EVENTS
            )
            # The SDK reconnects inside its iterator without telling anyone; wrapping its
            # connect function is the one place every (re)connection passes through.
            stream._func = self._on_connect(stream._func)
            try:
                with stream:
                    for record in stream:
                        self._put(parse_notification(record, raw_keys=True))
                        if self._stopped.is_set():
                            return
            except Exception as exc:
                # Connection refused/reset, HTTP errors (S3Error), read timeouts.
                self.log.warning("stream_lost", error_type=type(exc).__name__, error=str(exc))

    def _on_connect(self, connect: Callable[[], Any]) -> Callable[[], Any]:
        def connected() -> Any:
            self._pause_before_connect()
            self._last_connect = time.monotonic()
            response = connect()
            self.connections += 1
            self.log.info("stream_connected", connections=self.connections)
            self._relist()
            return response

        return connected

    def _pause_before_connect(self) -> None:
        if time.monotonic() - self._last_connect >= MIN_CONNECTION_GAP:
            self._backoff = 0.0
            return
        self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF)
        self.log.debug("reconnect_backoff", seconds=self._backoff)
        self._stopped.wait(self._backoff)

    def _relist(self) -> None:
        """Queue every object under the prefix: whatever the stream missed is caught up."""
        batch = Parsed()
        count = 0
        try:
            for event in list_events(self.jobs, self.url.bucket, self.url.prefix):
                batch.events.append(event)
                count += 1
                if len(batch.events) >= LISTING_BATCH:
                    self._put(batch)
                    batch = Parsed()
        except Exception as exc:
            self.log.error("list_failed", error_type=type(exc).__name__, error=str(exc))
        if batch.events:
            self._put(batch)
        self.log.info("prefix_listed", objects=count)

    def _put(self, parsed: Parsed) -> None:
        if not parsed.events and not parsed.errors:
            return
        while not self._stopped.is_set():
            try:
                self.inbox.put(parsed, timeout=0.5)
                self.runner.wake()
                return
            except queue.Full:
                continue
