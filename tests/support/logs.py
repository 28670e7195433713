"""Reading pairwatch's structured logs back in tests (``PAIRWATCH_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
from typing import Any


def json_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log events among ``stderr``'s lines, in order (tracebacks and the like skipped)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
