"""Pairs in flight for every source (issue 12): ``concurrency`` pairs really overlap, and the
same pair is never run twice at once (each is compared once).

Overlap is read from the logs: between a pair's ``pair_started`` and its ``result_written``
another pair has started. Every store and queue is real (files, moto on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

import handler.app as app
from tests.support import scenes
from tests.support.logs import captured_logs, json_events
from tests.support.s3_servers import (
    ROOT,
    aws_env,
    client,
    moto_server,
    notified_bucket,
    queue_depth,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)
PAIRS = 8


@pytest.fixture(scope="module")
def jpegs() -> tuple[bytes, bytes]:
    photo = scenes.photo("coffee").resize((320, 240))
    return scenes.encode(photo), scenes.encode(photo, quality=50)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


def _at(event: Mapping[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp) if isinstance(stamp, float) else datetime.fromisoformat(stamp).timestamp()


def most_in_flight(events: list[Any]) -> int:
    """The largest number of pairs between their pair_started and result_written at once."""
    edges: list[tuple[float, int]] = []
    for event in events:
        if event["event"] == "pair_started":
            edges.append((_at(event), 1))
        elif event["event"] == "result_written":
            edges.append((_at(event), -1))
    most = current = 0
    for _, step in sorted(edges):
        current += step
        most = max(most, current)
    return most


def check(events: list[Any], pair_ids: list[str]) -> None:
    started = Counter(e["pair_id"] for e in events if e["event"] == "pair_started")
    assert sorted(started) == sorted(pair_ids) and set(started.values()) == {1}, started
    assert most_in_flight(events) >= 2


def run_cli(*args: str, **env: str) -> list[Any]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")},
        "PAIRWATCH_COMPARATOR": "metrics",
        "PAIRWATCH_LOG_FORMAT": "json",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json_events(proc.stderr)


def test_folder_pairs_in_flight(tmp_path: Path, jpegs: tuple[bytes, bytes]) -> None:
    for index in range(PAIRS):
        folder = tmp_path / f"p{index}"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpegs[0])
        (folder / "b.jpg").write_bytes(jpegs[1])
    events = run_cli("watch", str(tmp_path), "--once", "--concurrency", "4")
    check(events, [f"p{i}" for i in range(PAIRS)])
    assert [e["concurrency"] for e in events if e["event"] == "watch_started"] == [4]


def upload(s3: Any, bucket: str, jpegs: tuple[bytes, bytes]) -> list[str]:
    for index in range(PAIRS):
        s3.put_object(Bucket=bucket, Key=f"in/p{index}/a.jpg", Body=jpegs[0])
        s3.put_object(Bucket=bucket, Key=f"in/p{index}/b.jpg", Body=jpegs[1])
    return [f"p{i}" for i in range(PAIRS)]


def test_sqs_pairs_in_flight(endpoint: str, jpegs: tuple[bytes, bytes]) -> None:
    s3, sqs = client("s3", endpoint), client("sqs", endpoint)
    # Both images' events are in flight at once: one waits for the other, no redelivery.
    setup = notified_bucket(endpoint)
    pair_ids = upload(s3, setup.bucket, jpegs)
    wait_for(lambda: queue_depth(sqs, setup.queue_url) == 2 * PAIRS + 1, 10, 0.05)
    events = run_cli(
        "watch", "sqs", setup.queue_url, "--endpoint-url", endpoint, "--exit-when-idle",
        "--concurrency", "4", "--input-prefix", "in", **aws_env(),
        PAIRWATCH_SQS_WAIT_SECONDS="2",
    )  # fmt: skip
    check(events, pair_ids)
    wait_for(lambda: queue_depth(sqs, setup.queue_url) == 0, 10, 0.1, "a drained queue")


def test_poll_pairs_in_flight(endpoint: str, jpegs: tuple[bytes, bytes]) -> None:
    s3 = client("s3", endpoint)
    setup = notified_bucket(endpoint)
    pair_ids = upload(s3, setup.bucket, jpegs)
    events = run_cli(
        "watch", "poll", f"s3://{setup.bucket}/in", "--endpoint-url", endpoint, "--once",
        "--concurrency", "4", **aws_env(),
    )  # fmt: skip
    check(events, pair_ids)


def test_lambda_batch_pairs_in_flight(
    endpoint: str, jpegs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**aws_env(endpoint), "PAIRWATCH_CONCURRENCY": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PAIRWATCH_COMPARATOR", "metrics")
    monkeypatch.setattr(app, "_runtime", None)
    s3 = client("s3", endpoint)
    setup = notified_bucket(endpoint)
    bucket = setup.bucket
    pair_ids = upload(s3, bucket, jpegs)
    records = [
        {
            "messageId": f"m{index}",
            "receiptHandle": f"r{index}",
            "body": json.dumps(
                {"Records": [{
                    "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": bucket}, "object": {"key": f"in/p{index}/b.jpg"}},
                }]}
            ),
            "eventSource": "aws:sqs",
        }
        for index in range(PAIRS)
    ]  # fmt: skip
    rt = app.runtime()  # the cold start configures logging: capture after it
    try:
        with captured_logs() as logs:
            answer = app.handle_event({"Records": records}, None, rt)
    finally:
        structlog.reset_defaults()
    assert answer == {"batchItemFailures": []}
    check([{**e, "timestamp": e["at"]} for e in logs], [f"in/{p}" for p in pair_ids])
