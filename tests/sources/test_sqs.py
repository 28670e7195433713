"""``pairwatch watch sqs`` (the real CLI, in a subprocess) on moto's S3 -> SQS notifications.

Everything is real over HTTP on 127.0.0.1: the bucket with its suffix-filtered notification,
the queue (1 s visibility timeout) and its dead-letter queue (maxReceiveCount 2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

import watcher.sources.command
import watcher.sources.sqs
from handler.bucket_jobs import Delivery
from handler.compare.metrics import MetricsComparator
from handler.disposition import done
from tests.support import scenes
from tests.support.logs import json_events
from tests.support.s3_servers import (
    ROOT,
    NotifiedBucket,
    aws_env,
    client,
    moto_server,
    notified_bucket,
    queue_depth,
)
from tests.support.waiting import wait_for
from watcher.cli import main
from watcher.runner import Runner
from watcher.shutdown import StopFlag
from watcher.sources.sqs import SqsSource, _region_from_url

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


def watch_sqs(queue_url: str, endpoint: str, *extra: str, **settings: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **aws_env(),
        "PAIRWATCH_COMPARATOR": "metrics",
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_LOG_LEVEL": "DEBUG",
        "PAIRWATCH_SQS_WAIT_SECONDS": "2",
        **settings,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "watch", "sqs", queue_url,
         "--endpoint-url", endpoint, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _notified_pair(endpoint: str) -> NotifiedBucket:
    """A notified bucket holding one pair (``in/p/``), its three notifications queued."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint)
    jpeg = scenes.encode(scenes.photo("rocket").resize((64, 64)))
    s3.put_object(Bucket=setup.bucket, Key="in/p/1.jpg", Body=jpeg)
    s3.put_object(Bucket=setup.bucket, Key="in/p/2.jpg", Body=jpeg)
    wait_for(lambda: queue_depth(sqs, setup.queue_url) == 3, 10, 0.05, "3 notifications")
    return setup


def get_json(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[no-any-return]


def test_worker_drains_the_queue_and_poison_goes_to_the_dlq(endpoint: str) -> None:
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint)
    photo = scenes.photo("rocket").resize((120, 160))
    a, b = scenes.encode(photo), scenes.encode(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    folders = ["in/with space", "in/a+b=c", "in/ünï cödé"]
    for folder in folders:
        s3.put_object(Bucket=setup.bucket, Key=f"{folder}/1.jpg", Body=a)
        s3.put_object(Bucket=setup.bucket, Key=f"{folder}/2.jpg", Body=b)
    manifest = {"a": "with space/1.jpg", "b": "a+b=c/1.jpg"}
    s3.put_object(Bucket=setup.bucket, Key="in/same.pair.json", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=setup.bucket, Key="in/poison\x1b[31m/1.jpg", Body=a)
    wait_for(lambda: queue_depth(sqs, setup.queue_url) == 9, 10, 0.05, "9 notifications")

    started = time.monotonic()
    proc = watch_sqs(setup.queue_url, endpoint, "--exit-when-idle")
    _, stderr = proc.communicate(timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr[-4000:]

    for folder in folders:
        result = get_json(s3, setup.bucket, f"{folder}/result.json")
        assert result["status"] == "ok" and result["is_similar"] is False, folder
        assert result["diff_image"] == "diff.png"
    same = get_json(s3, setup.bucket, "in/same.result.json")
    assert same["status"] == "ok" and same["is_similar"] is True
    # Drained: everything deleted except the poison message, which SQS moved to the DLQ.
    assert queue_depth(sqs, setup.queue_url) == 0
    assert queue_depth(sqs, setup.dlq_url) == 1
    events = json_events(stderr)
    names = [e["event"] for e in events]
    assert names.count("result_written") == 4
    assert names.count("event_rejected") == 2  # the poison's two deliveries
    assert names.count("message_rejected") == 2  # left alone: SQS ends it in the DLQ
    assert "message_left_for_retry" not in names
    assert "queue_idle" in names and names[-1] == "watch_stopped"
    assert aws_env()["AWS_SECRET_ACCESS_KEY"] not in stderr
    assert elapsed < 60


def test_sigterm_stops_an_idle_worker_within_2_s(endpoint: str) -> None:
    """Fault 2: mid long poll (the default 20 s), SIGTERM is answered at once."""
    setup = notified_bucket(endpoint)
    proc = watch_sqs(setup.queue_url, endpoint, PAIRWATCH_SQS_WAIT_SECONDS="20")
    try:
        # Once the TestEvent is deleted the worker sits in a long poll: stop it there.
        wait_for(lambda: queue_depth(client("sqs", endpoint), setup.queue_url) == 0, 20, 0.1)
        time.sleep(1.0)
    finally:
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - asked < 2.0
    assert proc.returncode == 0, stderr[-3000:]
    assert json_events(stderr)[-1]["event"] == "watch_stopped"


def test_a_worker_whose_model_cannot_load_receives_nothing(endpoint: str, tmp_path: Any) -> None:
    """Faults 8 and 9: no message is taken while the model loads, and a model that cannot be
    loaded turns no pair into an error result: the worker exits 1, the messages stay."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = _notified_pair(endpoint)
    proc = watch_sqs(
        setup.queue_url, endpoint,
        PAIRWATCH_COMPARATOR="vl", PAIRWATCH_MODEL=str(tmp_path / "no-such-model"),
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1, stderr[-3000:]
    names = [e["event"] for e in json_events(stderr)]
    assert "comparator_unavailable" in names and "message_received" not in names
    messages = sqs.receive_message(
        QueueUrl=setup.queue_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
    )["Messages"]
    assert len(messages) == 3
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in messages} == {"1"}  # first time
    assert "Contents" not in s3.list_objects_v2(Bucket=setup.bucket, Prefix="in/p/result")


def test_a_lone_image_waits_for_pair_timeout_then_gets_incomplete_pair(endpoint: str) -> None:
    """Its message is kept invisible until the partner is due (not redelivered every second,
    not deleted), then the pair gets its incomplete_pair result and the message is deleted."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = notified_bucket(endpoint, max_receives=3)
    jpeg = scenes.encode(scenes.photo("rocket").resize((64, 64)))
    s3.put_object(Bucket=setup.bucket, Key="in/lone/1.jpg", Body=jpeg)
    landed = time.time()
    proc = watch_sqs(setup.queue_url, endpoint, PAIRWATCH_PAIR_TIMEOUT="8")
    try:
        wait_for(
            lambda: "Contents" in s3.list_objects_v2(Bucket=setup.bucket, Prefix="in/lone/result"),
            30, 0.1, "the incomplete_pair result",
        )  # fmt: skip
        written = time.time()
        wait_for(lambda: queue_depth(sqs, setup.queue_url) == 0, 10, 0.1, "a drained queue")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert written - landed >= 6.9  # 8 s after LastModified, which S3 keeps in whole seconds
    result = get_json(s3, setup.bucket, "in/lone/result.json")
    assert result["error"]["type"] == "incomplete_pair"
    events = json_events(stderr)
    waits = [e for e in events if e["event"] == "message_left_for_retry"]
    assert len(waits) == 1, [e["event"] for e in events]
    assert 1 <= waits[0]["retry_after_s"] <= 8  # one delivery while waiting
    assert queue_depth(sqs, setup.dlq_url) == 0


def test_unreachable_queue_fails_cleanly(endpoint: str) -> None:
    proc = watch_sqs(f"{endpoint}/123456789012/no-such-queue", endpoint)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert any(e["event"] == "queue_unavailable" for e in json_events(stderr))


@pytest.mark.usefixtures("no_pairwatch_env")
@pytest.mark.parametrize("flag", [True, False])
def test_bad_input_prefix_is_a_usage_error_before_anything_is_built(
    flag: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 naming the setting, from the flag or the environment, before a client or the
    comparator is built (a model could take minutes to load first): no server is needed."""
    built: list[str] = []
    monkeypatch.setattr(
        watcher.sources.sqs, "sqs_client", lambda *a, **k: built.append("sqs client")
    )
    monkeypatch.setattr(
        watcher.sources.command, "runner_for", lambda *a, **k: built.append("comparator")
    )
    args = ["watch", "sqs", "http://127.0.0.1:9/123456789012/any"]
    if flag:
        args += ["--input-prefix", "in/../other"]
    else:
        monkeypatch.setenv("PAIRWATCH_INPUT_PREFIX", "in/../other")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad input prefix (--input-prefix or PAIRWATCH_INPUT_PREFIX)" in err
    assert "'..' segment" in err
    assert built == []


def test_visibility_is_extended_while_a_pair_runs(endpoint: str) -> None:
    """The queue hides a message for 1 s; a pair that runs 2.5 s keeps it hidden throughout."""
    sqs = client("sqs", endpoint)
    setup = notified_bucket(endpoint)
    wait_for(lambda: queue_depth(sqs, setup.queue_url) == 1, 10, 0.05, "the TestEvent")
    seen_again: list[Any] = []

    class SlowJobs:
        """Stands in for the comparison: its one property that matters here is taking 2.5 s,
        during which it also plays a second consumer of the queue."""

        def handle_parsed(self, parsed: Any, **_: Any) -> Delivery:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                other = sqs.receive_message(QueueUrl=setup.queue_url, WaitTimeSeconds=1)
                seen_again.extend(other.get("Messages", []))
            return Delivery(done())

    runner: Runner[str] = Runner(MetricsComparator(), concurrency=2, queue_size=10)
    source = SqsSource(
        sqs,
        setup.queue_url,
        SlowJobs(),
        runner,
        wait_seconds=1,
        exit_when_idle=True,  # type: ignore[arg-type]
    )
    runner.run(StopFlag(), source)
    assert seen_again == []  # never visible to another consumer meanwhile
    assert source.deleted == 1 and queue_depth(sqs, setup.queue_url) == 0


def test_region_is_read_from_aws_queue_urls() -> None:
    assert _region_from_url("https://sqs.eu-west-1.amazonaws.com/1/q") == "eu-west-1"
    assert _region_from_url("https://sqs.cn-north-1.amazonaws.com.cn/1/q") == "cn-north-1"
    assert _region_from_url("http://127.0.0.1:4566/1/q") is None


def test_a_notification_for_a_bucket_outside_allowed_buckets_is_rejected(endpoint: str) -> None:
    """Its message is refused on every delivery (``event_rejected``, nothing read or written)
    and ends in the dead-letter queue; the worker carries on."""
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    setup = _notified_pair(endpoint)
    proc = watch_sqs(
        setup.queue_url, endpoint, "--exit-when-idle", PAIRWATCH_ALLOWED_BUCKETS="only-this-one"
    )
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-3000:]
    rejected = [e for e in json_events(stderr) if e["event"] == "event_rejected"]
    assert len(rejected) == 4  # two images, each delivered twice (maxReceiveCount 2)
    assert {e["error_type"] for e in rejected} == {"bucket_refused"}
    assert "Contents" not in s3.list_objects_v2(Bucket=setup.bucket, Prefix="in/p/result")
    assert queue_depth(sqs, setup.dlq_url) == 2
