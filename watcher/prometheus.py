"""Prometheus metrics, with the same names in ``pairwatch serve`` and in every watcher.

One module defines them all, so a dashboard built on ``serve`` works on ``watch sqs`` too. The
watchers expose them with ``--metrics-port PORT`` (``start_metrics_server``); ``serve`` answers
them on ``GET /metrics`` (``render``). Callers report what happened through the ``record_*``
functions; nothing here knows how a pair is compared.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

if TYPE_CHECKING:
    from handler.bucket_jobs import Delivery, EventReport
    from handler.jobs import JobReport
    from handler.result import ComparisonResult

#: The stages of a pair, in order; ``timings_ms`` keys of a result with these names are observed.
STAGES = ("fetch", "prepare", "detect", "compare", "write")

PAIRS = Counter(
    "pairwatch_pairs_total",
    "Pairs compared, by source (http, webhook, folder, sqs, minio, poll), comparator and status.",
    ["source", "comparator", "status"],
)
PAIR_ERRORS = Counter(
    "pairwatch_pair_errors_total", "Failed pairs by error.type (result.error.type).", ["type"]
)
STAGE_SECONDS = Histogram(
    "pairwatch_stage_seconds",
    "Seconds one pair spent in a stage (fetch, prepare, detect, compare, write).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
QUEUE_DEPTH = Gauge(
    "pairwatch_queue_depth",
    "Pairs waiting for a comparison slot (serve: admitted requests; watchers: queued keys).",
)
IN_FLIGHT = Gauge(
    "pairwatch_in_flight", "Pairs being compared right now (watchers: units of work running)."
)
VL_VISUAL_TOKENS = Histogram(
    "pairwatch_vl_visual_tokens",
    "Visual tokens the VL model saw per pair (all its pictures: overviews and crops).",
    buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
)
VL_PEAK_MEMORY = Histogram(
    "pairwatch_vl_peak_memory_bytes",
    "Peak GPU memory the VL model allocated per pair.",
    buckets=tuple(float(2**n) for n in range(24, 38)),  # 16 MiB .. 128 GiB
)
EVENTS = Counter(
    "pairwatch_events_total",
    "Object notifications by source (aws:s3, minio:s3, seaweedfs:filer, ...) and outcome.",
    ["source", "outcome"],
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (the watchers' endpoint)."""
    start_http_server(port, addr=host)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def record_result(
    result: ComparisonResult, source: str, *, stages: Mapping[str, float] | None = None
) -> None:
    """Count one finished pair. ``stages`` (seconds) adds stages the result does not time,
    such as ``fetch`` for an upload or ``write`` for a stored result."""
    PAIRS.labels(source, result.comparator.name, result.status).inc()
    if result.error is not None:
        PAIR_ERRORS.labels(result.error.type).inc()
    timings = {k: v / 1000 for k, v in result.timings_ms.items() if k in STAGES}
    for stage, seconds in {**timings, **(stages or {})}.items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    if result.vl is not None:
        if result.vl.visual_tokens is not None:
            VL_VISUAL_TOKENS.observe(result.vl.visual_tokens)
        if result.vl.peak_memory_mb is not None:
            VL_PEAK_MEMORY.observe(result.vl.peak_memory_mb * 2**20)


def record_report(report: JobReport, source: str) -> None:
    """Count a job's pair if it compared one (a skipped or waiting pair is not a new result),
    with the ``fetch`` and ``write`` stages the job timed."""
    if report.action in ("written", "unwritable") and report.result is not None:
        record_result(report.result, source, stages=report.stages)


def record_delivery(delivery: Delivery, source: str) -> None:
    """Count one delivery's events by outcome (``event_outcome``); the pairs its jobs compared
    are the runner's to count (``Runner.record``)."""
    for handled in delivery.events:
        record_event_report(handled, source)


def record_event_report(handled: EventReport, source: str) -> None:
    """Count one event by outcome (its jobs' pairs: ``Runner.record``)."""
    EVENTS.labels(handled.event.source or source, event_outcome(handled)).inc()


def event_outcome(handled: EventReport) -> str:
    """``rejected`` for a record that never succeeds (a hostile key, a refused bucket);
    ``failed`` for one that needs another delivery (a failure of the moment); else what its
    last job did (``written``, ``skipped``, ``waiting``...), or ``ignored``."""
    fate = handled.disposition
    if fate.is_reject:
        return "rejected"
    if fate.is_retry and fate.at is None:
        return "failed"
    return handled.reports[-1].action if handled.reports else "ignored"


def record_event(source: str, outcome: str, count: int = 1) -> None:
    EVENTS.labels(source, outcome).inc(count)


@contextmanager
def in_flight() -> Iterator[None]:
    """Count a pair as being compared for the duration of the block."""
    IN_FLIGHT.inc()
    try:
        yield
    finally:
        IN_FLIGHT.dec()
