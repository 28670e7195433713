"""Poll an S3 prefix (ListObjectsV2) for stores without bucket notifications.

``pairwatch watch poll s3://BUCKET/PREFIX`` lists the prefix every ``poll_interval`` seconds
(SeaweedFS, Ceph without a notifier, any S3 API) and handles each object it has not seen with
that ETag before. Its memory is the last listing, so a restart re-lists everything: pairs whose
result already records the same inputs are skipped, the rest are done then.
"""

from __future__ import annotations

import argparse
import time

from botocore.exceptions import BotoCoreError, ClientError

from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.errors import PairError
from handler.events import Parsed
from handler.logs import get_logger
from watcher.bucket import (
    EXIT_FAILED,
    EXIT_OK,
    BucketURL,
    add_endpoint_options,
    build_jobs,
    list_events,
    parse_s3_url,
    sleep_unless_stopped,
)
from watcher.shutdown import StopFlag, stop_on_signals


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", type=parse_s3_url, metavar="s3://BUCKET/PREFIX")
    add_endpoint_options(parser)
    parser.add_argument(
        "--interval",
        type=_seconds,
        metavar="SECONDS",
        help="seconds between two listings (default 10; PAIRWATCH_POLL_INTERVAL)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="list and process once, then exit (status 1 if anything failed)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    url: BucketURL = args.url
    log = get_logger(bucket=url.bucket, prefix=url.prefix)
    try:
        jobs = build_jobs(settings, args.endpoint_url, args.region, prefix=url.prefix)
    except PairError as exc:
        log.error("comparator_unavailable", error_type=exc.type, error=exc.message)
        return EXIT_FAILED
    interval = args.interval or settings.poll_interval
    poller = Poller(jobs, url)
    log.info("watch_started", source="poll", interval_s=interval)
    try:
        with stop_on_signals() as stop:
            while True:
                clean = poller.scan(stop)
                if args.once:
                    return EXIT_OK if clean else EXIT_FAILED
                sleep_unless_stopped(stop, interval)
                if stop.requested:
                    break
    finally:
        jobs.comparator.close()
    log.info("watch_stopped")
    return EXIT_OK


class Poller:
    """Remembers the ETag each key had when it was last handled successfully."""

    def __init__(self, jobs: BucketJobs, url: BucketURL) -> None:
        self.jobs = jobs
        self.url = url
        self.seen: dict[str, str | None] = {}
        #: Key -> monotonic time it must be handled again (a lone image's pair_timeout).
        self.recheck: dict[str, float] = {}
        self.log = get_logger(bucket=url.bucket, prefix=url.prefix)

    def scan(self, stop: StopFlag) -> bool:
        """One pass; False if the listing or any object failed (it is retried next pass)."""
        started = time.perf_counter()
        listed: set[str] = set()
        handled = failed = 0
        try:
            for event in list_events(self.jobs, self.url.bucket, self.url.prefix):
                if stop.requested:
                    break
                listed.add(event.key)
                due = self.recheck.get(event.key)
                if self.seen.get(event.key, "") == event.etag and (
                    due is None or due > time.monotonic()
                ):
                    continue
                handled += 1
                delivery = self.jobs.handle_parsed(Parsed(events=[event]))
                self.recheck.pop(event.key, None)
                if delivery.transient:
                    failed += 1
                    self.seen.pop(event.key, None)
                    continue
                # Rejected keys are remembered too: they fail the same way until replaced.
                self.seen[event.key] = event.etag
                if not delivery.ok:
                    failed += 1
                if delivery.retry_in is not None:
                    self.recheck[event.key] = time.monotonic() + delivery.retry_in
        except (BotoCoreError, ClientError) as exc:
            self.log.error("list_failed", error=str(exc))
            return False
        if not stop.requested:
            # Forget deleted objects, so memory follows the bucket rather than its history.
            self.seen = {k: v for k, v in self.seen.items() if k in listed}
            self.recheck = {k: v for k, v in self.recheck.items() if k in listed}
        self.log.debug(
            "poll_pass",
            objects=len(listed),
            handled=handled,
            failed=failed,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return failed == 0
