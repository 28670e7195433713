"""The JSON error body every ``pairwatch serve`` endpoint answers with (``/compare`` aside,
which keeps the original envelope): ``{"error": {"type", "message"}}``, plus ``"field"`` when
one field of the request is at fault (422)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


def error_response(
    status: int, type_: str, message: str, *, field: str | None = None, **headers: str
) -> JSONResponse:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return JSONResponse({"error": error}, status_code=status, headers=headers)
