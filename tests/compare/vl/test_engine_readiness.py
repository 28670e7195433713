"""Readiness of the ``openai`` VL backend, against a real ``transformers serve`` on 127.0.0.1
(the offline tiny model): ``wait_ready`` blocks until the engine answers its probe, logging each
failed try, and gives up at ``vl_load_timeout``; a refused probe fails at once; ``pairwatch
serve``'s ``/readyz`` follows the engine as it comes, goes and comes back.

The engine's port is chosen up front and nothing listens there until a test starts it, which
is how a cold engine looks to the watchers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from handler.compare.vl.openai_backend import OpenAIBackend
from handler.errors import ModelUnavailable
from tests.support import scenes, tiny_vlm
from tests.support.engine_server import TransformersServe, fault_proxy, free_port
from tests.support.logs import captured_logs
from tests.support.serve_process import serve_process
from tests.support.waiting import wait_for

ANSWER = json.dumps({"similarity": 1.0, "differences": [], "summary": "The same."})


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServe]:
    """An engine on a fixed port, not started: each test starts or stops it as it needs."""
    root = tmp_path_factory.mktemp("engine")
    server = TransformersServe(tiny_vlm.build(root / "model", answer=ANSWER), root / "serve.log")
    try:
        yield server
    finally:
        server.stop()


class ScaledSleep(list[float]):
    """Records each back-off pause and waits a tenth of it (real time passes, faster)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(seconds / 10)


def test_wait_ready_gives_up_at_vl_load_timeout_after_logging_each_try() -> None:
    sleeps = ScaledSleep()
    with captured_logs() as logs:
        be = OpenAIBackend(
            endpoint=f"http://127.0.0.1:{free_port()}/v1",
            model="m",
            probe_timeout_s=2.5,
            sleep=sleeps,
        )
        started = time.monotonic()
        with pytest.raises(ModelUnavailable, match="did not answer within vl_load_timeout"):
            be.wait_ready()
        assert time.monotonic() - started < 4.0
    waits = [e for e in logs if e["event"] == "vl_engine_not_ready"]
    assert waits and all(e["log_level"] == "warning" for e in waits)
    assert [e["attempt"] for e in waits] == list(range(1, len(waits) + 1))
    assert waits[0]["retry_in_s"] == 1.0 and "Connection refused" in waits[0]["error"]
    (gave_up,) = [e for e in logs if e["event"] == "vl_engine_unavailable"]
    assert gave_up["log_level"] == "error" and gave_up["tries"] == len(waits) + 1
    assert any(e["event"] == "vl_engine_retry" for e in logs)  # each request's retries too
    be.close()


def test_wait_ready_blocks_until_a_cold_engine_answers(engine: TransformersServe) -> None:
    engine.stop()
    outcome: dict[str, object] = {}
    with captured_logs() as logs:
        be = OpenAIBackend(endpoint=engine.url, model=engine.model, probe_timeout_s=300)

        def wait() -> None:
            try:
                be.wait_ready()
                outcome["ready_at"] = time.monotonic()
            except ModelUnavailable as exc:  # pragma: no cover - reported by the assert below
                outcome["error"] = exc

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_for(
            lambda: any(e["event"] == "vl_engine_not_ready" for e in logs), 30, what="a failed try"
        )
        assert waiter.is_alive() and not outcome  # blocks: no work may be taken yet
        engine.start()  # returns once the engine answers /health
        up = time.monotonic()
        waiter.join(60)
    assert "ready_at" in outcome, outcome
    # The next try comes within the longest back-off (5 s) plus a probe's own retries.
    assert float(outcome["ready_at"]) - up < 20  # type: ignore[arg-type]
    assert [e["event"] for e in logs].count("vl_engine_ready") == 1
    assert not any(e["event"] == "vl_engine_unavailable" for e in logs)
    be.close()


def test_a_refused_probe_is_unavailable_at_once(engine: TransformersServe) -> None:
    """A 4xx (here: a model the engine does not serve) is a deployment problem: waiting for
    ``vl_load_timeout`` would not help."""
    if not engine.running:
        engine.start()
    be = OpenAIBackend(endpoint=engine.url, model="not-the-served-model", probe_timeout_s=300)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="refuses requests"):
        be.wait_ready()
    assert time.monotonic() - started < 10
    be.close()


def _readyz(url: str) -> tuple[int, dict[str, str]]:
    answer = httpx.get(url + "/readyz", timeout=10)
    return answer.status_code, answer.json()


@pytest.mark.slow
def test_readyz_follows_the_engine(engine: TransformersServe, tmp_path: Path) -> None:
    """``serve --vl-endpoint`` with nothing listening there: 503; the engine starts: 200; it
    stops: 503 again (the cached ``GET /models`` check); it is back: 200."""
    engine.stop()
    args = ("--comparator", "vl", "--model", engine.model, "--vl-endpoint", engine.url)
    with serve_process(tmp_path, args=args, ready=False) as server:
        status, body = _readyz(server.url)
        assert status == 503 and body["status"] == "not_ready", body
        assert "starting" in body["reason"]

        engine.start()
        wait_for(lambda: _readyz(server.url)[0] == 200, 60, 0.2, "ready once the engine answers")
        assert _readyz(server.url)[1] == {"status": "ready", "comparator": "vl"}

        engine.stop()
        wait_for(lambda: _readyz(server.url)[0] == 503, 20, 0.2, "503 while the engine is gone")
        reason = _readyz(server.url)[1]["reason"]
        assert "does not answer" in reason and engine.url in reason

        engine.start()
        wait_for(lambda: _readyz(server.url)[0] == 200, 20, 0.2, "200 once it is back")

        events = [e["event"] for e in server.logs()]
        assert "vl_engine_not_ready" in events and "vl_engine_ready" in events
        assert "vl_engine_not_answering" in events and "vl_engine_answers" in events
        server.process.terminate()
        assert server.process.wait(30) == 0


def test_every_request_to_the_engine_carries_the_same_bearer_key(
    engine: TransformersServe, tmp_path: Path
) -> None:
    """The readiness probes (``wait_ready``'s chat probe, ``/readyz``'s ``GET /models``) and
    the pairs' requests: all with ``Authorization: Bearer <vl_api_key>``, none without."""
    engine.start()
    key = "engine-key-5e1f"
    with fault_proxy(engine.url) as proxy:
        args = ("--comparator", "vl", "--model", engine.model, "--vl-endpoint", proxy.url)
        with serve_process(tmp_path, env={"PAIRWATCH_VL_API_KEY": key}, args=args) as server:
            assert _readyz(server.url)[0] == 200
            img = scenes.photo("chelsea")
            files = {"a": ("a.jpg", scenes.encode(img)), "b": ("b.jpg", scenes.pasted_object(img))}
            answer = httpx.post(server.url + "/v1/compare", files=files, timeout=120)
            assert answer.status_code == 200, answer.text[:300]
            assert answer.json()["vl"]["skipped"] is False
            logged = server.log_path.read_text()
    assert proxy.gets >= 1 and proxy.requests - proxy.gets >= 2  # probe(s) and the pair
    assert set(proxy.authorizations) == {f"Bearer {key}"}
    assert key not in logged
