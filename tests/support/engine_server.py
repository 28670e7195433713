"""Real OpenAI-compatible servers on loopback for the ``vl_backend = "openai"`` tests.

``TransformersServe`` runs transformers' own server (``transformers serve``, the
``transformers[serving]`` extra) on the offline tiny model: a real FastAPI/uvicorn process that
decodes the data-URI images, runs the processor and ``generate`` and answers chat completions.

``FaultProxy`` sits in front of it and answers chosen requests with 429 or 500 itself,
forwarding everything else unchanged. It is a fake only for those two status codes (an engine
cannot be made to throttle or fail on demand); it also counts requests in flight and records
the headers it saw, so tests can check what pairwatch sends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

#: The tiny model answers its fixed text in well under a second; loading it takes ~10-20 s here.
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TransformersServe:
    """``transformers serve MODEL_DIR --host 127.0.0.1 --port P`` as a child process."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """The served model's name: ``transformers serve`` pins it to the path it was given."""
        return str(self.model_dir)

    def start(self) -> None:
        """Start it (on the same port as before, after a ``stop``) and wait until it answers."""
        binary = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(binary), "serve", str(self.model_dir), "--host", "127.0.0.1",
                 "--port", str(self.port), "--device", "cpu", "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"transformers serve did not start in {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


@dataclass
class ProxyPlan:
    """What the proxy does with the next requests: ``faults`` is consumed one per request
    (``429`` or ``500``); once empty, requests are forwarded."""

    faults: list[int] = field(default_factory=list)
    retry_after: str | None = "1"
    #: Text put into every fault's body (to check pairwatch never repeats a secret from it).
    body: str = "fault injected by the test proxy"


class FaultProxy:
    """A threaded loopback HTTP proxy to ``upstream`` that injects 429/500 per ``plan``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = ProxyPlan()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        #: The ``Authorization`` header of every request, GETs included.
        self.authorizations: list[str] = []
        self.gets = 0
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    proxy.requests += 1
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    proxy.authorizations.append(self.headers.get("Authorization", ""))
                    proxy.bodies.append(json.loads(body or b"{}"))
                    fault = proxy.plan.faults.pop(0) if proxy.plan.faults else None
                # Out of flight before the answer is written: a client that has read it may
                # send its next request before this thread would get to count it done.
                try:
                    if fault is not None:
                        answer = fault, proxy.plan.body.encode(), proxy.plan.retry_after
                    else:
                        answer = self._forward(body)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1
                self._answer(*answer)

            def do_GET(self) -> None:
                """Forwarded as it is (``GET /models``: readiness checks); recorded too."""
                with proxy._lock:
                    proxy.requests += 1
                    proxy.authorizations.append(self.headers.get("Authorization", ""))
                    proxy.gets += 1
                upstream = httpx.get(proxy.upstream + self.path.removeprefix("/v1"), timeout=60)
                self._answer(upstream.status_code, upstream.content, None)

            def _forward(self, body: bytes) -> tuple[int, bytes, str | None]:
                path = self.path.removeprefix("/v1")
                upstream = httpx.post(
                    proxy.upstream + path,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                return upstream.status_code, upstream.content, None

            def _answer(self, status: int, body: bytes, retry_after: str | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if retry_after is not None and status == 429:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(body)

        return Handler


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
