"""``pairwatch serve`` against a real uvicorn process on 127.0.0.1, with httpx and raw sockets:
both compare endpoints on real photographs, the original envelope, hostile uploads, the upload
cap, probes, docs, metrics and the access log."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from handler.result import ComparisonResult
from tests.support import scenes
from tests.support.serve_process import ServeProcess, serve_process

CAP = 4 * 1024 * 1024
TOKEN = "webhook-secret-7f3a"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {
        "PAIRWATCH_MAX_INPUT_BYTES": str(CAP),
        "PAIRWATCH_MAX_INPUT_PIXELS": str(30_000_000),
        "PAIRWATCH_CONCURRENCY": "2",
        "PAIRWATCH_QUEUE_SIZE": "4",
    }
    with serve_process(tmp_path_factory.mktemp("serve"), env) as process:
        yield process


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    img = scenes.photo("astronaut")
    return {
        "a": scenes.encode(img),
        "reencoded": scenes.reencoded(img),
        "pasted": scenes.pasted_object(img),
    }


def _v1(server: ServeProcess, a: bytes, b: bytes, **data: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/compare",
        files={"a": ("a.jpg", a, "image/jpeg"), "b": ("b.jpg", b, "image/jpeg")},
        data=data,
        timeout=60,
    )


def _png_header_only(width: int, height: int, padding: int = 0) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with ``padding`` bytes of junk data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = np.random.default_rng(1).bytes(padding) if padding else zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_v1_compare_tells_an_edit_from_a_reencode(
    server: ServeProcess, photos: dict[str, bytes]
) -> None:
    changed = _v1(server, photos["a"], photos["pasted"], pair_id="shop-front")
    assert changed.status_code == 200
    result = ComparisonResult.model_validate(changed.json())
    assert (result.pair_id, result.status, result.is_similar) == ("shop-front", "ok", False)
    assert result.changed_regions and [i.name for i in result.inputs] == ["a.jpg", "b.jpg"]
    assert result.inputs[1].bytes == len(photos["pasted"])
    # Hashed as the upload streamed in: the digest of the whole file.
    assert result.inputs[1].sha256 == hashlib.sha256(photos["pasted"]).hexdigest()

    same = _v1(server, photos["a"], photos["reencoded"])
    assert same.status_code == 200 and same.json()["is_similar"] is True
    assert same.json()["pair_id"].startswith("http-")

    # The same file twice: answered without decoding it, as pixel-identical.
    twice = _v1(server, photos["a"], photos["a"]).json()
    assert twice["status"] == "ok" and twice["metrics"]["pixel_identical"] == 1.0
    assert twice["similarity"] == 1.0 and "detect" not in twice["timings_ms"]


def test_v1_config_overrides_and_bad_requests(
    server: ServeProcess, photos: dict[str, bytes]
) -> None:
    config = json.dumps({"similarity_threshold": 0.5, "max_image_size": [256, 256]})
    answer = _v1(server, photos["a"], photos["pasted"], config=config)
    assert answer.status_code == 200
    body = answer.json()
    assert body["config"]["similarity_threshold"] == 0.5
    # A pasted object is a confident changed region: different whatever the threshold.
    assert body["is_similar"] is False and body["changed_regions"]
    assert max(body["inputs"][0]["processed_size"]) == 256

    # A mistake in a field is a 422 naming it; a form that is not the expected one, a 400.
    bad_value = _v1(server, photos["a"], photos["a"], config='{"image_quality": 500}')
    assert bad_value.status_code == 422 and "image_quality" in bad_value.json()["error"]["message"]
    assert bad_value.json()["error"]["field"] == "config.image_quality"
    not_json = _v1(server, photos["a"], photos["a"], config="{not json")
    assert (not_json.status_code, not_json.json()["error"]["field"]) == (422, "config")
    bad_id = _v1(server, photos["a"], photos["a"], pair_id="x\ny")
    assert (bad_id.status_code, bad_id.json()["error"]["field"]) == (422, "pair_id")
    one_file = httpx.post(server.url + "/v1/compare", files={"a": ("a.jpg", photos["a"])})
    assert one_file.status_code == 400 and one_file.json()["error"]["type"] == "bad_request"
    not_multipart = httpx.post(server.url + "/v1/compare", json={"a": 1})
    assert not_multipart.status_code == 400


def test_original_api_envelope(server: ServeProcess, photos: dict[str, bytes]) -> None:
    two = [("files", ("a.jpg", photos["a"])), ("files", ("b.jpg", photos["pasted"]))]
    answer = httpx.post(
        server.url + "/compare",
        files=two,
        data={"similarity_threshold": "0.6", "focus_elements": "text,logos"},
        timeout=60,
    )
    assert answer.status_code == 200
    envelope = answer.json()
    assert set(envelope) == {"code", "msg", "data"} and envelope["code"] == 200
    assert envelope["data"]["status"] == "ok" and envelope["data"]["is_similar"] is False
    assert envelope["data"]["config"]["similarity_threshold"] == 0.6
    assert envelope["data"]["config"]["focus_elements"] == ["text", "logos"]

    for files in (two[:1], [*two, ("files", ("c.jpg", photos["a"]))]):
        wrong = httpx.post(server.url + "/compare", files=files, timeout=60)
        assert wrong.status_code == 400
        assert wrong.json() == {"code": 400, "msg": "exactly two files are required", "data": None}

    broken = httpx.post(
        server.url + "/compare",
        files=[("files", ("a.jpg", photos["a"])), ("files", ("b.jpg", b"not an image"))],
    )
    assert broken.status_code == 400 and broken.json()["code"] == 400
    assert "not an image" in broken.json()["msg"]
    assert broken.json()["data"]["error"]["type"] == "invalid_image"
    bad_field = httpx.post(server.url + "/compare", files=two, data={"image_quality": "x"})
    assert bad_field.status_code == 400 and "image_quality" in bad_field.json()["msg"]


@pytest.mark.parametrize(
    ("make", "error_type"),
    [
        (lambda p: b"", "invalid_image"),
        (lambda p: b"hello, not an image\n" * 10, "invalid_image"),
        (lambda p: p["a"][: len(p["a"]) // 2], "invalid_image"),
        (lambda p: _png_header_only(40_000, 40_000), "image_too_large"),
        (lambda p: _png_header_only(20_000, 15_000, padding=2 << 20), "image_too_large"),
    ],
    ids=["empty", "text", "truncated", "bomb", "huge_dimensions"],
)
def test_hostile_uploads_get_error_results(
    server: ServeProcess, photos: dict[str, bytes], make: Any, error_type: str
) -> None:
    hostile = make(photos)
    answer = httpx.post(
        server.url + "/v1/compare",
        files={"a": ("a.jpg", photos["a"]), "b": ("../../etc/passwd.png", hostile)},
        timeout=60,
    )
    assert answer.status_code == 422
    result = ComparisonResult.model_validate(answer.json())
    assert result.status == "error" and result.error is not None
    assert (result.error.type, result.error.input) == (error_type, "b")
    assert result.inputs[1].name == "passwd.png"  # a label, never a path
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


def test_huge_dimensions_are_refused_from_the_header_while_streaming(
    server: ServeProcess, photos: dict[str, bytes]
) -> None:
    """The bomb's body is counted, not kept: the error says so before anything is decoded."""
    hostile = _png_header_only(20_000, 15_000, padding=3 << 20)
    started = time.perf_counter()
    answer = httpx.post(
        server.url + "/v1/compare",
        files={"a": ("bomb.png", hostile), "b": ("b.jpg", photos["a"])},
        timeout=60,
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["type"], error["input"]) == ("image_too_large", "a")
    assert "300.0 megapixels" in error["message"]
    assert answer.json()["inputs"][1]["bytes"] is None  # the pair stopped at input a
    assert time.perf_counter() - started < 10


def _raw_upload(port: int, total: int, chunk: int = 64 * 1024) -> tuple[int, bytes]:
    """POST a multipart body of ``total`` bytes by hand; stop sending as soon as the server
    answers or closes. Returns (bytes of body sent, the raw response)."""
    boundary = "pairwatchboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="a"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {total}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request + head)
    sent = len(head)
    payload = b"\xff" * chunk
    response = b""
    sock.setblocking(False)
    try:
        while sent < total:
            with contextlib.suppress(BlockingIOError):
                response += sock.recv(65536)
            if response:
                break
            try:
                sent += sock.send(payload[: total - sent])
            except BlockingIOError:
                time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        sock.close()
    return sent, response


def test_upload_over_the_cap_is_refused_without_reading_the_rest(server: ServeProcess) -> None:
    total = 256 * 1024 * 1024
    sent, response = _raw_upload(server.port, total)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"connection: close" in rest.lower()
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "upload_too_large"
    # What the server took: the cap, uvicorn's 64 KiB read-ahead and the two sockets' buffers.
    assert sent < CAP + 16 * 1024 * 1024, f"{sent} bytes were accepted of {total}"
    refused = server.events("upload_refused")[-1]
    # The server itself read the cap and at most one chunk more from the connection (asyncio
    # reads up to 256 KiB at once), plus the part's multipart headers before its data.
    assert CAP < refused["bytes_read"] <= CAP + 256 * 1024 + 1024
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_probes_docs_and_openapi(server: ServeProcess) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready", "comparator": "metrics"}
    assert "swagger" in httpx.get(server.url + "/docs").text.lower()
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/compare", "/compare", "/v1/events", "/healthz", "/readyz", "/metrics"} <= set(
        paths
    )
    assert "multipart/form-data" in paths["/v1/compare"]["post"]["requestBody"]["content"]


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0


def test_metrics_move_with_each_pair(server: ServeProcess, photos: dict[str, bytes]) -> None:
    def scrape() -> str:
        answer = httpx.get(server.url + "/metrics")
        assert answer.headers["content-type"].startswith("text/plain")
        return answer.text

    before = scrape()
    assert _v1(server, photos["a"], photos["pasted"]).status_code == 200
    assert _v1(server, photos["a"], b"junk").status_code == 422
    after = scrape()
    ok = {"source": "http", "comparator": "metrics", "status": "ok"}
    failed = {**ok, "status": "error"}
    assert (
        _sample(after, "pairwatch_pairs_total", **ok)
        == _sample(before, "pairwatch_pairs_total", **ok) + 1
    )
    assert (
        _sample(after, "pairwatch_pairs_total", **failed)
        == _sample(before, "pairwatch_pairs_total", **failed) + 1
    )
    assert _sample(after, "pairwatch_pair_errors_total", type="invalid_image") >= 1
    for stage in ("fetch", "prepare", "compare"):
        assert _sample(after, "pairwatch_stage_seconds_count", stage=stage) > _sample(
            before, "pairwatch_stage_seconds_count", stage=stage
        )
    for name in ("pairwatch_queue_depth", "pairwatch_in_flight"):
        assert _sample(after, name) == 0
    assert "pairwatch_events_total" in after and "pairwatch_vl_visual_tokens" in after


def test_access_log_has_one_line_per_request(
    server: ServeProcess, photos: dict[str, bytes]
) -> None:
    _v1(server, photos["a"], photos["a"], pair_id="logged-pair")
    httpx.post(
        server.url + "/v1/events?token=" + TOKEN,
        content=b"{}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    lines = server.events("http_request")
    compare = [line for line in lines if line.get("pair_id") == "logged-pair"]
    assert len(compare) == 1
    assert {"method", "path", "status", "duration_ms"} <= set(compare[0])
    assert (compare[0]["method"], compare[0]["path"], compare[0]["status"]) == (
        "POST",
        "/v1/compare",
        200,
    )
    assert TOKEN not in server.log_path.read_text()
    for line in server.events("pair_compared"):
        assert "similarity" in line


def test_hostile_pixels_in_a_big_real_image_under_the_cap(server: ServeProcess) -> None:
    """A real 36 MP PNG (over the 30 MP budget) is refused, the server carries on."""
    big = Image.new("RGB", (6000, 6000), (10, 20, 30))
    data = scenes.encode(big, "PNG")
    assert len(data) < CAP
    answer = httpx.post(
        server.url + "/v1/compare",
        files={"a": ("a.png", data), "b": ("b.png", data)},
        timeout=60,
    )
    assert answer.status_code == 422 and answer.json()["error"]["type"] == "image_too_large"


def test_comparison_result_is_the_watchers_schema(
    server: ServeProcess, photos: dict[str, bytes], tmp_path: Path
) -> None:
    """Same fields as ``pairwatch schema``'s result (validated by the JSON Schema itself)."""
    import jsonschema

    from handler.result import result_json_schema

    answer = _v1(server, photos["a"], photos["reencoded"])
    jsonschema.validate(answer.json(), result_json_schema())
