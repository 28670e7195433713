"""The serverless entry point: ``handler.app.lambda_handler``.

Accepts an SQS batch (S3 -> SQS, S3 -> SNS -> SQS or EventBridge -> SQS), a direct S3 / SNS /
EventBridge invocation, or anything else ``handler.events`` parses. The settings, the S3 client
and the comparator (a loaded model, for ``vl``) are built once per container, on the first
invocation, and reused by every later one.

For an SQS batch the answer is ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}``
(enable ``ReportBatchItemFailures`` on the event source mapping): only the failed messages are
retried and a poison message reaches the queue's dead-letter queue on its own. When less than
``lambda_min_remaining_ms`` is left, the messages not yet started are handed back the same way
instead of being cut off by the Lambda timeout half-way through a pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from handler.bucket_jobs import BucketJobs
from handler.compare import create_comparator
from handler.config import Settings, load_settings
from handler.events import is_sqs_event, lambda_sqs_messages, parse_notification
from handler.logs import configure_logging, elapsed_ms, get_logger
from handler.s3_storage import normalise_prefix, s3_client


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    jobs: BucketJobs


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The per-container state, built on first use (``PAIRWATCH_*`` environment settings)."""
    global _runtime
    if _runtime is None:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        comparator = create_comparator(settings)
        _runtime = Runtime(
            settings,
            BucketJobs(
                settings, comparator, s3_client(), prefix=normalise_prefix(settings.input_prefix)
            ),
        )
    return _runtime


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    rt = runtime()
    return handle_event(event, context, rt.jobs, rt.settings)


def handle_event(event: Any, context: Any, jobs: BucketJobs, settings: Settings) -> dict[str, Any]:
    """``lambda_handler`` with its collaborators passed in (tests and other runtimes)."""
    log = get_logger(request_id=getattr(context, "aws_request_id", None))
    started = time.perf_counter()
    if not is_sqs_event(event):
        delivery = jobs.handle_parsed(parse_notification(event))
        log.info(
            "invocation_done",
            events=len(delivery.results),
            ok=delivery.ok,
            duration_ms=elapsed_ms(started),
        )
        if not delivery.ok:
            # Lambda's own retries (and on-failure destination) apply to direct invocations.
            raise RuntimeError("some records failed; see the event_* log lines")
        return {"events": len(delivery.results)}

    failures: list[dict[str, str]] = []
    messages = lambda_sqs_messages(event)
    for index, message in enumerate(messages):
        left = _remaining_ms(context)
        if left is not None and left < settings.lambda_min_remaining_ms:
            rest = messages[index:]
            log.warning(
                "batch_stopped_early",
                remaining_ms=left,
                handed_back=len(rest),
                min_remaining_ms=settings.lambda_min_remaining_ms,
            )
            failures.extend({"itemIdentifier": m.message_id} for m in rest)
            break
        delivery = jobs.handle_parsed(message.parse(), message_id=message.message_id)
        if not delivery.ok:
            failures.append({"itemIdentifier": message.message_id})
    log.info(
        "batch_done",
        messages=len(messages),
        failed=len(failures),
        duration_ms=elapsed_ms(started),
    )
    return {"batchItemFailures": failures}


def _remaining_ms(context: Any) -> int | None:
    getter = getattr(context, "get_remaining_time_in_millis", None)
    if getter is None:
        return None
    remaining: int = getter()
    return remaining
