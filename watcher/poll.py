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

from handler.bucket_jobs import BucketJobs, Delivery
from handler.config import Settings
from handler.errors import PairError
from handler.events import Parsed
from handler.logs import elapsed_ms, get_logger
from watcher import metrics
from watcher.args import EXIT_FAILED, EXIT_OK, positive_seconds
from watcher.bucket import (
    RETRY_DELAYS,
    BucketURL,
    add_endpoint_options,
    build_jobs,
    list_events,
    parse_s3_url,
    sleep_unless_stopped,
)
from watcher.shutdown import StopFlag, stop_on_signals


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", type=parse_s3_url, metavar="s3://BUCKET/PREFIX")
    add_endpoint_options(parser)
    parser.add_argument(
        "--interval",
        type=positive_seconds,
        metavar="SECONDS",
        help="seconds between two listings (default 10; PAIRWATCH_POLL_INTERVAL)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="list and process once, then exit (status 1 if a listing or delivery failed or "
        "a pair's result is not ok)",
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
    """Remembers the ETag each key had when it was last handled.

    A key is handled again when its ETag changes, or when it is due in ``recheck``: a lone
    image at its pair_timeout, or a transient failure (an unwritable output, throttling) after
    the next of ``RETRY_DELAYS``. The last delay then repeats: the key is still listed, and a
    manifest waiting for its images must be looked at until its pair_timeout, but a failure
    that persists costs one comparison every few minutes rather than one per listing.
    """

    def __init__(self, jobs: BucketJobs, url: BucketURL) -> None:
        self.jobs = jobs
        self.url = url
        self.seen: dict[str, str | None] = {}
        #: Key -> monotonic time it must be handled again.
        self.recheck: dict[str, float] = {}
        #: Key -> transient failures in a row (the index of its next delay in RETRY_DELAYS).
        self.failures: dict[str, int] = {}
        self.log = get_logger(bucket=url.bucket, prefix=url.prefix)

    def scan(self, stop: StopFlag) -> bool:
        """One pass; False if the listing, a delivery or a pair failed."""
        started = time.perf_counter()
        listed: set[str] = set()
        handled = failed = 0
        try:
            for event in list_events(self.jobs, self.url.bucket, self.url.prefix):
                if stop.requested:
                    break
                listed.add(event.key)
                unchanged = self.seen.get(event.key, "") == event.etag
                due = self.recheck.get(event.key)
                if unchanged and (due is None or due > time.monotonic()):
                    continue
                handled += 1
                failures = self.failures.pop(event.key, 0)
                if not unchanged:
                    failures = 0  # a replaced object starts afresh
                delivery = self.jobs.handle_parsed(Parsed(events=[event]))
                metrics.record_delivery(delivery, "poll", 1)
                self.recheck.pop(event.key, None)
                # Rejected keys are remembered too: they fail the same way until replaced.
                self.seen[event.key] = event.etag
                if delivery.transient:
                    failed += 1
                    delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                    self.failures[event.key] = failures + 1
                    self.recheck[event.key] = time.monotonic() + delay
                    self.log.info(
                        "retry_scheduled", key=event.key, attempts=failures + 1, delay_s=delay
                    )
                    continue
                if not delivery.ok or _any_pair_failed(delivery):
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
            self.failures = {k: v for k, v in self.failures.items() if k in listed}
        self.log.debug(
            "poll_pass",
            objects=len(listed),
            handled=handled,
            failed=failed,
            duration_ms=elapsed_ms(started),
        )
        return failed == 0


def _any_pair_failed(delivery: Delivery) -> bool:
    """A result that is not ok, new or already there (as ``watch DIR --once`` counts them)."""
    return any(report.failed for result in delivery.results for report in result.reports)
