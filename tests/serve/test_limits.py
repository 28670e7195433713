"""The limits of a real ``pairwatch serve`` process against hostile and careless clients on
loopback (raw sockets where a well-behaved client library would not misbehave): uploads and
request heads that stall (408, closed, their slot free for the next client), a boundary too
long for the parser (400), client mistakes in the config (422 naming the field), a 196 MP pair
past its deadline (504 within about a second, the next pair served), and ``/readyz`` once
every compare slot is stuck."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from starlette.types import Message

from handler.compare.metrics import MetricsComparator
from handler.disposition import Disposition, done
from tests.support import scenes
from tests.support.clock import Clock
from tests.support.multipart import form_body
from tests.support.serve_process import ServeProcess, serve_process
from tests.support.waiting import wait_for
from watcher.runner import Runner, Submitted
from watcher.serve.connection import UploadStalled, _Pace
from watcher.serve.readiness import STUCK_GRACE_S, Readiness
from watcher.shutdown import StopFlag

IDLE_S = 2.0
BOUNDARY = "limitsboundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {
        "PAIRWATCH_CONCURRENCY": "1",
        "PAIRWATCH_UPLOAD_IDLE_TIMEOUT": str(IDLE_S),
    }
    with serve_process(tmp_path_factory.mktemp("limits"), env) as process:
        yield process


@pytest.fixture(scope="module")
def photos() -> tuple[bytes, bytes]:
    img = scenes.photo("coffee")
    return scenes.encode(img), scenes.pasted_object(img)


def _head(length: int, boundary: str = BOUNDARY) -> bytes:
    return (
        f"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()


def _answer(sock: socket.socket, within: float) -> tuple[int, bytes, float]:
    """Read until the server closes: (status, raw answer, seconds it took)."""
    started = time.monotonic()
    sock.settimeout(within)
    raw = b""
    try:
        while data := sock.recv(65536):
            raw += data
    except ConnectionResetError:
        pass
    took = time.monotonic() - started
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
    return status, raw, took


def _v1(server: ServeProcess, a: bytes, b: bytes, **data: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/compare",
        files={"a": ("a.png", a), "b": ("b.png", b)},
        data=data,
        timeout=120,
    )


def test_stalled_uploads_and_heads_cannot_keep_a_normal_upload_waiting(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    """Five clients send a few bytes of their body and stop, five never finish their request
    head: the normal upload behind them is answered within a few seconds of its own compare
    time (the issue: 40-60 s, the two body slots held forever), and every stalled client is
    answered 408 and closed after ``upload_idle_timeout``."""
    body = form_body(*photos, BOUNDARY)
    alone = time.monotonic()
    assert _v1(server, *photos).status_code == 200
    compare_s = time.monotonic() - alone

    stalled = []
    for index in range(10):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        if index % 2:
            sock.sendall(_head(len(body)) + body[:100])  # a body that stops
        else:
            sock.sendall(b"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # a head
        stalled.append(sock)
    time.sleep(0.3)  # they are in before it

    started = time.monotonic()
    answer = _v1(server, *photos)
    waited = time.monotonic() - started
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    assert waited < compare_s + 3.0, f"{waited:.1f} s behind the stalled clients"

    with ThreadPoolExecutor(len(stalled)) as pool:
        answers = list(pool.map(lambda s: _answer(s, 3 * IDLE_S + 5), stalled))
    for index, (status, raw, took) in enumerate(answers):
        assert status == 408, raw[:300]
        assert b"connection: close" in raw.lower()
        assert took < 2 * IDLE_S + 3
        kind = json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["type"]
        assert kind == ("upload_timeout" if index % 2 else "header_timeout")
    for sock in stalled:
        sock.close()
    assert server.events("http_head_timeout")
    assert _v1(server, *photos).status_code == 200  # nothing is left held


def test_an_upload_below_the_minimum_rate_is_cut_off(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    """A byte every 0.2 s never looks idle, but brings too little per ``upload_idle_timeout``."""
    body = form_body(*photos, BOUNDARY)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(_head(len(body)) + body[: 64 * 1024])  # a real start: it gets its body slot
    started = time.monotonic()
    sock.setblocking(False)
    for offset in range(64 * 1024, len(body)):
        try:
            if sock.recv(1):
                break
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
        try:
            sock.send(body[offset : offset + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
        if time.monotonic() - started > 4 * IDLE_S:
            break
    sock.setblocking(True)
    status, raw, _ = _answer(sock, 10)
    sock.close()
    assert time.monotonic() - started < 2 * IDLE_S + 2
    # (The first byte of the answer may have been taken by the loop above.)
    assert status == 408 or b"408 Request Timeout" in raw or raw.startswith(b"TTP/1.1 408")
    assert any("bytes/s" in e.get("error", "") for e in server.events("upload_refused"))


def test_a_boundary_too_long_for_the_parser_is_400_and_the_connection_carries_on(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    """python-multipart refuses boundaries over 256 characters: once a 500 with a traceback,
    and a keep-alive client's next request met a reset connection."""
    boundary = "b" * 300
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post(
            "/v1/compare",
            content=form_body(*photos, boundary),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "bad_request"
        assert "boundary" in answer.json()["error"]["message"].lower()
        assert client.get("/healthz").status_code == 200  # the same client, next request
        compat = client.post(
            "/compare",
            content=form_body(*photos, boundary).replace(b'name="a"', b'name="files"'),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert compat.status_code == 400 and compat.json()["code"] == 400
    assert "Traceback" not in server.log_path.read_text()


def test_an_ignore_box_outside_image_a_is_422_naming_the_field(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    """Once a 500 with ``error.input`` null: the client's config is at fault, and says where."""
    config = json.dumps({"ignore_regions": [{"x": 0, "y": 0, "width": 50_000, "height": 10}]})
    answer = _v1(server, *photos, config=config)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_manifest", "config.ignore_regions[0]")
    assert "reaches outside image A" in error["message"]
    compat = httpx.post(
        server.url + "/compare",
        files=[("files", ("a.png", photos[0])), ("files", ("b.png", photos[1]))],
        data={"ignore_regions": config.removeprefix('{"ignore_regions": ').removesuffix("}")},
        timeout=60,
    )
    assert compat.status_code == 400 and compat.json()["data"]["error"]["field"]


def test_a_196_megapixel_pair_past_its_deadline_is_504_and_the_slot_is_free_at_once(
    server: ServeProcess, huge_pair: tuple[bytes, bytes], photos: tuple[bytes, bytes]
) -> None:
    """The issue's upload: 84 s of detection with ``processing_timeout`` 1, answered ``ok``,
    the only compare slot held all along."""
    started = time.monotonic()
    answer = _v1(server, *huge_pair, config=json.dumps({"processing_timeout": 1}))
    took = time.monotonic() - started
    assert answer.status_code == 504, answer.text[:500]
    result = answer.json()
    assert result["status"] == "timeout" and result["error"]["stage"] == "detect"
    assert result["timings_ms"]["detect"] > 0
    assert took < 4.0, f"answered after {took:.1f} s"  # upload and headers included
    nxt = time.monotonic()
    assert _v1(server, *photos).status_code == 200
    assert time.monotonic() - nxt < 5.0


def test_readyz_turns_503_once_every_compare_slot_is_stuck(clock: Clock) -> None:
    """On the parts ``/readyz`` uses (the runner's workers), with a hand-moved clock: a pair
    past its deadline plus the grace in every worker is a stuck process; a worker taking new
    work makes it ready again."""
    runner: Runner[str] = Runner(
        MetricsComparator(), concurrency=2, queue_size=10, clock=clock, wait_ready=False
    )
    readiness = Readiness(MetricsComparator(), stalled_s=runner.stalled_s, processing_timeout=10)
    readiness.ready = True
    stop = StopFlag()
    loop = threading.Thread(target=runner.run, args=(stop, Submitted()))
    loop.start()
    releases = {name: threading.Event() for name in ("first", "second", "third")}

    def held(name: str) -> Callable[[float], Disposition]:
        def work(queued_ms: float) -> Disposition:
            releases[name].wait(20)
            return done()

        return work

    def take(name: str, in_flight: int) -> None:
        runner.offer(name, held(name), recheck=False)
        wait_for(lambda: runner.in_flight() == in_flight, 10, 0.01, what=f"{name} to run")

    seen: list[str | None] = []
    try:
        take("first", 1)
        clock.now += 60
        seen.append(anyio.run(readiness.problem))  # one worker is free: not stuck
        take("second", 2)
        clock.now += 10 + STUCK_GRACE_S - 1
        seen.append(anyio.run(readiness.problem))
        clock.now += 2
        seen.append(anyio.run(readiness.problem))
        releases["first"].set()
        wait_for(lambda: runner.in_flight() == 1, 10, 0.01, what="first to finish")
        take("third", 2)  # a worker took new work: progress
        seen.append(anyio.run(readiness.problem))
    finally:
        for release in releases.values():
            release.set()
        stop.request()
        loop.join(10)
    assert seen[0] is None and seen[1] is None
    assert seen[2] is not None and seen[2].startswith("stuck")
    assert seen[3] is None


def test_the_pace_rule_on_a_hand_moved_clock(clock: Clock) -> None:
    """A body part at least every ``idle`` s, and 1 KiB/s over each ``idle`` s window."""
    chunk: Message = {"type": "http.request", "body": b"x" * 4096, "more_body": True}

    idle = _Pace(10, clock)
    clock.now += 9.9
    assert idle.wait() == pytest.approx(0.1)  # what is left before it counts as idle
    clock.now += 0.1
    with pytest.raises(UploadStalled, match="no bytes of the body for 10 s"):
        idle.wait()

    trickle = _Pace(10, clock)
    for _ in range(9):  # 9 x 1 byte in 10 s: never idle, far below 10 KiB
        clock.now += 1.1
        trickle.note({"type": "http.request", "body": b"x", "more_body": True})
    clock.now += 0.2  # the window's end
    with pytest.raises(UploadStalled, match="9 bytes of the body in 10 s"):
        trickle.wait()

    steady = _Pace(10, clock)
    for _ in range(30):  # 4 KiB every second for 30 s: three windows, each well above
        clock.now += 1
        steady.note(chunk)
        assert steady.wait() > 0
