"""The serverless entry point: ``handler.app.lambda_handler``.

Accepts an SQS batch (S3 -> SQS, S3 -> SNS -> SQS or EventBridge -> SQS), a direct S3 / SNS /
EventBridge invocation, or anything else ``handler.events`` parses. The settings, the S3 and SQS
clients and the comparator (a loaded model, for ``vl``) are built once per container, on the
first invocation, and reused by every later one.

An SQS batch runs ``concurrency`` messages at once (a small thread pool; the same pair is never
run twice at once, see ``handler.locks``). Each message's ``Disposition`` decides its fate:

* done: not named in the answer, so the event source mapping deletes it;
* retry: named in ``{"batchItemFailures": [...]}`` (enable ``ReportBatchItemFailures``), and its
  visibility is set to when it is due: a lone image's message comes back when its partner is
  due (at most SQS's 12 hours), so ``pair_timeout`` holds here too and the pair gets its
  ``incomplete_pair`` result if the partner never comes; a failure of the moment comes back
  after the back-off for its ``ApproximateReceiveCount``. The queue's ``maxReceiveCount`` and
  dead-letter queue decide the end;
* reject (a hostile key, a malformed record): named in the answer and left alone: redelivered
  after the visibility timeout, it ends in the dead-letter queue.

When less than ``lambda_min_remaining_ms`` is left, the messages not yet started are handed back
the same way instead of being cut off by the Lambda timeout half-way through a pair.

Direct invocations have no message to delay: a failure of the moment or a rejected record
raises (Lambda's own retries and on-failure destination apply); a lone image is acknowledged
(its partner's own event completes the pair; no ``incomplete_pair`` without a queue).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from handler.aws_clients import sqs_client
from handler.bucket_jobs import BucketJobs
from handler.compare import create_comparator, resolve_concurrency
from handler.config import Settings, load_settings
from handler.disposition import Disposition
from handler.events import QueueMessage, is_sqs_event, lambda_sqs_messages, parse_notification
from handler.logs import configure_logging, elapsed_ms, get_logger

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient


@dataclass
class Runtime:
    settings: Settings
    jobs: BucketJobs
    sqs: SQSClient | None = None
    #: Queue ARN -> queue URL (found once per container).
    queue_urls: dict[str, str] = field(default_factory=dict)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The per-container state, built on first use (``PAIRWATCH_*`` environment settings)."""
    global _runtime
    if _runtime is None:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        comparator = create_comparator(settings)
        comparator.wait_ready()
        jobs = BucketJobs.from_settings(settings, comparator)
        _runtime = Runtime(settings, jobs, sqs_client())
    return _runtime


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    rt = runtime()
    return handle_event(event, context, rt)


def handle_event(event: Any, context: Any, rt: Runtime) -> dict[str, Any]:
    """``lambda_handler`` with its collaborators passed in (tests and other runtimes)."""
    log = get_logger(request_id=getattr(context, "aws_request_id", None))
    started = time.perf_counter()
    if not is_sqs_event(event):
        return _direct(event, rt, log, started)
    messages = lambda_sqs_messages(event)
    handed_back = threading.Event()

    def one(message: QueueMessage) -> bool:
        """True when the message must come back (listed in batchItemFailures)."""
        left = _remaining_ms(context)
        if handed_back.is_set() or (
            left is not None and left < rt.settings.lambda_min_remaining_ms
        ):
            if not handed_back.is_set():
                handed_back.set()
                log.warning(
                    "batch_stopped_early",
                    remaining_ms=left,
                    min_remaining_ms=rt.settings.lambda_min_remaining_ms,
                )
            return True
        delivery = rt.jobs.handle_parsed(
            message.parse(), now=time.time(), message_id=message.message_id
        )
        fate = delivery.disposition
        if fate.is_retry:
            _delay(rt, message, fate, log)
        elif fate.is_reject:
            log.error("message_rejected", message_id=message.message_id, reason=fate.reason)
        return not fate.is_done

    with ThreadPoolExecutor(resolve_concurrency(rt.settings), thread_name_prefix="pair") as pool:
        back = list(pool.map(one, messages))
    failures = [
        {"itemIdentifier": m.message_id} for m, failed in zip(messages, back, strict=True) if failed
    ]
    log.info(
        "batch_done",
        messages=len(messages),
        failed=len(failures),
        duration_ms=elapsed_ms(started),
    )
    return {"batchItemFailures": failures}


def _direct(event: Any, rt: Runtime, log: Any, started: float) -> dict[str, Any]:
    delivery = rt.jobs.handle_parsed(parse_notification(event), now=time.time())
    fate = delivery.disposition
    log.info(
        "invocation_done",
        events=len(delivery.events),
        disposition=fate.kind,
        duration_ms=elapsed_ms(started),
    )
    if fate.is_reject or (fate.is_retry and fate.at is None):
        # Lambda's own retries (and on-failure destination) apply to direct invocations.
        raise RuntimeError(f"some records failed ({fate.reason}); see the event_* log lines")
    return {"events": len(delivery.events)}


def _delay(rt: Runtime, message: QueueMessage, fate: Disposition, log: Any) -> None:
    """Keep a retried message invisible until it is due (partner due, or the back-off)."""
    seconds = message.left_for_retry(fate, time.time(), log)
    url = _queue_url(rt, message.source_arn)
    if rt.sqs is None or url is None or message.receipt_handle is None:
        return
    try:
        rt.sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message.receipt_handle, VisibilityTimeout=seconds
        )
    except (BotoCoreError, ClientError) as exc:
        # It then comes back after the queue's visibility timeout instead: sooner, still safe.
        log.warning("visibility_change_failed", message_id=message.message_id, error=str(exc))


def _queue_url(rt: Runtime, arn: str | None) -> str | None:
    """``arn:aws:sqs:REGION:ACCOUNT:NAME`` -> the queue's URL (asked once per container)."""
    if arn is None or rt.sqs is None:
        return None
    if arn not in rt.queue_urls:
        parts = arn.split(":")
        if len(parts) != 6 or parts[2] != "sqs":
            return None
        account, name = parts[4], parts[5]
        try:
            found = rt.sqs.get_queue_url(
                QueueName=name, **({"QueueOwnerAWSAccountId": account} if account else {})
            )
        except (BotoCoreError, ClientError) as exc:
            get_logger().warning("queue_unknown", arn=arn, error=str(exc))
            return None
        rt.queue_urls[arn] = found["QueueUrl"]
    return rt.queue_urls[arn]


def _remaining_ms(context: Any) -> int | None:
    getter = getattr(context, "get_remaining_time_in_millis", None)
    if getter is None:
        return None
    remaining: int = getter()
    return remaining
