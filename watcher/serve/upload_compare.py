"""One upload's pair: admitted, its body read as it streams in, compared by the runner.

Every pair goes through the same ``handler.pipeline.compare_pair`` as the watchers, on one of
the process's runner's workers (``Runner.submit``); the connection is watched meanwhile, so a
client that leaves frees its place (a waiting pair never starts, a running one stops at its
deadline's next check). The pair's deadline is the runner's: it starts when a worker takes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import anyio
from fastapi import Request
from starlette.requests import ClientDisconnect

from handler import disposition
from handler.deadline import Deadline, current
from handler.disposition import Disposition
from handler.errors import PairError
from handler.logs import get_logger
from handler.pipeline import ImageInput, compare_pair_with_settings
from handler.result import ComparisonResult
from watcher import prometheus
from watcher.serve.admission import Busy, Ticket
from watcher.serve.connection import Connection, UploadStalled
from watcher.serve.errors import Refusal, RequestError
from watcher.serve.forms import PairRequest, Select
from watcher.serve.state import ServeState
from watcher.serve.uploads import (
    MalformedUpload,
    TooManyFiles,
    UploadedFile,
    UploadTooLarge,
    read_upload,
    safe_filename,
)


class _ClientGone(PairError):
    """The client disconnected: the pair stops at its deadline's next check (never reaches a
    client)."""

    type = "client_disconnected"


class UploadCompare:
    """Admits a request, reads its upload, then hands its pair to the runner while watching
    the connection."""

    def __init__(self, state: ServeState) -> None:
        self.state = state

    async def handle(
        self, request: Request, select: Select, two_files: str
    ) -> ComparisonResult | Refusal | None:
        """The result, a ``Refusal`` (busy, too large, malformed; ``two_files`` is the message
        for a form with more than two files), or None when the client is gone."""
        connection = Connection(request.receive, self.state.settings.upload_idle_timeout)
        try:
            async with self.state.admission.admit() as ticket:
                # Only a client that is sending waits for a body slot (see serve.connection).
                ready = await connection.ready_to_read()
                if not ready or not await connection.wait_unless_gone(ticket.read_body):
                    get_logger().warning("client_disconnected", stage="queue")
                    return None
                started = time.perf_counter()
                upload = await read_upload(
                    request.headers.get("content-type", ""),
                    connection.stream(),
                    max_file_bytes=self.state.settings.max_input_bytes,
                    max_files=2,
                    max_pixels=self.state.settings.max_input_pixels,
                )
                fetch_seconds = time.perf_counter() - started
                pair = select(upload, self.state.settings.comparison)
                request.state.pair_id = pair.pair_id
                return await self.run(connection, ticket, pair, fetch_seconds)
        except Busy as exc:
            message = "too many pairs in flight; retry later"
            return Refusal(429, "busy", message, {"Retry-After": str(exc.retry_after)})
        except UploadTooLarge as exc:
            _log_refused(exc)
            # Connection: close makes uvicorn drop the connection after answering instead of
            # reading (and discarding) the rest of the upload.
            return Refusal(413, "upload_too_large", str(exc), {"Connection": "close"})
        except UploadStalled as exc:
            get_logger().warning("upload_refused", reason="too slow", error=str(exc))
            # Closed after the answer: whatever the client still sends is not waited for.
            return Refusal(408, "upload_timeout", str(exc), {"Connection": "close"})
        except TooManyFiles:
            return Refusal(400, "bad_request", two_files, {"Connection": "close"})
        except MalformedUpload as exc:
            return Refusal(400, "bad_request", str(exc), {"Connection": "close"})
        except RequestError as exc:
            return Refusal(exc.status, exc.type, exc.message, field=exc.field)
        except ClientDisconnect:
            get_logger().warning("client_disconnected", stage="upload")
            return None

    async def run(
        self,
        connection: Connection,
        ticket: Ticket,
        pair: PairRequest,
        fetch_seconds: float,
    ) -> ComparisonResult | None:
        """The pair's result once the runner has compared it, or None when the client went
        away before it was done: while waiting, its place is given back at once and the pair
        never starts; once started, the pair stops at its next stage."""
        settings = self.state.settings
        pair_id = pair.pair_id
        a, b = (
            ImageInput(safe_filename(f.filename, slot), _loader(f), digest=_digest(f))
            for f, slot in zip(pair.files, ("a", "b"), strict=True)
        )
        taken = _Taken()

        def work(queued_ms: float) -> Disposition:
            del queued_ms  # an upload's log lines time its stages, not its wait
            taken.start(current())
            taken.result = compare_pair_with_settings(
                settings,
                pair_id,
                a,
                b,
                pair.config,
                self.state.comparator,
                deadline=taken.deadline,
            ).result
            return disposition.done("answered")

        future = ticket.submit(("upload", next(self.state.upload_ids)), work)
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_disconnect, connection, taken, future)
            await _settled(future)
            group.cancel_scope.cancel()
        result = taken.result
        if result is None and not taken.gone:
            raise RuntimeError(f"pair {pair_id}: the runner's work failed (work_failed)")
        if result is None or taken.gone:
            stage = "queue" if future.cancelled() else "compare"  # gone before it ran, or after
            get_logger(pair_id=pair_id).warning("client_disconnected", stage=stage)
            prometheus.PAIRS.labels("http", self.state.comparator.info.name, "abandoned").inc()
            return None
        prometheus.record_result(result, "http", stages={"fetch": fetch_seconds})
        return result


@dataclass
class _Taken:
    """One upload's pair: its deadline once a runner worker took it, its result, and whether
    its client went away (``gone`` is set on the event loop, the rest on the worker)."""

    deadline: Deadline | None = None
    result: ComparisonResult | None = None
    gone: bool = False

    def start(self, deadline: Deadline | None) -> None:
        """On the worker: the runner's deadline for the pair (a client gone meanwhile stops it
        at its first check)."""
        self.deadline = deadline
        if self.gone:
            self.abandon()

    def abandon(self) -> None:
        """The client went away: a pair still waiting never starts, a running one stops at
        its deadline's next check (a stage, a strip of pixels, a metric)."""
        self.gone = True
        if self.deadline is not None:
            self.deadline.abandon(_ClientGone("the client disconnected"))


async def _settled(future: Future[Disposition]) -> None:
    """Wait, on the event loop, until the runner is done with ``future`` (or it is cancelled);
    a bug in the work is the runner's to log (``work_failed``), the answer is then 500."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # From a runner worker, or from this loop itself when the waiter cancels it.
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
    await done.wait()


def _loader(part: UploadedFile) -> Callable[[], bytes]:
    def load() -> bytes:
        if part.error is not None:
            raise part.error
        data = bytes(part.data)
        part.data = bytearray()  # one copy of the upload at a time
        return data

    return load


def _digest(part: UploadedFile) -> Callable[[], str | None]:
    """The upload's sha256, hashed as it streamed in (None for one refused from its header)."""
    return lambda: part.sha256 if part.error is None else None


async def _watch_disconnect(
    connection: Connection, taken: _Taken, future: Future[Disposition]
) -> None:
    """Once the body is read, the only message left is the disconnect (or the response end):
    it stops a running pair at its deadline's next check and takes a waiting one out of the
    runner's queue at once."""
    await connection.wait_for_disconnect()
    taken.abandon()
    future.cancel()


def _log_refused(exc: UploadTooLarge) -> None:
    get_logger().warning(
        "upload_refused",
        field=exc.field_name,
        limit=exc.limit,
        bytes_read=exc.bytes_read,
        reason="over the upload cap",
    )
