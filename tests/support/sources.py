"""A runner source for tests that drive a ``Runner`` (or a command's run) directly."""

from __future__ import annotations

from typing import Any


class Offered:
    """A source that has offered everything already (``--once``-like): the runner ends once it
    is idle. It notes the runner's calls to ``start`` and ``stop`` in ``calls``."""

    def __init__(self, runner: Any = None) -> None:
        self.runner = runner
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def pump(self) -> None:
        pass

    def finished(self) -> bool:
        return True

    def next_wait(self) -> float | None:
        return None

    def stop(self) -> None:
        self.calls.append("stop")
