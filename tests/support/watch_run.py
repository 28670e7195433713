"""Run the real ``pairwatch`` CLI in a subprocess and read its JSON log lines back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.logs import json_events

PAIRWATCH = [sys.executable, "-m", "watcher.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``PAIRWATCH_*`` of the caller's, JSON logs on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
    return {**env, "PAIRWATCH_LOG_FORMAT": "json", "PAIRWATCH_SETTLE_TIME": "0.2", **extra}


@dataclass(frozen=True)
class WatchRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


def watch_once(root: Path, *args: str, timeout: float = 60) -> WatchRun:
    """``pairwatch watch ROOT --once``: every pending pair processed, then exit."""
    proc = subprocess.run(
        [*PAIRWATCH, "watch", str(root), "--once", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )
    return WatchRun(proc.returncode, json_events(proc.stderr), proc.stderr)


def age(root: Path, seconds: float = 60) -> None:
    """Back-date every file under ``root`` so that a run does not wait for it to settle."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not entered
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (past, past), follow_symlinks=False)
