"""Reading pairwatch's logs in tests: JSON lines from a subprocess, or events captured here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.testing import LogCapture


def json_event(line: str) -> dict[str, Any] | None:
    """One line of a JSON log (read as it comes) as its event; None for any other line."""
    return json.loads(line) if line.startswith("{") else None


def json_events(stderr: str, *, strict: bool = False) -> list[dict[str, Any]]:
    """The JSON log events among ``stderr``'s lines, in order (tracebacks and the like skipped;
    with ``strict``, every non-blank line must be a JSON event)."""
    if strict:
        return [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return [event for line in stderr.splitlines() if (event := json_event(line)) is not None]


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log event from every thread, each with the Unix time it was logged at (``at``)."""
    capture = LogCapture()
    previous = structlog.get_config()["processors"]

    def stamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["at"] = time.time()
        return event

    structlog.configure(processors=[stamp, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=previous)
