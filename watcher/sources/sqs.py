"""Work an SQS queue of S3 notifications: results are written back to the bucket.

``pairwatch watch sqs QUEUE_URL`` long-polls the queue (S3 -> SQS, S3 -> SNS -> SQS with or
without raw delivery, EventBridge -> SQS). ``SqsSource`` is a small adapter for the runner:

* it receives only once the comparator is ready and only as many messages as the runner can
  start (up to ``min(10, free slots)``), so a worker still loading its model holds none;
* the long poll runs on a thread of its own: SIGTERM is answered within a fraction of a second
  even mid-poll (messages a poll returns after the stop are made visible again at once);
* every message in hand is kept invisible by one heartbeat (a batch ``ChangeMessageVisibility``
  every half visibility timeout) and settled on its own by its ``Disposition``: done -> deleted;
  retry -> made visible again when due (a lone image: when its partner is due, at most SQS's 12
  hours; a failure of the moment: the back-off for its ``ApproximateReceiveCount``), so the
  queue's ``maxReceiveCount`` and dead-letter queue decide the end; reject -> left alone (it
  returns after the visibility timeout and ends in the dead-letter queue).
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from handler.aws_clients import sqs_client
from handler.bucket_jobs import BucketJobs
from handler.config import Settings
from handler.disposition import Disposition
from handler.errors import PairError
from handler.events import QueueMessage, sqs_messages
from handler.logs import get_logger
from handler.pairs import normalise_prefix
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from watcher.runner import Runner
from watcher.sources.bucket import run_delivery
from watcher.sources.command import watch

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

#: Seconds between two ReceiveMessage rounds that failed (credentials, network, a deleted queue).
RECEIVE_RETRY_PAUSE = 5.0
#: The longest a stop waits to hand back messages it received but never started.
RELEASE_WAIT_S = 1.0
#: SQS hands out at most this many messages per ReceiveMessage.
MAX_RECEIVE = 10
_REGION_IN_URL = re.compile(r"^https://sqs[.-]([a-z0-9-]+)\.amazonaws\.com(\.cn)?/")


def run(args: argparse.Namespace, settings: Settings) -> int:
    region = args.region or _region_from_url(args.queue_url)
    # Checked before the comparator is built: loading a model first would waste minutes.
    try:
        normalise_prefix(settings.input_prefix)
    except PairError as exc:
        print(
            f"pairwatch: bad input prefix (--input-prefix or PAIRWATCH_INPUT_PREFIX): "
            f"{exc.message}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    sqs = sqs_client(args.endpoint_url, region, wait_seconds=settings.sqs_wait_seconds)

    def build(runner: Runner[Any]) -> SqsSource:
        jobs = BucketJobs.from_settings(
            settings, runner.comparator, endpoint_url=args.endpoint_url, region=region
        )
        return SqsSource(
            sqs,
            args.queue_url,
            jobs,
            runner,
            wait_seconds=settings.sqs_wait_seconds,
            exit_when_idle=args.exit_when_idle,
        )

    watched = watch(
        settings,
        build,
        log=get_logger(queue=args.queue_url),
        started=lambda runner: {"source": "sqs", "concurrency": runner.concurrency},
        stopped=lambda source: {"handled": source.handled, "deleted": source.deleted},
    )
    if watched is None or watched.source.unavailable:
        return EXIT_FAILED
    return EXIT_OK


def _region_from_url(url: str) -> str | None:
    """``https://sqs.eu-west-1.amazonaws.com/...`` names its region; other URLs do not."""
    match = _REGION_IN_URL.match(url)
    return match.group(1) if match else None


class SqsSource:
    """An SQS queue as a source of messages (keyed by message id) for a ``Runner``."""

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        jobs: BucketJobs,
        runner: Runner[str],
        *,
        wait_seconds: int,
        exit_when_idle: bool = False,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.jobs = jobs
        self.runner = runner
        self.wait_seconds = wait_seconds
        self.exit_when_idle = exit_when_idle
        self.visibility: int | None = None
        self.handled = 0
        self.deleted = 0
        self._inbox: list[QueueMessage] = []
        self._in_hand: dict[str, QueueMessage] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._idle = False
        #: The queue could not be found or reached at start (the run then fails).
        self.unavailable = False
        self.log = get_logger(queue=queue_url)

    # -- what the runner calls (main thread) --------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._receive_loop, name="sqs-receive", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="sqs-heartbeat", daemon=True).start()

    def pump(self) -> None:
        with self._lock:
            arrived, self._inbox = self._inbox, []
        for message in arrived:
            self.runner.offer(
                message.message_id,
                partial(self._work, message),
                on_done=partial(self._settle, message),
                recheck=False,
            )

    def finished(self) -> bool:
        with self._lock:
            if self.unavailable:
                return True
            return self.exit_when_idle and self._idle and not self._inbox and not self._in_hand

    def next_wait(self) -> float | None:
        return None

    def stop(self) -> None:
        """Called once nothing is in flight: messages still in hand were received but never
        started (a stop came first): make them visible to other workers at once, waiting at
        most ``RELEASE_WAIT_S`` for the call so that a hung endpoint cannot delay the exit."""
        self._stopped.set()
        with self._lock:
            left, self._in_hand = list(self._in_hand.values()), {}
        if left:
            release = threading.Thread(
                target=self._change_visibility, args=(left, 0), name="sqs-release", daemon=True
            )
            release.start()
            release.join(RELEASE_WAIT_S)

    # -- receiving (its own thread) -----------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            self.visibility = self._visibility_timeout()
        except (BotoCoreError, ClientError) as exc:
            # A wrong URL, missing permissions or no network (after the client's bounded
            # attempts): a configuration to fix, not something to wait out.
            self.log.error("queue_unavailable", error_type=type(exc).__name__, error=str(exc))
            with self._lock:
                self.unavailable = True
            self.runner.wake()
            return
        while not self._stopped.is_set():
            room = min(MAX_RECEIVE, self.runner.free_slots())
            if room <= 0:
                self._stopped.wait(0.05)  # not ready yet, or every slot taken
                continue
            try:
                response = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=room,
                    WaitTimeSeconds=self.wait_seconds,
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                )
            except (BotoCoreError, ClientError) as exc:
                self.log.error("receive_failed", error_type=type(exc).__name__, error=str(exc))
                self._stopped.wait(RECEIVE_RETRY_PAUSE)
                continue
            self._arrived(sqs_messages(list(response.get("Messages", []))))

    def _visibility_timeout(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout"]
        )
        return int(attributes.get("Attributes", {}).get("VisibilityTimeout", 30))

    def _arrived(self, messages: list[QueueMessage]) -> None:
        if self._stopped.is_set():
            # Received by a poll that outlived the stop: hand them to another worker now.
            self._change_visibility(messages, 0)
            return
        if not messages and self.exit_when_idle and not self._idle:
            self.log.info("queue_idle")
        with self._lock:
            self._idle = not messages
            for message in messages:
                self.log.debug(
                    "message_received",
                    message_id=message.message_id,
                    receive_count=message.receive_count,
                )
                self._in_hand[message.message_id] = message
                self._inbox.append(message)
        self.runner.wake()

    # -- one message (a runner worker thread) ---------------------------------------------------

    def _work(self, message: QueueMessage, queued_ms: float) -> Disposition:
        delivery = run_delivery(
            self.jobs,
            self.runner,
            message.parse(),
            queued_ms,
            "sqs",
            message_id=message.message_id,
        )
        return delivery.disposition

    def _settle(self, message: QueueMessage, fate: Disposition) -> None:
        log = self.log.bind(message_id=message.message_id)
        with self._lock:
            self._in_hand.pop(message.message_id, None)
            self.handled += 1
        if fate.is_done:
            self._delete(message, log)
        elif fate.is_retry:
            self._change_visibility([message], message.left_for_retry(fate, time.time(), log))
        else:
            log.error("message_rejected", receive_count=message.receive_count, reason=fate.reason)

    def _delete(self, message: QueueMessage, log: Any) -> None:
        try:
            self.sqs.delete_message(
                QueueUrl=self.queue_url, ReceiptHandle=str(message.receipt_handle)
            )
        except (BotoCoreError, ClientError) as exc:
            # The result is written; a redelivery finds it up to date and deletes then.
            log.warning("delete_failed", error=str(exc))
            return
        with self._lock:
            self.deleted += 1
        log.debug("message_deleted")

    # -- visibility -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Keep every message in hand invisible: one batch call per 10 every half timeout."""
        while not self._stopped.wait(max((self.visibility or 1) / 2, 0.5)):
            with self._lock:
                in_hand = list(self._in_hand.values())
            if in_hand and self.visibility:
                self._change_visibility(in_hand, self.visibility)

    def _change_visibility(self, messages: list[QueueMessage], seconds: int) -> None:
        for start in range(0, len(messages), MAX_RECEIVE):
            batch = messages[start : start + MAX_RECEIVE]
            entries: Any = [
                {
                    "Id": str(index),
                    "ReceiptHandle": str(message.receipt_handle),
                    "VisibilityTimeout": seconds,
                }
                for index, message in enumerate(batch)
            ]
            try:
                response = self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url, Entries=entries
                )
            except (BotoCoreError, ClientError) as exc:
                self.log.warning("visibility_change_failed", messages=len(batch), error=str(exc))
                continue
            for failed in response.get("Failed", []):
                self.log.warning(
                    "visibility_change_failed",
                    message_id=batch[int(failed["Id"])].message_id,
                    error=failed.get("Message", failed.get("Code")),
                )
