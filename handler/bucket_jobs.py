"""From "this object was created" to an up-to-date result, for every S3/MinIO entry point.

The Lambda handler, the SQS worker, the MinIO listener and the poller all end here with an
``ObjectEvent``; the pair rules themselves are ``handler.jobs`` over an ``S3Storage``.

What an event can come to:

* ignored (debug log, the message is acknowledged): not a creation, the handler's own output
  (``result.json``, ``*.result.json``, diff images, anything under ``output_prefix``), outside the
  configured prefix, not an image or manifest;
* ``waiting``: the first image of a pair folder; acknowledged without work, because its
  partner's own event completes the pair;
* ``written`` / ``skipped`` (the result already records the same inputs) / ``raced`` (another
  worker's conditional write won);
* raised ``PairError`` (a hostile key): an error for that record only, never retried into success;
* raised ``InputsPending``: a manifest whose images have not all arrived, younger than
  ``pair_timeout``: retry later (SQS redelivers it);
* anything else raised (throttling, network, an unwritable output) is transient: retry.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from handler.compare.base import Comparator
from handler.config import Settings
from handler.errors import PairError
from handler.events import ObjectEvent, Parsed
from handler.jobs import JobReport, PairSpec, pairs_for_name, run_pair_job
from handler.logs import get_logger
from handler.pairs import is_image_name, is_manifest_name, is_relevant_name
from handler.s3_storage import ResultConflict, S3Storage, check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

Handled = Literal["ignored", "waiting", "written", "skipped", "raced", "none"]


class InputsPending(Exception):
    """A manifest names an image that has not arrived yet; retry in ``retry_in`` seconds."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class OutputUnwritable(Exception):
    """The comparison ran but its result could not be stored: retry the record."""


@dataclass
class EventResult:
    event: ObjectEvent
    outcome: Handled
    reports: list[JobReport] = field(default_factory=list)
    #: For ``waiting``: when a lone image would turn into ``incomplete_pair`` (pollers use it).
    retry_in: float | None = None


@dataclass
class Delivery:
    """What became of one delivery (an SQS message, a stream record, an invocation)."""

    ok: bool
    #: Some record may succeed when retried (pending inputs, throttling, network); rejected
    #: and malformed records never will.
    transient: bool = False
    results: list[EventResult] = field(default_factory=list)
    #: Seconds until a lone image of it turns into ``incomplete_pair`` (look again then).
    retry_in: float | None = None


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

    def storage(self, bucket: str) -> S3Storage:
        """A fresh storage per job: its HEAD cache and seen-result ETags belong to one job."""
        return S3Storage(
            self.client,
            bucket,
            self.prefix,
            output_bucket=self.settings.output_bucket,
            output_prefix=self.settings.output_prefix,
            max_pixels=self.settings.max_input_pixels,
        )

    def handle(self, event: ObjectEvent) -> EventResult:
        log = get_logger(bucket=event.bucket, key=event.key)
        if event.kind != "created":
            log.debug("event_ignored", reason=f"not a creation ({event.name or event.kind})")
            return EventResult(event, "ignored")
        storage = self.storage(event.bucket)
        if storage.is_own_output(event.bucket, event.key):
            log.debug("event_ignored", reason="own output")
            return EventResult(event, "ignored")
        relative = storage.relative(event.key)
        if relative is None:
            log.debug("event_ignored", reason="outside the prefix", prefix=storage.prefix)
            return EventResult(event, "ignored")
        if not is_relevant_name(relative):
            log.debug("event_ignored", reason="not an image or manifest")
            return EventResult(event, "ignored")
        try:
            check_key(event.key)
        except PairError as exc:
            log.error("event_rejected", error_type=exc.type, error=exc.message)
            raise
        specs = pairs_for_name(relative)
        if is_image_name(relative):
            specs += _sibling_manifests(storage, relative)
        if not specs:
            log.debug("event_ignored", reason="hidden, temporary or not in a pair folder")
            return EventResult(event, "ignored")
        result = EventResult(event, "none")
        for spec in specs:
            try:
                report = run_pair_job(storage, spec, self.settings, self.comparator)
            except ResultConflict:
                log.info("pair_skipped", pair_id=spec.pair_id, reason="another worker wrote it")
                result.outcome = "raced"
                continue
            result.reports.append(report)
            if report.outcome == "unwritable":
                raise OutputUnwritable(f"result for {spec.pair_id} could not be written")
            if report.outcome == "waiting":
                log.info("pair_waiting", pair_id=spec.pair_id, retry_in=report.retry_in)
                result.retry_in = report.retry_in
            if spec.path == relative:  # the manifest's own event: its images may be on the way
                self._check_pending(storage, report)
            result.outcome = report.outcome
        return result

    def _check_pending(self, storage: S3Storage, report: JobReport) -> None:
        """A manifest uploaded before its images: its error result stands, but ask for a retry
        while the images may still be on their way (nothing else would re-run the manifest)."""
        error = report.result.error if report.result else None
        if error is None or error.type != "input_not_found":
            return
        try:
            age = time.time() - storage.landed_at(report.spec.path)
        except PairError:
            return
        if age < self.settings.pair_timeout:
            raise InputsPending(
                f"{report.spec.path}: {error.message}", retry_in=self.settings.pair_timeout - age
            )

    def handle_parsed(self, parsed: Parsed, **context: object) -> Delivery:
        """Handle every event of one delivery; ``ok`` is False when any record needs a retry.

        Every record is attempted even after one failed: a redelivery repeats the good ones
        cheaply (their results are up to date) and the bad one is reported on its own.
        """
        log = get_logger(**context)
        delivery = Delivery(ok=not parsed.errors)
        for error in parsed.errors:
            log.error("event_malformed", error=str(error))
        for event in parsed.events:
            try:
                result = self.handle(event)
            except InputsPending as exc:
                log.info("pair_pending", key=event.key, reason=str(exc), gives_up_in=exc.retry_in)
                delivery.ok = False
                delivery.transient = True
                continue
            except PairError:
                delivery.ok = False  # logged as event_rejected
                continue
            except Exception as exc:
                # Transient (throttling, network, unwritable output): the record is retried.
                log.error(
                    "event_failed",
                    bucket=event.bucket,
                    key=event.key,
                    error_type=type(exc).__name__,
                    error=str(exc),
                )
                delivery.ok = False
                delivery.transient = True
                continue
            delivery.results.append(result)
            delivery.retry_in = _earliest(delivery.retry_in, result.retry_in)
        return delivery


def _sibling_manifests(storage: S3Storage, image: str) -> list[PairSpec]:
    """Manifests beside a new or replaced image: it may be one of their inputs. Each re-run is
    cheap when it is not (the recorded ETags match: HEADs, no download)."""
    folder = posixpath.dirname(image)
    return [
        PairSpec("manifest", posixpath.join(folder, name))
        for name in storage.list_names(folder)
        if is_manifest_name(name)
    ]


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
