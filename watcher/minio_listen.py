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
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import boto3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.credentials.providers import Provider

from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.errors import PairError
from handler.events import ObjectEvent, Parsed, parse_notification
from handler.logs import get_logger
from handler.s3_storage import s3_endpoint
from watcher import metrics
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from watcher.bucket import (
    RETRY_DELAYS,
    BucketURL,
    RetrySchedule,
    add_endpoint_options,
    build_jobs,
    list_events,
    parse_s3_url,
    sleep_unless_stopped,
)
from watcher.shutdown import StopFlag, stop_on_signals

EVENTS = ("s3:ObjectCreated:*",)
#: A reconnection sooner than this after the previous one backs off (doubling, up to the max):
#: the SDK reconnects in a tight loop when a server answers with something it cannot parse.
MIN_CONNECTION_GAP = 1.0
MAX_BACKOFF = 30.0
#: Events per queued batch when a listing is replayed after a (re)connect.
LISTING_BATCH = 100


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", type=parse_s3_url, metavar="s3://BUCKET/PREFIX")
    add_endpoint_options(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    url: BucketURL = args.url
    log = get_logger(bucket=url.bucket, prefix=url.prefix)
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
    try:
        jobs = build_jobs(settings, endpoint, region, prefix=url.prefix)
    except PairError as exc:
        log.error("comparator_unavailable", error_type=exc.type, error=exc.message)
        return EXIT_FAILED
    listener = Listener(client, jobs, url, queue_size=settings.queue_size)
    log.info("watch_started", source="minio", endpoint=endpoint)
    try:
        with stop_on_signals() as stop:
            listener.run(stop)
    finally:
        jobs.comparator.close()
    log.info("watch_stopped", connections=listener.connections)
    return EXIT_OK


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
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"endpoint {endpoint!r} must be http(s)://HOST[:PORT]")
    return Minio(
        parts.netloc,
        credentials=_AwsChainCredentials(),
        secure=parts.scheme == "https",
        region=region,
    )


class Listener:
    def __init__(self, client: Minio, jobs: BucketJobs, url: BucketURL, *, queue_size: int) -> None:
        self.client = client
        self.jobs = jobs
        self.url = url
        self.inbox: queue.Queue[Parsed] = queue.Queue(maxsize=queue_size)
        self.retries = RetrySchedule()
        self.connections = 0
        self._last_connect = 0.0
        self._backoff = 0.0
        self.log = get_logger(bucket=url.bucket, prefix=url.prefix)

    def run(self, stop: StopFlag) -> None:
        reader = threading.Thread(target=self._read, args=(stop,), name="minio-listen", daemon=True)
        reader.start()
        while not stop.requested:
            for parsed, attempt in self.retries.due():
                self._handle(parsed, attempt)
            try:
                parsed = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self._handle(parsed, 0)

    def _handle(self, parsed: Parsed, attempt: int) -> None:
        delivery = self.jobs.handle_parsed(parsed)
        metrics.record_delivery(delivery, "minio", len(parsed.events))
        # Retries are filed per object, so that one lone image is not a reason to handle a whole
        # listing batch again, and a reconnect's listing replaces its pending retry.
        for result in delivery.results:
            if result.retry_in is not None:
                # A lone image: look again when its partner is overdue (incomplete_pair then).
                self._retry(result.event, result.retry_in, 0)
        if not delivery.transient:
            return
        handled = {id(result.event) for result in delivery.results}
        for event in parsed.events:
            if id(event) in handled:
                continue
            if attempt < len(RETRY_DELAYS):
                self._retry(event, RETRY_DELAYS[attempt], attempt + 1)
            else:
                self.log.error("retries_exhausted", key=event.key, attempts=attempt + 1)

    def _retry(self, event: ObjectEvent, delay: float, attempt: int) -> None:
        self.retries.add(Parsed(events=[event]), delay, attempt, key=(event.bucket, event.key))

    # --- the stream thread --------------------------------------------------------------------

    def _read(self, stop: StopFlag) -> None:
        while not stop.requested:
            stream = self.client.listen_bucket_notification(
                self.url.bucket, prefix=self.url.prefix, events=EVENTS
            )
            # The SDK reconnects inside its iterator without telling anyone; wrapping its
            # connect function is the one place every (re)connection passes through.
            stream._func = self._on_connect(stream._func, stop)
            try:
                with stream:
                    for record in stream:
                        self._put(parse_notification(record, raw_keys=True), stop)
            except Exception as exc:
                # Connection refused/reset, HTTP errors (S3Error), read timeouts.
                self.log.warning("stream_lost", error_type=type(exc).__name__, error=str(exc))

    def _on_connect(self, connect: Callable[[], Any], stop: StopFlag) -> Callable[[], Any]:
        def connected() -> Any:
            self._pause_before_connect(stop)
            self._last_connect = time.monotonic()
            response = connect()
            self.connections += 1
            self.log.info("stream_connected", connections=self.connections)
            self._relist(stop)
            return response

        return connected

    def _pause_before_connect(self, stop: StopFlag) -> None:
        if time.monotonic() - self._last_connect >= MIN_CONNECTION_GAP:
            self._backoff = 0.0
            return
        self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF)
        self.log.debug("reconnect_backoff", seconds=self._backoff)
        sleep_unless_stopped(stop, self._backoff)

    def _relist(self, stop: StopFlag) -> None:
        """Queue every object under the prefix: whatever the stream missed is caught up."""
        batch = Parsed()
        count = 0
        try:
            for event in list_events(self.jobs, self.url.bucket, self.url.prefix):
                batch.events.append(event)
                count += 1
                if len(batch.events) >= LISTING_BATCH:
                    self._put(batch, stop)
                    batch = Parsed()
        except Exception as exc:
            self.log.error("list_failed", error_type=type(exc).__name__, error=str(exc))
        if batch.events:
            self._put(batch, stop)
        self.log.info("prefix_listed", objects=count)

    def _put(self, parsed: Parsed, stop: StopFlag) -> None:
        if not parsed.events and not parsed.errors:
            return
        while not stop.requested:
            try:
                self.inbox.put(parsed, timeout=0.5)
                return
            except queue.Full:
                continue
