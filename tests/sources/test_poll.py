"""``pairwatch watch poll`` (the real CLI, in a subprocess) against SeaweedFS on 127.0.0.1.

SeaweedFS has no bucket notifications, which is exactly the store ``watch poll`` exists for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import scenes
from tests.support.logs import json_event, json_events
from tests.support.s3_servers import (
    READER_KEY,
    READER_SECRET,
    ROOT,
    aws_env,
    client,
    seaweedfs_server,
    unique,
)
from tests.support.waiting import wait_for
from watcher.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as url:
        yield url


@pytest.fixture(scope="module")
def jpeg() -> tuple[bytes, bytes]:
    photo = scenes.photo("astronaut").resize((128, 128))
    return scenes.encode(photo), scenes.encode(photo.rotate(20))


def pairwatch(*args: str, endpoint: str, **env: str) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        **aws_env(),
        "PAIRWATCH_COMPARATOR": "metrics",
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_LOG_LEVEL": "DEBUG",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", *args, "--endpoint-url", endpoint],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _listings(proc: subprocess.Popen[str], passes: int) -> list[dict[str, Any]]:
    """The log events of a running ``watch poll`` until ``passes`` listings went by; then it is
    stopped (SIGTERM) and must have exited 0."""
    lines: list[dict[str, Any]] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if (event := json_event(line)) is not None:
                lines.append(event)
            if sum(e["event"] == "poll_pass" for e in lines) > passes:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest[-3000:]
    return lines


def result_of(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[no-any-return]
    except s3.exceptions.NoSuchKey:
        return None


def test_poll_watcher_finds_pairs_before_and_while_running(
    endpoint: str, jpeg: tuple[bytes, bytes], tmp_path: Path
) -> None:
    s3 = client("s3", endpoint)
    bucket = unique("poll")
    s3.create_bucket(Bucket=bucket)
    a, b = jpeg
    # Already there when the watcher starts; and one outside the watched prefix.
    s3.put_object(Bucket=bucket, Key="in/early bird/a.jpg", Body=a)
    s3.put_object(Bucket=bucket, Key="in/early bird/b.jpg", Body=b)
    s3.put_object(Bucket=bucket, Key="elsewhere/p/a.jpg", Body=a)
    s3.put_object(Bucket=bucket, Key="elsewhere/p/b.jpg", Body=a)
    proc = pairwatch(
        "watch", "poll", f"s3://{bucket}/in", "--interval", "0.2",
        endpoint=endpoint, PAIRWATCH_PAIR_TIMEOUT="1",
    )  # fmt: skip
    try:
        early = wait_for(lambda: result_of(s3, bucket, "in/early bird/result.json"), 30)
        assert early["status"] == "ok" and early["diff_image"] == "diff.png"
        # Uploaded while running: keys with a plus and unicode.
        s3.put_object(
            Bucket=bucket, Key="in/late+ü/x.png", Body=scenes.as_png(scenes.photo("coffee"))
        )
        s3.put_object(Bucket=bucket, Key="in/late+ü/y.jpg", Body=a)
        late = wait_for(lambda: result_of(s3, bucket, "in/late+ü/result.json"), 30)
        assert late["status"] == "ok" and late["is_similar"] is False
        # A lone image: after pair_timeout (1 s) it is reported as an incomplete pair.
        s3.put_object(Bucket=bucket, Key="in/lonely/a.jpg", Body=a)
        lonely = wait_for(lambda: result_of(s3, bucket, "in/lonely/result.json"), 30)
        assert lonely["error"]["type"] == "incomplete_pair"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    assert result_of(s3, bucket, "elsewhere/p/result.json") is None
    events = json_events(stderr)
    written = [e for e in events if e["event"] == "result_written"]
    assert sorted(e["pair_id"] for e in written) == ["early bird", "late+ü", "lonely"]
    assert not any(e["level"] == "error" for e in events), stderr[-3000:]
    # Nothing secret in the logs.
    assert aws_env()["AWS_SECRET_ACCESS_KEY"] not in stderr


def test_poll_once_and_restart_skips_done_pairs(endpoint: str, jpeg: tuple[bytes, bytes]) -> None:
    s3 = client("s3", endpoint)
    bucket = unique("once")
    s3.create_bucket(Bucket=bucket)
    a, b = jpeg
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=a)
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=b)
    first = pairwatch("watch", "poll", f"s3://{bucket}", "--once", endpoint=endpoint)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr[-3000:]
    stamp = result_of(s3, bucket, "p/result.json")
    assert stamp is not None and stamp["status"] == "ok"
    second = pairwatch("watch", "poll", f"s3://{bucket}", "--once", endpoint=endpoint)
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr[-3000:]
    assert result_of(s3, bucket, "p/result.json") == stamp  # not rewritten
    assert not [e for e in json_events(stderr) if e["event"] == "result_written"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://not-s3"], "s3://BUCKET/PREFIX"),
        (["s3://bucket/a/../c"], "'..' segment"),
        (["s3://bucket/in", "--interval", "nan"], "not a finite number"),
        (["s3://bucket/in", "--interval", "-1"], "above 0"),
    ],
)
def test_bad_url_prefix_or_interval_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by argparse (exit 2), not a traceback: nothing is contacted, no server needed."""
    with pytest.raises(SystemExit) as exit_:
        main(["watch", "poll", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_once_exits_1_when_a_pair_result_is_not_ok(
    endpoint: str, jpeg: tuple[bytes, bytes]
) -> None:
    s3 = client("s3", endpoint)
    bucket = unique("broken")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=jpeg[0])
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=jpeg[0][:300])  # truncated
    proc = pairwatch("watch", "poll", f"s3://{bucket}", "--once", endpoint=endpoint)
    _, stderr = proc.communicate(timeout=60)
    result = result_of(s3, bucket, "p/result.json")
    assert result is not None and result["error"]["type"] == "invalid_image"
    assert proc.returncode == 1, stderr[-3000:]
    # Delivered fine: it is the pair that failed. A second run finds the same error result.
    second = pairwatch("watch", "poll", f"s3://{bucket}", "--once", endpoint=endpoint)
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 1, stderr[-3000:]
    assert not [e for e in json_events(stderr) if e["event"] == "result_written"]


def test_unwritable_output_is_retried_with_backoff(
    endpoint: str, jpeg: tuple[bytes, bytes]
) -> None:
    """Results go to a bucket the server refuses (InvalidBucketName): each try compares, then
    cannot write. Each key is tried again after the back-off's first step (5 s), not at every
    listing (every 0.1 s here)."""
    s3 = client("s3", endpoint)
    bucket = unique("unwritable")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=jpeg[0])
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=jpeg[1])
    proc = pairwatch(
        "watch", "poll", f"s3://{bucket}", "--interval", "0.1",
        endpoint=endpoint, PAIRWATCH_OUTPUT_BUCKET="Not_A_Valid_Bucket",
    )  # fmt: skip
    # 20 listings after the failing one (about 2 s): none of them retried it.
    lines = _listings(proc, 20)
    failed = [e for e in lines if e.get("error_type") == "output_unwritable"]
    assert len(failed) == 2, lines[-20:]
    assert sum(e["event"] == "pair_compared" for e in lines) == 2
    scheduled = [
        (e["key"], e["attempts"], e["delay_s"]) for e in lines if e["event"] == "retry_scheduled"
    ]
    assert sorted(scheduled) == [("p/a.jpg", 1, 5.0), ("p/b.jpg", 1, 5.0)]
    assert result_of(s3, bucket, "p/result.json") is None


@pytest.mark.usefixtures("no_pairwatch_env")
def test_a_bucket_outside_allowed_buckets_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before a client or the comparator is built: no server is needed."""
    monkeypatch.setenv("PAIRWATCH_ALLOWED_BUCKETS", "photos,shots")
    assert main(["watch", "poll", "s3://private/in", "--endpoint-url", "http://127.0.0.1:9"]) == 2
    assert "bucket 'private' is not in allowed_buckets (photos, shots)" in capsys.readouterr().err


def test_poll_works_on_an_allowed_bucket(endpoint: str, jpeg: tuple[bytes, bytes]) -> None:
    s3 = client("s3", endpoint)
    bucket = unique("allowed")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=jpeg[0])
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=jpeg[1])
    proc = pairwatch(
        "watch", "poll", f"s3://{bucket}", "--once", endpoint=endpoint,
        PAIRWATCH_ALLOWED_BUCKETS=f"elsewhere,{bucket}",
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert (result_of(s3, bucket, "p/result.json") or {}).get("status") == "ok"


def test_a_bucket_the_credentials_may_not_write_is_a_final_failure_per_pair(
    endpoint: str, jpeg: tuple[bytes, bytes]
) -> None:
    """SeaweedFS refuses the reader identity's PUT (AccessDenied): each key's job compares and
    gives up for good (``final``), no retry comes back to compare it again."""
    s3 = client("s3", endpoint)
    bucket = unique("readonly")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=jpeg[0])
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=jpeg[1])
    proc = pairwatch(
        "watch", "poll", f"s3://{bucket}", "--interval", "0.1", endpoint=endpoint,
        AWS_ACCESS_KEY_ID=READER_KEY, AWS_SECRET_ACCESS_KEY=READER_SECRET,
    )  # fmt: skip
    lines = _listings(proc, 20)
    failed = [e for e in lines if e.get("error_type") == "output_unwritable"]
    assert [e["final"] for e in failed] == [True, True], lines[-20:]
    assert "AccessDenied" in failed[0]["error"]
    assert sum(e["event"] == "pair_compared" for e in lines) == 2  # one per key, then done
    assert not [e for e in lines if e["event"] == "retry_scheduled"]
    assert result_of(s3, bucket, "p/result.json") is None
