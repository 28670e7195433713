"""``pairwatch watch minio`` (the real CLI, in a subprocess) through the real ``minio`` SDK.

MinIO's server cannot run on these machines, so the endpoint is moto's S3 behind
``tests.support.s3_servers.MinioListenLayer``, which reproduces what MinIO does on
ListenBucketNotification (verified against MinIO's source and the SDK): a SigV4 ``GET
/BUCKET?events=&prefix=&suffix=`` answered by a chunked stream of one JSON document per line,
``{"Records":null}`` and bare-space keep-alives, records with RAW keys, events delivered only to
streams open at the time (uploads during a disconnection are lost), and a clean end of stream
after which the SDK reconnects silently. Uploads (inputs, and the watcher's own results) produce
events exactly as they would on MinIO.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from handler.bucket_jobs import BucketJobs
from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.events import Parsed
from tests.support import scenes
from tests.support.logs import json_events
from tests.support.s3_servers import (
    ROOT,
    MinioListenLayer,
    aws_env,
    client,
    minio_listen_server,
    unique,
)
from tests.support.waiting import wait_for
from watcher.args import BucketURL
from watcher.cli import main
from watcher.runner import Runner
from watcher.shutdown import StopFlag
from watcher.sources.bucket import list_events
from watcher.sources.minio import MinioSource, minio_client

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def minio() -> Iterator[tuple[str, MinioListenLayer]]:
    with minio_listen_server() as server:
        yield server


def result_of(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[no-any-return]
    except s3.exceptions.NoSuchKey:
        return None


def upload_pair(
    s3: Any, bucket: str, folder: str, names: tuple[str, str] = ("a.jpg", "b.jpg")
) -> None:
    photo = scenes.photo("coffee").resize((160, 120))
    s3.put_object(Bucket=bucket, Key=f"{folder}/{names[0]}", Body=scenes.encode(photo))
    s3.put_object(Bucket=bucket, Key=f"{folder}/{names[1]}", Body=scenes.encode(photo, quality=60))


def test_listen_reconnect_and_catch_up(minio: tuple[str, MinioListenLayer]) -> None:
    endpoint, layer = minio
    s3 = client("s3", endpoint)
    bucket = unique("minio")
    s3.create_bucket(Bucket=bucket)
    upload_pair(s3, bucket, "in/before start")  # only a listing can find this one
    env = {
        **os.environ,
        **aws_env(),
        "PAIRWATCH_COMPARATOR": "metrics",
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_LOG_LEVEL": "DEBUG",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "watch", "minio", f"s3://{bucket}/in",
         "--endpoint-url", endpoint, "--region", "us-east-1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: result_of(s3, bucket, "in/before start/result.json"), 30)
        wait_for(lambda: layer.connected() == 1, 10, what="the listen stream")

        # Live: a raw key with '+', spaces and unicode must not be unquoted.
        upload_pair(s3, bucket, "in/live a+b", ("ä 1.jpg", "z+2.jpg"))
        live = wait_for(lambda: result_of(s3, bucket, "in/live a+b/result.json"), 30)
        assert [i["name"] for i in live["inputs"]] == ["z+2.jpg", "ä 1.jpg"]  # code-point order

        # The stream drops and cannot reconnect for a while: these uploads' events are lost.
        layer.pause()
        layer.drop()
        wait_for(lambda: layer.connected() == 0, 10, what="the stream to drop")
        upload_pair(s3, bucket, "in/during gap")
        assert result_of(s3, bucket, "in/during gap/result.json") is None
        layer.resume()  # the SDK's own reconnect goes through; the watcher re-lists
        gap = wait_for(lambda: result_of(s3, bucket, "in/during gap/result.json"), 30)
        assert gap["status"] == "ok"
    finally:
        layer.resume()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-4000:]

    # Always only ObjectCreated (the SDK default adds ObjectAccessed: our GETs would fire).
    assert len(layer.listen_queries) >= 2
    assert all(q["events"] == ["s3:ObjectCreated:*"] for q in layer.listen_queries)
    assert all(q["prefix"] == ["in/"] for q in layer.listen_queries)
    # The region was given, so the SDK never asked for the bucket's location.
    assert not any("location" in r for r in layer.other_requests)

    events = json_events(stderr)
    names = [e["event"] for e in events]
    assert names.count("stream_connected") >= 2 and names.count("prefix_listed") >= 2
    written = sorted(e["pair_id"] for e in events if e["event"] == "result_written")
    assert written == ["before start", "during gap", "live a+b"]
    # Our own uploads came back as events and were ignored (recursion guard).
    own = [e for e in events if e["event"] == "event_ignored" and e.get("reason") == "own output"]
    assert {e["key"].rsplit("/", 1)[1] for e in own} >= {"result.json", "diff.png"}
    assert aws_env()["AWS_SECRET_ACCESS_KEY"] not in stderr


@pytest.mark.usefixtures("no_pairwatch_env")
def test_missing_endpoint_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "minio", "s3://bucket/in"]) == 2
    assert "watch minio needs --endpoint-url" in capsys.readouterr().err


def test_a_relisted_lone_image_is_retried_once(
    minio: tuple[str, MinioListenLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every (re)connect replays the listing: a lone image's retry replaces its pending one
    (it used to pile up, one more per reconnect), and only that object is retried, not the
    whole listing batch it came in."""
    endpoint, _ = minio
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    s3 = client("s3", endpoint)
    bucket = unique("relist")
    s3.create_bucket(Bucket=bucket)
    upload_pair(s3, bucket, "in/done")
    s3.put_object(Bucket=bucket, Key="in/lone/a.jpg", Body=b"not even decoded: it waits")
    settings = Settings(comparator="metrics", pair_timeout=600)
    url = BucketURL(bucket, "in/")
    runner: Runner[tuple[str, str]] = Runner(MetricsComparator(), concurrency=2, queue_size=10)
    jobs = BucketJobs.from_settings(
        settings, runner.comparator, endpoint_url=endpoint, region="us-east-1", prefix=url.prefix
    )
    listener = MinioSource(minio_client(endpoint, "us-east-1"), jobs, url, runner, queue_size=10)
    for _ in range(3):  # the listings of the first connection and of two reconnects
        listener.inbox.put(Parsed(events=list(list_events(jobs, bucket, url.prefix))))
    stop = StopFlag()
    thread = threading.Thread(target=runner.run, args=(stop, _Replay(listener)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: result_of(s3, bucket, "in/done/result.json") is not None, 30)
        # a.jpg and b.jpg run at once: one waits for the other and finds the result up to date.
        wait_for(lambda: runner.idle() and len(runner.rechecks) == 1, 30)
    finally:
        stop.request()
        thread.join(10)
    # One recheck, for the lone image only, when its partner is due (not one per listing).
    assert len(runner.rechecks) == 1 and (bucket, "in/lone/a.jpg") in runner.rechecks
    assert 590 < (runner.rechecks.next_due() or 0) <= 600


class _Replay:
    """The listener without its stream thread: only the listings put into its inbox."""

    def __init__(self, listener: MinioSource) -> None:
        self.listener = listener

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def pump(self) -> None:
        self.listener.pump()

    def finished(self) -> bool:
        return False

    def next_wait(self) -> float | None:
        return None


@pytest.mark.usefixtures("no_pairwatch_env")
def test_a_bucket_outside_allowed_buckets_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAIRWATCH_ALLOWED_BUCKETS", '["photos"]')
    argv = ["watch", "minio", "s3://private/in", "--endpoint-url", "http://127.0.0.1:9"]
    assert main(argv) == 2
    assert "bucket 'private' is not in allowed_buckets (photos)" in capsys.readouterr().err
