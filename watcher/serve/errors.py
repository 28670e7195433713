"""What ``pairwatch serve`` answers when it gives no result, and which status a result gets.

``RequestError`` is raised while a request is read; ``Refusal`` is how an endpoint renders an
answer without a result (each endpoint in its own shape); ``v1_status`` maps a result to its
``/v1/compare`` status (the legacy envelope's mapping is ``watcher.serve.legacy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handler.result import ComparisonResult

#: Error types that mean "the client's request was the problem": its inputs, or its config
#: (an ignore box outside image A) - 422 on /v1/compare, 400 on /compare.
INPUT_ERROR_TYPES = frozenset(
    {
        "invalid_image",
        "unsupported_format",
        "image_too_large",
        "input_not_found",
        "input_unreadable",
        "path_outside_root",
        "invalid_manifest",
    }
)


class RequestError(Exception):
    """A request this server cannot act on: answered ``status`` with a JSON error (naming the
    ``field`` at fault, for a 422)."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Refusal:
    """A request answered without a result (each endpoint renders it in its own shape)."""

    status: int
    type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    #: The request field at fault (a 422).
    field: str | None = None


def v1_status(result: ComparisonResult) -> int:
    """HTTP status of a ``/v1/compare`` answer, from the result's status and error type."""
    if result.status == "ok":
        return 200
    if result.status == "timeout":
        return 504
    error_type = result.error.type if result.error else ""
    if error_type == "model_unavailable":
        return 503
    if error_type in INPUT_ERROR_TYPES or (result.error and result.error.input):
        return 422
    return 500
