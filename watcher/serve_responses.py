"""The JSON error body every ``pairwatch serve`` endpoint answers with (``/compare`` aside,
which keeps the original envelope): ``{"error": {"type", "message"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(status: int, type_: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
    )
