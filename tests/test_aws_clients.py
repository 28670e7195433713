"""Fault 1: bounded S3/SQS clients, every failed attempt logged, SIGTERM honoured mid-call.

The stores here are real sockets on 127.0.0.1: one that accepts connections and never
answers (a hung endpoint), and a port nobody listens on (connections refused).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from handler.aws_clients import (
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    READ_TIMEOUT_S,
    s3_client,
    sqs_client,
)
from tests.support.logs import json_events
from tests.support.s3_servers import ROOT, aws_env, free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(90)


@contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts every connection and never sends a byte back."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def pairwatch(*args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **aws_env(),
        "PAIRWATCH_COMPARATOR": "metrics",
        "PAIRWATCH_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop_while_hung(proc: subprocess.Popen[str], accepted: list[socket.socket]) -> float:
    """SIGTERM once the process is stuck in a call to the silent server; seconds to exit."""
    wait_for(lambda: accepted, 30, 0.05, "a connection to the silent server")
    time.sleep(0.5)  # well inside the call: the request is sent, no answer comes
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    return time.monotonic() - asked


def test_watch_poll_exits_within_2_s_of_sigterm_while_the_store_hangs() -> None:
    with silent_server() as (url, accepted):
        proc = pairwatch("watch", "poll", "s3://photos/in/", "--endpoint-url", url)
        elapsed = stop_while_hung(proc, accepted)
        _, stderr = proc.communicate(timeout=10)
    assert elapsed < 2.0, stderr[-2000:]
    assert proc.returncode == 0
    assert json_events(stderr)[-1]["event"] == "watch_stopped"


def test_watch_sqs_exits_within_2_s_of_sigterm_while_the_queue_hangs() -> None:
    with silent_server() as (url, accepted):
        proc = pairwatch("watch", "sqs", f"{url}/123456789012/jobs", "--endpoint-url", url)
        elapsed = stop_while_hung(proc, accepted)
        _, stderr = proc.communicate(timeout=10)
    assert elapsed < 2.0, stderr[-2000:]
    assert proc.returncode == 0


def test_every_failed_attempt_is_logged_and_the_call_gives_up() -> None:
    """Connections refused: each of the bounded attempts is logged, then the listing fails."""
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = pairwatch("watch", "poll", "s3://photos/in/", "--once", "--endpoint-url", url)
    _, stderr = proc.communicate(timeout=60)
    events = json_events(stderr)
    attempts = [e for e in events if e["event"] == "aws_call_failed"]
    assert [e["attempt"] for e in attempts] == list(range(1, MAX_ATTEMPTS + 1)), stderr[-2000:]
    assert all(e["operation"] == "ListObjectsV2" for e in attempts)
    assert [e["event"] for e in events].count("list_failed") == 1
    assert proc.returncode == 1
    assert time.monotonic() - started < 30


def test_clients_carry_bounded_timeouts_and_attempts() -> None:
    s3 = s3_client("http://127.0.0.1:9", "us-east-1")
    sqs = sqs_client("http://127.0.0.1:9", "us-east-1", wait_seconds=20)
    for client, read in ((s3, READ_TIMEOUT_S), (sqs, READ_TIMEOUT_S + 20)):
        config = client.meta.config
        assert config.connect_timeout == CONNECT_TIMEOUT_S
        assert config.read_timeout == read  # a long poll gets its wait on top
        assert config.retries["total_max_attempts"] == MAX_ATTEMPTS
