"""ASGI middleware of ``pairwatch serve``: the access log."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.logs import elapsed_ms, get_logger


class AccessLog:
    """One ``http_request`` log line per request: method, path, status, duration, pair id.
    Never the query string, headers or body (tokens and uploads stay out of the logs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state") or {}
            get_logger().info(
                "http_request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=elapsed_ms(started),
                pair_id=state.get("pair_id"),
            )
