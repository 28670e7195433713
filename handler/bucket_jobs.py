"""From "this object was created" to an up-to-date result, for every S3/MinIO entry point.

The Lambda handler, the SQS worker, the MinIO listener and the poller all end here with an
``ObjectEvent``; the pair rules themselves are ``handler.jobs`` over an ``S3Storage``. Handling
an event returns its ``Disposition`` (``handler.disposition``), decided here and in the job:

* done: ignored (not a creation, the handler's own output, outside the configured prefix, not
  an image or manifest: debug log), or every pair it touches is done (see ``handler.jobs``);
* retry: a pair needs another look (a lone image: ``at`` = when its partner is due; a failure
  of the moment; the store unavailable; a manifest whose images are on their way);
* reject: a hostile key, a malformed record, or a bucket pairwatch will not touch (not a
  bucket name, not in ``allowed_buckets``, missing): it never succeeds, so it is logged
  (``event_rejected``), counted, and a queue's dead-letter policy ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from handler import disposition
from handler.aws_clients import s3_client
from handler.buckets import check_bucket
from handler.compare.base import Comparator
from handler.config import Settings
from handler.deadline import Deadline, current_or_new
from handler.disposition import Disposition
from handler.errors import BucketRefused, PairError, StorageUnavailable
from handler.events import ObjectEvent, Parsed
from handler.jobs import JobReport, run_pair_job
from handler.logs import get_logger
from handler.manifests import Readers, manifests_beside, no_readers, pairs_touched
from handler.pairs import (
    PairSpec,
    is_image_name,
    is_relevant_name,
    normalise_prefix,
)
from handler.s3_storage import S3Storage, check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class EventReport:
    """What became of one object event: its fate and the jobs it ran."""

    event: ObjectEvent
    disposition: Disposition
    reports: tuple[JobReport, ...] = ()


@dataclass
class Delivery:
    """What became of one delivery (an SQS message, a stream record, an invocation)."""

    disposition: Disposition
    events: list[EventReport] = field(default_factory=list)

    @property
    def reports(self) -> list[JobReport]:
        return [report for event in self.events for report in event.reports]


class BucketJobs:
    """Processes object events for buckets under ``prefix`` ("" = whole bucket)."""

    def __init__(
        self,
        settings: Settings,
        comparator: Comparator,
        client: S3Client,
        *,
        prefix: str = "",
    ) -> None:
        self.settings = settings
        self.comparator = comparator
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        comparator: Comparator,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str | None = None,
    ) -> BucketJobs:
        """A process's bucket jobs (the Lambda, every bucket watcher, serve's webhook): one S3
        client for ``endpoint_url``/``region`` (the AWS chain's when None), and ``prefix``
        (already normalised: a watched ``s3://BUCKET/PREFIX``) or else ``input_prefix``
        (``PairError`` when it is not a safe key prefix)."""
        if prefix is None:
            prefix = normalise_prefix(settings.input_prefix)
        return cls(settings, comparator, s3_client(endpoint_url, region), prefix=prefix)

    def storage(self, bucket: str) -> S3Storage:
        """A fresh storage per event: its HEAD and listing caches and seen-result ETags belong
        to the jobs of one event."""
        return S3Storage(
            self.client,
            bucket,
            self.prefix,
            output_bucket=self.settings.output_bucket,
            output_prefix=self.settings.output_prefix,
            max_pixels=self.settings.max_input_pixels,
        )

    def handle(
        self,
        event: ObjectEvent,
        *,
        now: float,
        readers: Readers = no_readers,
        queued_ms: float | None = None,
        deadline: Deadline | None = None,
    ) -> EventReport:
        """Bring every pair ``event`` touches up to date.

        ``deadline``: the first pair's (the thread's current one, started by whoever took the
        event, else a new one); each further pair of the event gets as long again from when it
        starts (``Deadline.renewed``).

        ``readers``: manifests known (to a long-running caller: its ``ManifestIndex``) to read
        the object (by its path relative to the prefix), beyond the manifests beside it, which
        are always re-run. A stateless caller (the Lambda, one of several SQS workers) knows
        none: a manifest naming an image in another prefix is then re-run by its own event only.
        """
        log = get_logger(bucket=event.bucket, key=event.key)
        try:
            self._check_bucket(event.bucket)
            return self._handle(event, now, readers, queued_ms, deadline or self._deadline())
        except BucketRefused as exc:
            log.error("event_rejected", error_type="bucket_refused", error=str(exc))
            return EventReport(event, disposition.reject(str(exc)))

    def _check_bucket(self, bucket: str) -> None:
        """``BucketRefused`` unless ``bucket`` is a bucket name in ``allowed_buckets``."""
        check_bucket(bucket)
        allowed = self.settings.allowed_buckets
        if allowed is not None and bucket not in allowed:
            raise BucketRefused(f"bucket {bucket!r} is not in allowed_buckets")

    def _handle(
        self,
        event: ObjectEvent,
        now: float,
        readers: Readers,
        queued_ms: float | None,
        first: Deadline,
    ) -> EventReport:
        log = get_logger(bucket=event.bucket, key=event.key)
        storage = self.storage(event.bucket)
        relative = storage.relative(event.key)
        ignored = _ignored(event, storage, relative)
        if ignored is not None or relative is None:
            log.debug("event_ignored", reason=ignored)
            return EventReport(event, disposition.done(f"ignored: {ignored}"))
        try:
            check_key(event.key)
        except PairError as exc:
            log.error("event_rejected", error_type=exc.type, error=exc.message)
            return EventReport(event, disposition.reject(exc.message))
        beside: list[PairSpec] = []
        if is_image_name(relative):
            try:
                with first.applied():
                    beside = manifests_beside(storage, relative)
            except StorageUnavailable as exc:
                log.error("storage_unavailable", error_type=type(exc).__name__, error=str(exc))
                return EventReport(event, disposition.retry(f"storage unavailable: {exc}"))
            except PairError as exc:
                # Its own pair meets the same problem and records it in its result.
                log.warning("manifests_unlisted", error_type=exc.type, error=exc.message)
        specs = pairs_touched(relative, readers, beside)
        if not specs:
            log.debug("event_ignored", reason="hidden, temporary or not in a pair folder")
            return EventReport(event, disposition.done("ignored: not in a pair"))
        reports = tuple(
            run_pair_job(
                storage,
                spec,
                self.settings,
                self.comparator,
                now=now,
                queued_ms=queued_ms,
                deadline=first if index == 0 else first.renewed(),
            )
            for index, spec in enumerate(specs)
        )
        return EventReport(event, disposition.combine(r.disposition for r in reports), reports)

    def _deadline(self) -> Deadline:
        return current_or_new(self.settings.comparison.processing_timeout)

    def handle_parsed(
        self,
        parsed: Parsed,
        *,
        now: float,
        readers: Readers = no_readers,
        queued_ms: float | None = None,
        deadline: Deadline | None = None,
        **context: object,
    ) -> Delivery:
        """Handle every event of one delivery; its disposition combines theirs.

        Every record is attempted even after one failed: a redelivery repeats the good ones
        cheaply (their results are up to date) and the bad one is reported on its own. The
        first event's first pair has ``deadline`` (see ``handle``); every other pair its own.
        """
        log = get_logger(**context)
        fates: list[Disposition] = []
        for error in parsed.errors:
            log.error("event_malformed", error=str(error))
            fates.append(disposition.reject(f"malformed event: {error}"))
        first = deadline or self._deadline()
        events = [
            self.handle(
                event,
                now=now,
                readers=readers,
                queued_ms=queued_ms,
                deadline=first if index == 0 else first.renewed(),
            )
            for index, event in enumerate(parsed.events)
        ]
        fates += [report.disposition for report in events]
        return Delivery(disposition.combine(fates), events)


def _ignored(event: ObjectEvent, storage: S3Storage, relative: str | None) -> str | None:
    """Why ``event`` is no concern of ours, or None when it may complete a pair."""
    if event.kind != "created":
        return f"not a creation ({event.name or event.kind})"
    if storage.is_own_output(event.bucket, event.key):
        return "own output"
    if relative is None:
        return f"outside the prefix {storage.prefix!r}"
    if not is_relevant_name(relative):
        return "not an image or manifest"
    return None
