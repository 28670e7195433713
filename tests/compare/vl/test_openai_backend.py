"""``OpenAIBackend`` against a real ``transformers serve`` on 127.0.0.1 (tiny offline model).

The server is started once for the module (``engine``) and answers a fixed valid JSON (the tiny
model is wired with ``--answer``). 429 and 500 come from ``FaultProxy`` in front of it: a fake
for those two status codes only, since an engine cannot be made to throttle or fail on demand;
every other answer, 4xx included, is the real server's.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image
from pydantic import SecretStr

from handler import config
from handler.compare.vl import VLComparator
from handler.compare.vl.openai_backend import (
    MAX_BUSY_WAITS,
    PROBE_WORD,
    RETRY_DELAYS_S,
    EngineReply,
    OpenAIBackend,
    public_endpoint,
)
from handler.compare.vl.prompt import answer_schema
from handler.compare.vl.protocol import LabelledImage, Request
from handler.config import ComparisonConfig, ConfigFileError, load_settings
from handler.crops import CROP_SIDE
from handler.errors import ComparisonTimeout, ModelCrashed, ModelUnavailable
from handler.images import prepare
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import scenes, tiny_vlm
from tests.support.engine_server import FaultProxy, TransformersServe, fault_proxy, free_port

ANSWER = json.dumps(
    {
        "similarity": 0.42,
        "differences": [
            {"aspect": "presence", "element": "object", "description": "A patch was pasted "
             "into image B.", "region": None}
        ],
        "summary": "Image B has a pasted patch.",
    }
)  # fmt: skip
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServe]:
    root = tmp_path_factory.mktemp("engine")
    model = tiny_vlm.build(root / "model", answer=ANSWER)
    server = TransformersServe(model, root / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(engine: TransformersServe) -> Iterator[FaultProxy]:
    with fault_proxy(engine.url) as running:
        yield running


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    cat = scenes.photo("chelsea")
    return [("Image A:", scenes.encode(cat)), ("Image B:", scenes.pasted_object(cat))]


class Sleeps(list[float]):
    """Records the back-off pauses instead of waiting them out."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def backend(url: str, model: str, **kwargs: object) -> OpenAIBackend:
    return OpenAIBackend(endpoint=url, model=model, **kwargs)  # type: ignore[arg-type]


def ready(url: str, model: str, **kwargs: object) -> tuple[OpenAIBackend, Sleeps]:
    """A probed backend whose back-off pauses are recorded, not waited out."""
    sleeps = Sleeps()
    be = backend(url, model, sleep=sleeps, **kwargs)
    be.wait_ready()
    return be, sleeps


def ask(be: OpenAIBackend, images: list[tuple[str, bytes]], timeout_s: float = 30.0) -> EngineReply:
    return be.ask(images, "Compare the images.", schema={"type": "object"}, max_tokens=64,
                  timeout_s=timeout_s)  # fmt: skip


def test_a_pair_is_answered_by_the_real_server(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be = backend(proxy.url, engine.model, api_key=SecretStr(SECRET))
    be.wait_ready()
    reply = be.ask(images, "Compare.", schema={"type": "object"}, max_tokens=64, timeout_s=30)
    assert reply.text == ANSWER and reply.finish_reason == "stop"
    # transformers serve accepts response_format but ignores it: the probe finds that out.
    assert reply.constrained is False
    assert reply.attempts == 1 and reply.new_tokens > 0
    assert reply.prompt_tokens is not None and reply.prompt_tokens > 50  # the images' tokens
    assert proxy.requests == 2  # one probe, one pair: the probe is not repeated
    assert set(proxy.authorizations) == {f"Bearer {SECRET}"}
    probe, pair = proxy.bodies
    assert probe["response_format"]["type"] == "json_schema"
    assert "response_format" not in pair  # the server ignores it: asked without
    assert pair["temperature"] == 0 and pair["max_tokens"] == 64
    (message,) = pair["messages"]
    parts = message["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [parts[0]["text"], parts[2]["text"], parts[4]["text"]] == ["Image A:", "Image B:",
                                                                       "Compare."]  # fmt: skip
    for part, (_, jpeg) in zip((parts[1], parts[3]), images, strict=True):
        prefix, _, data = part["image_url"]["url"].partition(",")
        assert prefix == "data:image/jpeg;base64"
        assert base64.b64decode(data) == jpeg  # the prepared bytes, not re-encoded
    be.close()


def test_a_pair_with_a_changed_region_sends_its_crops(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    """Through the pipeline and the VL comparator: the overviews, then the crop of the one
    changed region in A and in B, each an ``image_url`` part after its label, then the prompt
    naming the region; the real server reads all four pictures."""
    settings = load_settings(
        comparator="vl", model=engine.model, vl_backend="openai", vl_endpoint=proxy.url
    )
    vl = VLComparator(settings)
    small = ComparisonConfig(max_image_size=(256, 256), processing_timeout=60)
    try:
        (a_name, a), (b_name, b) = images
        result = compare_pair(
            "p", ImageInput(a_name, lambda: a), ImageInput(b_name, lambda: b), small, vl,
            max_input_pixels=10**8,
        ).result  # fmt: skip
    finally:
        vl.close()
    assert result.status == "ok", result.error
    assert result.vl is not None and result.vl.raw_text == ANSWER
    (region,) = result.changed_regions
    (message,) = proxy.bodies[-1]["messages"]
    parts = message["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"] * 4 + ["text"]
    labels = [p["text"] for p in parts[0:8:2]]
    assert labels == ["Image A:", "Image B:", "Region 0 in image A:", "Region 0 in image B:"]
    pictures = [base64.b64decode(p["image_url"]["url"].partition(",")[2]) for p in parts[1:8:2]]
    # The overview is A's prepared image (made from detection's decode: as close to
    # ``prepare``'s own as one JPEG is to another).
    overview = Image.open(io.BytesIO(pictures[0])).convert("RGB")
    reference = Image.open(io.BytesIO(prepare(a, small.max_image_size, small.image_quality).jpeg))
    assert overview.size == reference.size
    gap = np.abs(np.asarray(overview, np.int16) - np.asarray(reference, np.int16))
    assert gap.mean() < 2.0, gap.mean()
    crop_a, crop_b = (Image.open(io.BytesIO(jpeg)) for jpeg in pictures[2:])
    assert crop_a.format == crop_b.format == "JPEG" and crop_a.size == crop_b.size
    assert max(crop_a.size) <= CROP_SIDE
    box = f"region 0, changed, in A x={region.x} y={region.y} {region.width}x{region.height}"
    assert box in parts[8]["text"]


def test_concurrent_pairs_run_at_once_up_to_the_limit(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be = backend(proxy.url, engine.model, max_in_flight=3)
    be.wait_ready()
    start = threading.Barrier(8)
    texts: list[str] = []

    def one() -> None:
        start.wait()
        texts.append(be.ask(images, "x", schema=None, max_tokens=64, timeout_s=60).text)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert texts == [ANSWER] * 8
    assert 2 <= proxy.max_in_flight <= 3


def test_429_is_waited_out_per_retry_after(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be, sleeps = ready(proxy.url, engine.model)
    proxy.plan.faults, proxy.plan.retry_after = [429, 429], "2"
    reply = ask(be, images)
    assert reply.text == ANSWER and reply.attempts == 3
    assert sleeps == [2.0, 2.0]


def test_429_without_end_gives_model_unavailable(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be, sleeps = ready(proxy.url, engine.model)
    proxy.plan.faults, proxy.plan.retry_after = [429] * 20, "Wed, 21 Oct 2015 07:28:00 GMT"
    before = proxy.requests
    with pytest.raises(ModelUnavailable, match="busy"):
        ask(be, images)
    assert proxy.requests - before == MAX_BUSY_WAITS + 1
    assert sleeps == [0.0] * MAX_BUSY_WAITS  # a date in the past: no wait at all


def test_a_retry_after_past_the_deadline_is_not_waited_for(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be, sleeps = ready(proxy.url, engine.model)
    proxy.plan.faults, proxy.plan.retry_after = [429], "20"
    with pytest.raises(ModelUnavailable, match="429"):
        ask(be, images, timeout_s=5)
    assert sleeps == []


def test_500_is_retried_with_backoff(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be, sleeps = ready(proxy.url, engine.model)
    proxy.plan.faults = [500, 500]
    reply = ask(be, images)
    assert reply.text == ANSWER and reply.attempts == 3
    assert sleeps == list(RETRY_DELAYS_S[:2])


def test_persistent_500_gives_model_unavailable_without_the_key(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]]
) -> None:
    be, sleeps = ready(proxy.url, engine.model, api_key=SecretStr(SECRET))
    proxy.plan.faults = [500] * 10
    proxy.plan.body = f"upstream failed for Authorization: Bearer {SECRET} " + "x" * 1000
    with pytest.raises(ModelUnavailable) as caught:
        ask(be, images)
    message = caught.value.message
    assert "500 Internal Server Error" in message and "Bearer ***" in message
    assert SECRET not in message and len(message) < 500
    assert sleeps == list(RETRY_DELAYS_S)


def test_a_server_that_is_down_gives_model_unavailable(images: list[tuple[str, bytes]]) -> None:
    """A pair asked without ``wait_ready`` (``pairwatch compare``) probes first; for
    ``wait_ready`` itself see tests/compare/vl/test_engine_readiness.py."""
    sleeps = Sleeps()
    be = backend(f"http://127.0.0.1:{free_port()}/v1", "m", sleep=sleeps)
    with pytest.raises(ModelUnavailable, match="Connection refused"):
        ask(be, images)
    assert sleeps == list(RETRY_DELAYS_S)
    with pytest.raises(ModelUnavailable, match="Connection refused"):
        ask(be, images)
    assert sleeps == list(RETRY_DELAYS_S) * 2  # the probe is tried again for the next pair


def test_a_pair_waits_for_a_hanging_probe_only_until_its_deadline(
    images: list[tuple[str, bytes]],
) -> None:
    """A listening socket that never answers (a hung server) holds the start-up probe for its
    whole ``vl_load_timeout``; a pair meanwhile gives up at its own deadline."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"
        be = backend(url, "m", probe_timeout_s=30.0)

        def probe() -> None:
            with contextlib.suppress(ModelUnavailable):  # it gives up once closed (below)
                be.wait_ready()

        probing = threading.Thread(target=probe, daemon=True)
        probing.start()
        time.sleep(0.3)  # the probe holds the lock now
        started = time.monotonic()
        with pytest.raises(ModelUnavailable, match="readiness probe"):
            ask(be, images, timeout_s=1.0)
        assert time.monotonic() - started < 2.0
    be.close()


def test_an_unknown_host_gives_model_unavailable(images: list[tuple[str, bytes]]) -> None:
    be = backend("http://pairwatch-engine.invalid/v1", "m", sleep=Sleeps())
    with pytest.raises(ModelUnavailable, match="cannot reach"):
        ask(be, images)


def open_connections(port: int) -> int:
    """This process's established TCP connections to ``port``."""
    return sum(
        1
        for connection in psutil.Process().net_connections(kind="tcp")
        if connection.raddr and connection.raddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )  # fmt: skip


def test_a_server_slower_than_the_deadline_gives_timeout(
    engine: TransformersServe, images: list[tuple[str, bytes]]
) -> None:
    be = backend(engine.url, engine.model)
    be.wait_ready()
    started = time.monotonic()
    with pytest.raises(ComparisonTimeout):
        ask(be, images, timeout_s=0.02)
    assert time.monotonic() - started < 0.5
    # The probe's pooled connection carried the pair and was closed on the timeout, which is
    # how the server learns the request is cancelled.
    assert open_connections(engine.port) == 0
    assert ask(be, images).text == ANSWER
    assert open_connections(engine.port) == 1  # kept alive for the next pair


def test_a_rejected_request_gives_model_crashed_with_the_servers_message(
    engine: TransformersServe, images: list[tuple[str, bytes]]
) -> None:
    be = backend(engine.url, "not-the-served-model")
    with pytest.raises(ModelCrashed, match=r"400 Bad Request: .*pinned"):
        be.ask(images, "x", schema=None, max_tokens=8, timeout_s=30)
    # With a schema the readiness probe meets the refusal first: a deployment problem.
    with pytest.raises(ModelUnavailable, match="refuses requests"):
        ask(be, images)


def test_public_endpoint_drops_credentials() -> None:
    assert public_endpoint("https://user:pw@vllm:8000/v1?key=s#x") == "https://vllm:8000/v1"
    assert public_endpoint("http://[::1]:8000/v1") == "http://[::1]:8000/v1"


def test_the_api_key_comes_from_a_file_and_is_never_shown(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{SECRET}\n")
    settings = load_settings(
        vl_backend="openai", vl_endpoint="http://e/v1", vl_api_key_file=key_file
    )
    assert settings.vl_api_key is not None
    assert settings.vl_api_key.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()
    with pytest.raises(ConfigFileError, match="cannot read secret file"):
        load_settings(vl_api_key_file=tmp_path / "missing")
    with pytest.raises(ConfigFileError, match="needs vl_endpoint"):
        load_settings(vl_backend="openai")


# -- the commands, end to end --------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_LOG_LEVEL": "DEBUG",  # the most talkative level must not leak the key either
        "PAIRWATCH_VL_API_KEY": SECRET,
        "PAIRWATCH_COMPARISON__MAX_IMAGE_SIZE": "[256, 256]",
    }


def pairwatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher.cli", *args],
        capture_output=True, text=True, env=cli_env(), timeout=timeout,
    )  # fmt: skip


def put_pair(folder: Path, images: list[tuple[str, bytes]]) -> None:
    """Both images renamed into place, as rsync and editors do: read at once."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, data) in zip(("a.jpg", "b.jpg"), images, strict=True):
        temporary = folder / f".{name}.part"
        temporary.write_bytes(data)
        temporary.rename(folder / name)


def wait_for_result(path: Path, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            document: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            document = {}
        if document and predicate(document):
            return document
        time.sleep(0.1)
    raise AssertionError(f"no such result at {path}: {path.read_text() if path.exists() else '-'}")


def assert_openai_ok(document: dict[str, Any], endpoint: str) -> None:
    result = ComparisonResult.model_validate(document)
    assert result.status == "ok", result.error
    assert result.comparator.backend == "openai" and result.comparator.endpoint == endpoint
    assert result.similarity == 0.42 and result.is_similar is False
    assert result.differences[0].description == "A patch was pasted into image B."
    assert result.vl is not None and result.vl.raw_text == ANSWER


def test_compare_through_the_server(
    engine: TransformersServe, proxy: FaultProxy, images: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(images[0][1])
    b.write_bytes(images[1][1])
    proc = pairwatch("compare", str(a), str(b), "--model", engine.model, "--vl-endpoint", proxy.url)
    assert proc.returncode == 0, proc.stderr
    assert_openai_ok(json.loads(proc.stdout), proxy.url)
    assert SECRET not in proc.stdout + proc.stderr
    assert f"Bearer {SECRET}" in proxy.authorizations  # it was sent, just never shown
    events = [json.loads(line)["event"] for line in proc.stderr.splitlines() if line[:1] == "{"]
    assert {"vl_engine_ready", "vl_generated", "pair_compared"} <= set(events)


def test_watch_once_through_the_server(
    engine: TransformersServe, images: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    for name in ("shop", "door"):
        put_pair(inbox / name, images)
    proc = pairwatch("watch", str(inbox), "--once", "--model", engine.model,
                     "--vl-endpoint", engine.url)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("shop", "door"):
        result = inbox / name / "result.json"
        assert_openai_ok(json.loads(result.read_text()), engine.url)
        assert SECRET not in result.read_text()
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_server_stopped_mid_run(
    engine: TransformersServe, images: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    """The watcher outlives its server: pairs meanwhile get ``model_unavailable``, and are
    compared again (``ok``) once the server is back."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "watch", str(inbox), "--settle-time", "0",
         "--model", engine.model, "--vl-endpoint", engine.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        put_pair(inbox / "first", images)
        assert_openai_ok(wait_for_result(inbox / "first" / "result.json", bool), engine.url)
        engine.stop()
        put_pair(inbox / "second", images)
        failed = wait_for_result(inbox / "second" / "result.json", bool)
        assert failed["status"] == "error" and failed["error"]["type"] == "model_unavailable"
        assert "Connection refused" in failed["error"]["message"]
        assert watcher.poll() is None
        engine.start()
        put_pair(inbox / "second", images)  # the same images again: a failure of the moment
        document = wait_for_result(
            inbox / "second" / "result.json", lambda d: d["status"] == "ok"
        )  # is compared again
        assert_openai_ok(document, engine.url)
    finally:
        if not engine.running:
            engine.start()
        watcher.send_signal(signal.SIGTERM)
        _, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, stderr
    assert SECRET not in stderr


def test_a_server_that_passes_the_probe_gets_the_answer_schema(
    tmp_path: Path, images: list[tuple[str, bytes]]
) -> None:
    """No constraining engine (vLLM, SGLang, Ollama) runs here, so a real ``transformers serve``
    whose model is wired to give the probe's only valid answer stands in for one: what is
    checked is that a passed probe makes every pair carry the answer schema."""
    model = tiny_vlm.build(tmp_path / "model", answer=json.dumps({"probe": PROBE_WORD}))
    server = TransformersServe(model, tmp_path / "serve.log")
    server.start()
    try:
        with fault_proxy(server.url) as proxy:
            be = backend(proxy.url, server.model)
            reply = be.generate(
                Request(images=tuple(LabelledImage(*image) for image in images),
                        prompt="Compare.", max_pixels=1, timeout_s=30,
                        expires_at=time.monotonic() + 30, schema=answer_schema())
            )  # fmt: skip
            assert reply.constrained is True and reply.kind == "ok"
            assert reply.details().constrained is True
            pair = proxy.bodies[-1]["response_format"]
            assert pair["type"] == "json_schema"
            assert pair["json_schema"]["schema"] == answer_schema()
            assert pair["json_schema"]["name"] == "ComparisonAnswer"
    finally:
        server.stop()


def test_the_openai_backend_needs_no_vl_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings check the ``vl`` extra only where the model runs locally, and building the
    comparator for a server imports no torch (a fresh interpreter tells)."""
    monkeypatch.setattr(config, "VL_PACKAGES", ("pairwatch_no_such_package",))
    with pytest.raises(ConfigFileError, match="optional extra 'vl'"):
        load_settings(comparator="vl", model="m")
    load_settings(comparator="vl", model="m", vl_backend="openai", vl_endpoint="http://e/v1")
    code = (
        "import sys\n"
        "from handler.compare import create_comparator\n"
        "from handler.config import load_settings\n"
        "c = create_comparator(load_settings(comparator='vl', model='m', vl_backend='openai',"
        " vl_endpoint='http://127.0.0.1:9/v1'))\n"
        "assert c.info.backend == 'openai', c.info\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
