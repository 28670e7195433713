"""uvicorn's HTTP/1.1 protocol (h11) with a limit on how long a request's head may take.

uvicorn bounds the wait *between* requests of a keep-alive connection (``timeout_keep_alive``),
but any byte that arrives cancels that timer, and nothing bounds the head of a request: a
client that sends its headers a byte at a time, or never ends them, holds its connection (a
socket, a buffer, a task) for as long as it likes (the issue counted 509 such connections
held open). Here each connection must deliver a whole request head within
``upload_idle_timeout`` seconds of being ready for one (connected, or its previous response
sent); otherwise it is answered 408 and closed. The body that follows is the application's to
pace (``watcher.serve.connection``).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from handler.logs import get_logger


def _answer_408(seconds: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "type": "header_timeout",
                "message": f"the request head did not arrive within {seconds:g} s",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class _HeadTimeoutProtocol(H11Protocol):
    """``H11Protocol`` closing connections whose request head takes over ``head_timeout_s``."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._stop_waiting()  # a whole request head arrived: its body is the app's to pace

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a request that was already waiting
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    def _await_head(self) -> None:
        self._stop_waiting()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        get_logger().warning("http_head_timeout", timeout_s=self.head_timeout_s)
        self.transport.write(_answer_408(self.head_timeout_s))
        self.transport.close()


def head_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for a head limit of
    ``seconds``."""
    return type("HeadTimeoutProtocol", (_HeadTimeoutProtocol,), {"head_timeout_s": seconds})
