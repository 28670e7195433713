"""Back-pressure and shutdown of a real ``pairwatch serve`` process: 429 beyond ``concurrency +
queue_size``, a vanished client's slot freed, SIGTERM finishing the request in hand."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import scenes
from tests.support.multipart import form_body
from tests.support.s3_servers import wait_for
from tests.support.serve_process import ServeProcess, serve_process

BOUNDARY = "pressureboundary"


@pytest.fixture(scope="module")
def photos() -> tuple[bytes, bytes]:
    img = scenes.photo("coffee")
    return scenes.encode(img), scenes.pasted_object(img)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {"PAIRWATCH_CONCURRENCY": "1", "PAIRWATCH_QUEUE_SIZE": "1"}
    with serve_process(tmp_path_factory.mktemp("pressure"), env) as process:
        yield process


class SlowUpload:
    """A client that sends its request headers and part of its body, then waits."""

    def __init__(self, port: int, body: bytes, sent_first: int) -> None:
        self.body = body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (
            f"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body[:sent_first])
        self.sent = sent_first

    def finish(self) -> tuple[int, bytes]:
        """Send the rest and read the whole answer: (status, body)."""
        self.sock.sendall(self.body[self.sent :])
        response = b""
        while b"\r\n\r\n" not in response or not _complete(response):
            data = self.sock.recv(65536)
            if not data:
                break
            response += data
        self.sock.close()
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def abandon(self) -> None:
        self.sock.close()


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _in_flight(server: ServeProcess) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("pairwatch_in_flight", "pairwatch_queue_depth"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values["pairwatch_in_flight"], values["pairwatch_queue_depth"]


def test_beyond_concurrency_and_queue_is_429_and_a_vanished_client_frees_its_slot(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    body = form_body(*photos, BOUNDARY)
    holder = SlowUpload(server.port, body, len(body) // 3)  # admitted, uploading
    wait_for(lambda: _in_flight(server) == (0, 1), 10, what="the first place to be taken")
    queued = SlowUpload(server.port, body, 0)  # admitted too: concurrency 1 + queue_size 1
    wait_for(lambda: _in_flight(server) == (0, 2), 10, what="the queue place to be taken")

    refused = httpx.post(
        server.url + "/v1/compare", files={"a": ("a.jpg", photos[0]), "b": ("b.jpg", photos[1])}
    )
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "busy"

    holder.abandon()  # disconnects mid-upload: its place is free again
    wait_for(lambda: _in_flight(server) == (0, 1), 10, what="the vanished client's place")
    status, answer = queued.finish()
    assert status == 200 and b'"status":"ok"' in answer
    assert server.events("client_disconnected")
    assert _in_flight(server) == (0, 0)


def test_a_burst_gets_answers_or_429_never_anything_else(
    server: ServeProcess, photos: tuple[bytes, bytes]
) -> None:
    def post(_: int) -> httpx.Response:
        return httpx.post(
            server.url + "/v1/compare",
            files={"a": ("a.jpg", photos[0]), "b": ("b.jpg", photos[1])},
            timeout=60,
        )

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    codes = sorted(answer.status_code for answer in answers)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    assert all("Retry-After" in a.headers for a in answers if a.status_code == 429)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_events_endpoint_is_disabled_without_a_token(server: ServeProcess) -> None:
    answer = httpx.post(server.url + "/v1/events", content=b"{}")
    assert answer.status_code == 404


def test_sigterm_finishes_the_request_in_hand_then_exits_0(
    tmp_path: Path, photos: tuple[bytes, bytes]
) -> None:
    with serve_process(tmp_path) as server:
        body = form_body(*photos, BOUNDARY)
        client = SlowUpload(server.port, body, len(body) // 2)
        wait_for(lambda: _in_flight(server) == (0, 1), 10, what="the request to be in hand")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses(server.port), 10, what="the listening socket to close")
        assert not server.events("serve_stopped")  # still busy with the request in hand
        result: dict[str, object] = {}
        finisher = threading.Thread(target=lambda: result.update(answer=client.finish()))
        finisher.start()
        finisher.join(30)
        status, answer = result["answer"]  # type: ignore[misc]
        assert status == 200 and b'"status":"ok"' in answer
        assert server.process.wait(30) == 0
        assert server.events("serve_stopped")


def _refuses(port: int) -> bool:
    """Has the server stopped accepting new connections?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_client_gone_mid_compare_stops_its_pair_at_the_next_stage(tmp_path: Path) -> None:
    """Large inputs (prepared at up to 8192 px) keep the pair busy for a while: the client
    hangs up once it is comparing, and the pair stops at its next stage, before its images are
    prepared. (Two encodings of one picture: byte-identical inputs would be answered at once.)"""
    big = scenes.photo("astronaut").resize((6000, 6000))
    a, b = scenes.encode(big), scenes.encode(big, quality=80)
    env = {"PAIRWATCH_COMPARISON__MAX_IMAGE_SIZE": "[8192, 8192]"}
    with serve_process(tmp_path, env) as server:
        body = form_body(a, b, BOUNDARY, pair_id="gone")
        client = SlowUpload(server.port, body, len(body))
        wait_for(lambda: _in_flight(server) == (1, 0), 30, 0.02, what="the pair to compare")
        client.abandon()
        wait_for(lambda: server.events("client_disconnected"), 30, what="the disconnect")
        gone = server.events("client_disconnected")[-1]
        assert (gone["pair_id"], gone["stage"]) == ("gone", "compare")
        prepared = [e for e in server.events("image_prepared") if e.get("pair_id") == "gone"]
        assert not prepared
        assert not [e for e in server.events("pair_compared") if e.get("pair_id") == "gone"]
        wait_for(lambda: _in_flight(server) == (0, 0), 30, what="the slot to be free")
        photos = scenes.encode(scenes.photo("coffee"))
        answer = httpx.post(
            server.url + "/v1/compare",
            files={"a": ("a.jpg", photos), "b": ("b.jpg", photos)},
            timeout=60,
        )
        assert answer.status_code == 200


def test_a_client_gone_while_queued_frees_its_place_at_once(tmp_path: Path) -> None:
    """Concurrency 1: one slow pair compares (~7 s here); a client waiting for the slot with
    its body read, and one still waiting for permission to upload (its body unread), hang up:
    each gives its queue place back at once, long before the slot would have been theirs."""
    big = scenes.photo("astronaut").resize((4000, 4000))
    slow = form_body(scenes.encode(big), scenes.pasted_object(big, 0.1), BOUNDARY, pair_id="slow")
    img = scenes.photo("coffee")
    small = form_body(scenes.encode(img), scenes.pasted_object(img), BOUNDARY)
    env = {
        "PAIRWATCH_CONCURRENCY": "1",
        "PAIRWATCH_QUEUE_SIZE": "3",
        "PAIRWATCH_COMPARISON__MAX_IMAGE_SIZE": "[8192, 8192]",
    }
    with serve_process(tmp_path, env) as server:
        holder = SlowUpload(server.port, slow, len(slow))
        wait_for(lambda: _in_flight(server) == (1, 0), 30, 0.02, what="the slow pair to compare")
        # Bodies in memory: 2 x concurrency. The holder has one, this one takes the other and
        # waits for the slot with its body read...
        for_slot = SlowUpload(server.port, small, len(small))
        wait_for(lambda: _in_flight(server) == (1, 1), 10, 0.02, what="a wait for the slot")
        # ...and this one waits for permission to upload, its body unread.
        for_upload = SlowUpload(server.port, small, 0)
        wait_for(lambda: _in_flight(server) == (1, 2), 10, 0.02, what="a wait to upload")

        for_upload.abandon()
        wait_for(lambda: _in_flight(server) == (1, 1), 3, 0.02, what="the upload place back")
        for_slot.abandon()
        wait_for(lambda: _in_flight(server) == (1, 0), 3, 0.02, what="the slot place back")
        assert not [e for e in server.events("pair_compared") if e.get("pair_id") == "slow"]
        gone = server.events("client_disconnected")
        assert [event["stage"] for event in gone] == ["queue", "queue"]

        status, answer = holder.finish()
        assert status == 200 and b'"status":"ok"' in answer
        assert _in_flight(server) == (0, 0)
