"""Noticing that a client of ``pairwatch serve`` went away while its request waits.

An upload waits twice: for permission to read its body (the body stays in the socket
meanwhile, see ``watcher.serve_admission``), then, its body read, for a compare slot. A client
that gives up during either wait must free its place at once, not when its turn comes.

ASGI reports a disconnect only through ``receive()``, which also hands out the body, so
``Connection`` wraps the request's ``receive``: while a request waits it keeps receiving, and
what it receives is held and handed out again, in order, when the request reads its body. To
keep the upload in the socket, at most ``READ_AHEAD_BYTES`` of body are held that way: a
request whose body is longer than that learns of a disconnect during its first wait only once
it reads on (at once, when its turn comes) — and the server itself cannot know sooner, as it
stops reading a socket whose unread bytes pass its own buffer (uvicorn: 64 KiB).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

#: Body bytes a waiting request may read ahead (and hold) to notice its client leaving.
READ_AHEAD_BYTES = 64 * 1024

_DISCONNECT: Message = {"type": "http.disconnect"}


class Connection:
    """One request's ``receive``, with a look-ahead that notices a disconnect while it waits."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._held: deque[Message] = deque()
        self._held_bytes = 0
        #: The last body message has been received (held or handed out).
        self._body_done = False
        #: The client has disconnected.
        self.gone = False

    async def receive(self) -> Message:
        """The next ASGI message: held ones first, then the server's."""
        if self._held:
            message = self._held.popleft()
            self._held_bytes -= len(message.get("body", b""))
            return message
        if self.gone:
            return _DISCONNECT
        message = await self._receive()
        self._note(message)
        return message

    async def stream(self) -> AsyncIterator[bytes]:
        """The body's chunks, as Starlette's ``Request.stream`` yields them: raises
        ``ClientDisconnect`` when the client goes away before the end."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if message["type"] == "http.request":
                body: bytes = message.get("body", b"")
                if body:
                    yield body
                if not message.get("more_body", False):
                    return

    async def wait_unless_gone(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """Await ``wait()`` while watching the connection. False when the client is gone:
        ``wait()`` is then cancelled as soon as the disconnect is seen (or had finished just
        before, and the caller frees what it got)."""
        if self.gone:
            return False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await self._look_ahead()
                if self.gone:
                    group.cancel_scope.cancel()

            group.start_soon(watch)
            await wait()
            group.cancel_scope.cancel()
        return not self.gone

    async def wait_for_disconnect(self) -> None:
        """Return once the client has gone (meant for after the body has been read: whatever
        else arrives is dropped)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _look_ahead(self) -> None:
        """Receive (and hold) until the client is seen gone, or until only reading past
        ``READ_AHEAD_BYTES`` could tell. Cancelled while it waits, it loses nothing: a message
        is taken from the server and held in one step."""
        while not self.gone:
            if not self._body_done and self._held_bytes >= READ_AHEAD_BYTES:
                return
            message = await self._receive()
            self._note(message)
            if message["type"] == "http.request":
                self._held.append(message)
                self._held_bytes += len(message.get("body", b""))

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self.gone = True
        elif message["type"] == "http.request" and not message.get("more_body", False):
            self._body_done = True
