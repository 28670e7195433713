"""Work an SQS queue of S3 notifications: results are written back to the bucket.

``pairwatch watch sqs QUEUE_URL`` long-polls the queue (S3 -> SQS, S3 -> SNS -> SQS with or
without raw delivery, EventBridge -> SQS) and handles one message at a time. A message is deleted
only once everything it names is done: result written, already up to date, or nothing to do
(a test event, a delete, a non-image key, the first image of a pair). A failed message is left
alone, so SQS redelivers it after the queue's visibility timeout and, after its
``maxReceiveCount``, moves it to the dead-letter queue. While a pair runs, the message's
visibility is extended every half visibility timeout, so a slow pair is not handed to another
worker meanwhile.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.errors import PairError
from handler.events import QueueMessage, sqs_messages
from handler.logs import get_logger
from handler.s3_storage import normalise_prefix
from watcher import metrics
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from watcher.bucket import add_endpoint_options, build_jobs, sleep_unless_stopped
from watcher.shutdown import StopFlag, stop_on_signals

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

#: Seconds between two ReceiveMessage rounds that failed (credentials, network, a deleted queue).
RECEIVE_RETRY_PAUSE = 5.0
_REGION_IN_URL = re.compile(r"^https://sqs[.-]([a-z0-9-]+)\.amazonaws\.com(\.cn)?/")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue_url", metavar="QUEUE_URL", help="the SQS queue's URL")
    add_endpoint_options(parser)
    parser.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit (status 0) as soon as one long poll comes back empty: for batch runs, "
        "cron jobs and tests",
    )
    parser.add_argument(
        "--input-prefix",
        metavar="PREFIX",
        help="only keys under PREFIX are pairs, and manifests cannot reach outside it "
        "(default: PAIRWATCH_INPUT_PREFIX, else the whole bucket)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    log = get_logger(queue=args.queue_url)
    region = args.region or _region_from_url(args.queue_url)
    # Checked before the comparator is built: loading a model first would waste minutes, and a
    # bad prefix is a usage error, not an unavailable comparator.
    raw_prefix = args.input_prefix if args.input_prefix is not None else settings.input_prefix
    try:
        prefix = normalise_prefix(raw_prefix)
    except PairError as exc:
        print(
            f"pairwatch: bad input prefix (--input-prefix or PAIRWATCH_INPUT_PREFIX): "
            f"{exc.message}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        jobs = build_jobs(settings, args.endpoint_url, region, prefix=prefix)
    except PairError as exc:
        log.error("comparator_unavailable", error_type=exc.type, error=exc.message)
        return EXIT_FAILED
    sqs: SQSClient = boto3.client(
        "sqs",
        endpoint_url=args.endpoint_url,
        region_name=region,
        config=Config(retries={"mode": "standard", "max_attempts": 5}),
    )
    try:
        visibility = _visibility_timeout(sqs, args.queue_url)
    except (BotoCoreError, ClientError) as exc:
        log.error("queue_unavailable", error=str(exc))
        jobs.comparator.close()
        return EXIT_FAILED
    log.info("watch_started", source="sqs", visibility_timeout=visibility)
    worker = _Worker(sqs, args.queue_url, jobs, visibility, settings.sqs_wait_seconds)
    try:
        with stop_on_signals() as stop:
            worker.run(stop, exit_when_idle=args.exit_when_idle)
    finally:
        jobs.comparator.close()
    log.info("watch_stopped", handled=worker.handled, deleted=worker.deleted)
    return EXIT_OK


def _region_from_url(url: str) -> str | None:
    """``https://sqs.eu-west-1.amazonaws.com/...`` names its region; other URLs do not."""
    match = _REGION_IN_URL.match(url)
    return match.group(1) if match else None


def _visibility_timeout(sqs: SQSClient, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])
    return int(attributes.get("Attributes", {}).get("VisibilityTimeout", 30))


class _Worker:
    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        jobs: BucketJobs,
        visibility: int,
        wait_seconds: int,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.jobs = jobs
        self.visibility = visibility
        self.wait_seconds = wait_seconds
        self.handled = 0
        self.deleted = 0
        self.log = get_logger(queue=queue_url)

    def run(self, stop: StopFlag, *, exit_when_idle: bool) -> None:
        while not stop.requested:
            try:
                response = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=self.wait_seconds,
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                )
            except (BotoCoreError, ClientError) as exc:
                # botocore already retried with backoff; pause before the next round anyway.
                self.log.error("receive_failed", error=str(exc))
                sleep_unless_stopped(stop, RECEIVE_RETRY_PAUSE)
                continue
            messages = response.get("Messages", [])
            if not messages:
                if exit_when_idle:
                    self.log.info("queue_idle")
                    return
                continue
            receive_counts = [m.get("Attributes", {}) for m in messages]
            for message, attributes in zip(
                sqs_messages(list(messages)), receive_counts, strict=True
            ):
                self._handle(message, attributes.get("ApproximateReceiveCount"))

    def _handle(self, message: QueueMessage, receive_count: str | None) -> None:
        log = self.log.bind(message_id=message.message_id)
        log.debug("message_received", receive_count=receive_count)
        done = threading.Event()
        heartbeat = threading.Thread(target=self._keep_invisible, args=(message, done), daemon=True)
        heartbeat.start()
        try:
            parsed = message.parse()
            delivery = self.jobs.handle_parsed(parsed, message_id=message.message_id)
            metrics.record_delivery(delivery, "sqs", len(parsed.events))
        finally:
            done.set()
            heartbeat.join()
        self.handled += 1
        if not delivery.ok:
            log.warning(
                "message_left_for_retry",
                receive_count=receive_count,
                retry_after_s=self.visibility,
            )
            return
        try:
            self.sqs.delete_message(
                QueueUrl=self.queue_url, ReceiptHandle=str(message.receipt_handle)
            )
        except (BotoCoreError, ClientError) as exc:
            # The result is written; a redelivery finds it up to date and deletes then.
            log.warning("delete_failed", error=str(exc))
            return
        self.deleted += 1
        log.debug("message_deleted")

    def _keep_invisible(self, message: QueueMessage, done: threading.Event) -> None:
        """Extend the message's visibility every half timeout until ``done``."""
        interval = max(self.visibility / 2, 0.5)
        while not done.wait(interval):
            try:
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url,
                    ReceiptHandle=str(message.receipt_handle),
                    VisibilityTimeout=self.visibility,
                )
                self.log.debug("visibility_extended", message_id=message.message_id)
            except (BotoCoreError, ClientError) as exc:
                self.log.warning(
                    "visibility_extend_failed", message_id=message.message_id, error=str(exc)
                )
