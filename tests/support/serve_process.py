"""``pairwatch serve`` as a real process on 127.0.0.1 for the tests and the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.s3_servers import ROOT, free_port
from tests.support.waiting import wait_for


@dataclass
class ServeProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (anything else, e.g. a traceback, is skipped)."""
        lines = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]


@contextmanager
def serve_process(
    log_dir: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port: int | None = None,
    ready: bool = True,
) -> Iterator[ServeProcess]:
    """Start ``python -m watcher.cli serve`` (on a free port unless given); wait for /readyz
    (for /healthz only when not ``ready``: a test of readiness itself); stop it after."""
    port = port or free_port()
    log_path = log_dir / f"serve-{port}.log"
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PAIRWATCH_LOG_FORMAT": "json",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "serve", "--port", str(port), *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    server = ServeProcess(f"http://127.0.0.1:{port}", port, process, log_path)

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {log_path.read_text()[-3000:]}")
        try:
            probe = "/readyz" if ready else "/healthz"
            return httpx.get(server.url + probe, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, 0.1, "pairwatch serve to be ready")
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
