"""Poll an S3 prefix (ListObjectsV2) for stores without bucket notifications.

``pairwatch watch poll s3://BUCKET/PREFIX`` lists the prefix every ``poll_interval`` seconds
(SeaweedFS, Ceph without a notifier, any S3 API) and offers the runner each object it has not
seen with that ETag before. Its memory is the last listing, so a restart re-lists everything:
pairs whose result already records the same inputs are skipped, the rest are done then. A key
that must be looked at again (a lone image, a failure of the moment) is the runner's recheck,
not a matter of the next listing. The listing runs on a thread of its own, so a store that
hangs never delays SIGTERM.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.disposition import Disposition
from handler.events import ObjectEvent
from handler.logs import elapsed_ms, get_logger
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BucketURL
from watcher.runner import Runner
from watcher.sources.bucket import bucket_refused, list_events, run_event
from watcher.sources.command import watch


def run(args: argparse.Namespace, settings: Settings) -> int:
    url: BucketURL = args.url
    if bucket_refused(settings, url.bucket):
        return EXIT_USAGE

    def build(runner: Runner[Any]) -> PollSource:
        jobs = BucketJobs.from_settings(
            settings,
            runner.comparator,
            endpoint_url=args.endpoint_url,
            region=args.region,
            prefix=url.prefix,
        )
        return PollSource(jobs, url, runner, interval=settings.poll_interval, once=args.once)

    watched = watch(
        settings,
        build,
        log=get_logger(bucket=url.bucket, prefix=url.prefix),
        started=lambda runner: {"source": "poll", "interval_s": settings.poll_interval},
    )
    if watched is None:
        return EXIT_FAILED
    if args.once and not watched.stop.requested and watched.source.failed:
        return EXIT_FAILED
    return EXIT_OK


class PollSource:
    """A bucket prefix, listed periodically, as a source of object keys for a ``Runner``."""

    def __init__(
        self,
        jobs: BucketJobs,
        url: BucketURL,
        runner: Runner[str],
        *,
        interval: float,
        once: bool = False,
    ) -> None:
        self.jobs = jobs
        self.url = url
        self.runner = runner
        self.interval = interval
        self.once = once
        #: Key -> the ETag it had when last offered.
        self.seen: dict[str, str | None] = {}
        #: ``--once``: a listing failed, or a pair's result is not ok.
        self.failed = False
        self._listed: deque[ObjectEvent] = deque()
        self._passes = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.log = get_logger(bucket=url.bucket, prefix=url.prefix)

    def start(self) -> None:
        threading.Thread(target=self._list_loop, name="s3-poll", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def finished(self) -> bool:
        with self._lock:
            return self.once and self._passes > 0 and not self._listed

    def next_wait(self) -> float | None:
        return None

    def pump(self) -> None:
        """Offer what the last listing found new or changed, while the queue has room."""
        while True:
            with self._lock:
                if not self._listed:
                    return
                event = self._listed[0]
            if self.seen.get(event.key, "") != event.etag:
                self.runner.rechecks.clear(event.key)  # a replaced object starts afresh
                if not self.runner.offer(event.key, partial(self._work, event)):
                    return  # the queue is full: the rest waits for the next pump
                self.seen[event.key] = event.etag
            with self._lock:
                self._listed.popleft()

    # -- listing (its own thread) -------------------------------------------------------------

    def _list_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                busy = bool(self._listed)
            if not busy:
                self._list_once()
                if self.once:
                    return
            self._stopped.wait(self.interval)

    def _list_once(self) -> None:
        started = time.perf_counter()
        try:
            events = list(list_events(self.jobs, self.url.bucket, self.url.prefix))
        except Exception as exc:  # botocore errors after the client's bounded attempts
            self.log.error("list_failed", error_type=type(exc).__name__, error=str(exc))
            with self._lock:
                self.failed = True
                self._passes += 1
            self.runner.wake()
            return
        listed = {event.key for event in events}
        with self._lock:
            self._listed.extend(events)
            self._passes += 1
            # Forget deleted objects, so memory follows the bucket rather than its history.
            self.seen = {k: v for k, v in self.seen.items() if k in listed}
        self.log.debug("poll_pass", objects=len(events), duration_ms=elapsed_ms(started))
        self.runner.wake()

    # -- one key (a runner worker thread) -----------------------------------------------------

    def _work(self, event: ObjectEvent, queued_ms: float) -> Disposition:
        report = run_event(self.jobs, self.runner, event, queued_ms, "poll")
        fate = report.disposition
        if fate.is_reject or (fate.is_retry and fate.at is None):
            self.failed = True
        if any(job.failed for job in report.reports):
            self.failed = True  # as ``watch DIR --once`` counts them (existing results too)
        return fate
