"""One request's body as ``pairwatch serve`` reads it: paced, and watched for a client leaving.

An upload waits twice: for permission to read its body (the body stays in the socket
meanwhile, see ``watcher.serve.admission``), then, its body read, for a compare slot. A client
that gives up during either wait must free its place at once, not when its turn comes.

**Pace.** A client that stops sending must not hold what it was given (a body slot, a place):
while the server reads a body (``stream``, ``ready_to_read``) every message must come within
``upload_idle_timeout`` seconds, and every ``upload_idle_timeout`` seconds must bring at least
``MIN_UPLOAD_BYTES_PER_S`` per second; otherwise ``UploadStalled`` (serve answers 408 and
closes). Before it may read its body, a request first reads ahead what it can
(``ready_to_read``): only a request whose client is sending (``READ_AHEAD_BYTES`` in hand, or
its whole body) waits for a body slot, so clients that send a few bytes and stop never take the
slots that the uploads behind them need; they are cut off after ``upload_idle_timeout``.

ASGI reports a disconnect only through ``receive()``, which also hands out the body, so
``Connection`` wraps the request's ``receive``: while a request waits it keeps receiving, and
what it receives is held and handed out again, in order, when the request reads its body. To
keep the upload in the socket, at most ``READ_AHEAD_BYTES`` of body are held that way: a
request whose body is longer than that learns of a disconnect during its first wait only once
it reads on (at once, when its turn comes) — and the server itself cannot know sooner, as it
stops reading a socket whose unread bytes pass its own buffer (uvicorn: 64 KiB).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

#: Body bytes a waiting request may read ahead (and hold) to notice its client leaving.
READ_AHEAD_BYTES = 64 * 1024
#: The slowest upload taken, averaged over each ``upload_idle_timeout`` (10 KiB per 10 s by
#: default): a trickle of a byte now and then keeps no slot.
MIN_UPLOAD_BYTES_PER_S = 1024


class UploadStalled(Exception):
    """The client sent nothing for ``upload_idle_timeout`` s, or less than the minimum rate."""


class _Pace:
    """The pace rule of one stretch of reading (see the module docstring)."""

    def __init__(self, idle_s: float, clock: Callable[[], float]) -> None:
        self.idle_s = idle_s
        self.clock = clock
        now = clock()
        self.last_bytes = now
        self.window_end = now + idle_s
        self.window_bytes = 0

    def wait(self) -> float:
        """How long the next message may take; ``UploadStalled`` if the client is too slow."""
        now = self.clock()
        if now - self.last_bytes >= self.idle_s:
            raise UploadStalled(f"no bytes of the body for {self.idle_s:g} s")
        if now >= self.window_end:
            if self.window_bytes < MIN_UPLOAD_BYTES_PER_S * self.idle_s:
                raise UploadStalled(
                    f"{self.window_bytes} bytes of the body in {self.idle_s:g} s, below "
                    f"{MIN_UPLOAD_BYTES_PER_S} bytes/s"
                )
            self.window_end, self.window_bytes = now + self.idle_s, 0
        return min(self.last_bytes + self.idle_s, self.window_end) - now

    def note(self, message: Message) -> None:
        size = len(message.get("body", b"")) if message["type"] == "http.request" else 0
        if size:
            self.last_bytes = self.clock()
            self.window_bytes += size


_DISCONNECT: Message = {"type": "http.disconnect"}


class Connection:
    """One request's ``receive``, with a look-ahead that notices a disconnect while it waits,
    and the pace rule while its body is read (``idle_s`` = ``upload_idle_timeout``)."""

    def __init__(
        self, receive: Receive, idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._receive = receive
        self._idle_s = idle_s
        self._clock = clock
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
        ``ClientDisconnect`` when the client goes away before the end, ``UploadStalled`` when
        it sends too slowly."""
        pace = _Pace(self._idle_s, self._clock)
        while True:
            message = await self._paced(pace)
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if message["type"] == "http.request":
                body: bytes = message.get("body", b"")
                if body:
                    yield body
                if not message.get("more_body", False):
                    return

    async def ready_to_read(self) -> bool:
        """Read ahead until ``READ_AHEAD_BYTES`` (or the whole body) are held, under the pace
        rule: True then, False if the client left, ``UploadStalled`` if it does not send."""
        pace = _Pace(self._idle_s, self._clock)
        while not self.gone and not self._body_done and self._held_bytes < READ_AHEAD_BYTES:
            with anyio.move_on_after(pace.wait()):
                pace.note(await self._hold_next())
        return not self.gone

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

    async def _paced(self, pace: _Pace) -> Message:
        """The next message (held ones first); ``UploadStalled`` if it does not come in time."""
        while True:
            with anyio.move_on_after(pace.wait()):
                message = await self.receive()
                pace.note(message)
                return message

    async def _look_ahead(self) -> None:
        """Receive (and hold) until the client is seen gone, or until only reading past
        ``READ_AHEAD_BYTES`` could tell. Cancelled while it waits, it loses nothing: a message
        is taken from the server and held in one step."""
        while not self.gone:
            if not self._body_done and self._held_bytes >= READ_AHEAD_BYTES:
                return
            await self._hold_next()

    async def _hold_next(self) -> Message:
        """Receive the server's next message and hold it for the body's reader (a body part),
        in one step: a cancellation while it waits loses nothing."""
        message = await self._receive()
        self._note(message)
        if message["type"] == "http.request":
            self._held.append(message)
            self._held_bytes += len(message.get("body", b""))
        return message

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self.gone = True
        elif message["type"] == "http.request" and not message.get("more_body", False):
            self._body_done = True
