"""The ``pairwatch serve`` FastAPI application: compare endpoints, webhook events, probes, metrics.

Every pair goes through the same ``handler.pipeline.compare_pair`` (uploads) or
``handler.bucket_jobs.BucketJobs`` (webhook events) as the watchers, in a worker thread, inside
one ``Admission`` slot. The request bodies are read by ``watcher.serve_uploads`` as they stream
in, never spooled to disk.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.compare import Comparator, create_comparator, resolve_concurrency
from handler.config import ComparisonConfig, Settings
from handler.deadline import Deadline
from handler.errors import PairError
from handler.logs import elapsed_ms, get_logger
from handler.pipeline import ImageInput, compare_pair_with_settings
from handler.result import ComparisonResult
from watcher import metrics
from watcher.serve_admission import Admission, Busy, Ticket
from watcher.serve_compat import (
    CompatRequestError,
    InvalidConfig,
    apply_overrides,
    compat_config,
    compat_envelope,
    compat_status,
)
from watcher.serve_connection import Connection, UploadStalled
from watcher.serve_events import EventsEndpoint
from watcher.serve_readiness import EngineCheck, Readiness
from watcher.serve_responses import error_response
from watcher.serve_uploads import (
    MalformedUpload,
    TooManyFiles,
    Upload,
    UploadedFile,
    UploadTooLarge,
    read_upload,
    safe_filename,
)

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
MAX_PAIR_ID_CHARS = 200
JSON_TYPE = "application/json"
TWO_FILES_MESSAGE = "exactly two files are required"


class RequestError(Exception):
    """A request this server cannot act on: answered ``status`` with a JSON error (naming the
    ``field`` at fault, for a 422)."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


class _ClientGone(PairError):
    """The client disconnected: the pair stops at its deadline's next check (never reaches a
    client)."""

    type = "client_disconnected"


@dataclass
class ServeState:
    """What the endpoints share: settings, the comparator, the admission control, readiness."""

    settings: Settings
    comparator: Comparator
    admission: Admission
    limiter: anyio.CapacityLimiter
    readiness: Readiness
    events: EventsEndpoint | None = None


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


def check_pair_id(raw: str | None) -> str:
    """The client's ``pair_id`` (short, printable), or a fresh one that tells requests apart."""
    if raw is None or raw == "":
        return f"http-{uuid.uuid4().hex[:12]}"
    if len(raw) > MAX_PAIR_ID_CHARS or not raw.isprintable():
        raise RequestError(
            422,
            "invalid_field",
            f"pair_id must be 1-{MAX_PAIR_ID_CHARS} printable characters",
            "pair_id",
        )
    return raw


def v1_config(raw: str | None, base: ComparisonConfig) -> ComparisonConfig:
    """``config`` form field: JSON of ``ComparisonConfig`` fields over the deployment's own.
    A mistake in it is a 422 naming the field (``config.image_quality``)."""
    if raw is None or raw.strip() == "":
        return base
    try:
        overrides = json.loads(raw)
    except ValueError as exc:
        message = f"config is not valid JSON: {exc}"
        raise RequestError(422, "invalid_config", message, "config") from None
    if not isinstance(overrides, dict):
        raise RequestError(422, "invalid_config", "config must be a JSON object", "config")
    try:
        return apply_overrides(base, overrides)
    except InvalidConfig as exc:
        raise RequestError(422, "invalid_config", str(exc), exc.field) from None


@dataclass(frozen=True)
class PairRequest:
    """What an endpoint makes of a form: the two files, the config and the pair id."""

    files: tuple[UploadedFile, UploadedFile]
    config: ComparisonConfig
    pair_id: str


@dataclass(frozen=True)
class Refusal:
    """A request answered without a result (each endpoint renders it in its own shape)."""

    status: int
    type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    #: The request field at fault (a 422).
    field: str | None = None


#: Turns a parsed form into a ``PairRequest``; raises ``RequestError`` for a bad one.
Select = Callable[[Upload, ComparisonConfig], PairRequest]


class PairRunner:
    """Admits a request, reads its upload, then runs its pair on a worker thread while
    watching the connection."""

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
                # Only a client that is sending waits for a body slot (see serve_connection).
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
        """The pair's result once a compare slot is free, or None when the client went away
        before it was done: while waiting, its place is given back at once and the pair never
        starts; once started, the pair stops at its next stage."""
        settings = self.state.settings
        pair_id = pair.pair_id
        a, b = (
            ImageInput(safe_filename(f.filename, slot), _loader(f), digest=_digest(f))
            for f, slot in zip(pair.files, ("a", "b"), strict=True)
        )
        # Made once its compare slot is taken: the pair's time starts then.
        taken = _Taken()

        def work() -> ComparisonResult:
            assert taken.deadline is not None
            return compare_pair_with_settings(
                settings,
                pair_id,
                a,
                b,
                pair.config,
                self.state.comparator,
                deadline=taken.deadline,
            ).result

        result: ComparisonResult | None = None
        async with anyio.create_task_group() as group:
            waiting = group.cancel_scope  # cancelled by a disconnect: leaves the slot queue
            group.start_soon(_watch_disconnect, connection, taken, waiting)
            async with ticket.compare():
                if not taken.gone:
                    taken.deadline = Deadline(settings.comparison.processing_timeout)
                    # Started, the pair's thread runs on; its deadline stops it (``abandon``).
                    with anyio.CancelScope(shield=True):
                        result = await anyio.to_thread.run_sync(work, limiter=self.state.limiter)
            waiting.cancel()
        if result is None or taken.gone:
            stage = "queue" if result is None else "compare"  # gone before its slot, or after
            get_logger(pair_id=pair_id).warning("client_disconnected", stage=stage)
            metrics.PAIRS.labels("http", self.state.comparator.info.name, "abandoned").inc()
            return None
        metrics.record_result(result, "http", stages={"fetch": fetch_seconds})
        return result


@dataclass
class _Taken:
    """One upload's pair as the event loop sees it: its deadline once its compare slot is
    taken, and whether its client went away (both touched on the event loop only)."""

    deadline: Deadline | None = None
    gone: bool = False

    def abandon(self) -> None:
        """The client went away: a pair still waiting never starts, a running one stops at
        its deadline's next check (a stage, a strip of pixels, a metric)."""
        self.gone = True
        if self.deadline is not None:
            self.deadline.abandon(_ClientGone("the client disconnected"))


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
    connection: Connection, taken: _Taken, waiting: anyio.CancelScope
) -> None:
    """Once the body is read, the only message left is the disconnect (or the response end):
    it stops a running pair at its deadline's next check and a waiting one at once."""
    await connection.wait_for_disconnect()
    taken.abandon()
    waiting.cancel()


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


def _multipart_body(required: list[str], properties: dict[str, object]) -> dict[str, object]:
    """OpenAPI for a form the endpoint streams itself (FastAPI's ``File()`` would spool it)."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


_BINARY = {"type": "string", "format": "binary"}
_V1_BODY = _multipart_body(
    ["a", "b"],
    {
        "a": {**_BINARY, "description": "image A"},
        "b": {**_BINARY, "description": "image B"},
        "config": {"type": "string", "description": "JSON object of ComparisonConfig fields"},
        "pair_id": {"type": "string", "maxLength": MAX_PAIR_ID_CHARS},
    },
)
_COMPAT_BODY = _multipart_body(
    ["files"],
    {
        "files": {"type": "array", "items": _BINARY, "description": "exactly two images"},
        "focus_elements": {"type": "string"},
        "comparison_aspects": {"type": "string"},
        "similarity_threshold": {"type": "number"},
        "max_image_size": {"type": "string"},
        "image_quality": {"type": "integer"},
        "processing_timeout": {"type": "number"},
    },
)


def create_app(
    settings: Settings,
    *,
    comparator: Comparator | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> FastAPI:
    """The application; the comparator is built (and closed) by its lifespan unless given."""
    holder: dict[str, ServeState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        concurrency = resolve_concurrency(settings)
        chosen = comparator or create_comparator(settings)
        engine = None
        if chosen.info.backend == "openai" and settings.vl_endpoint:
            engine = EngineCheck(settings.vl_endpoint, settings.vl_api_key)
        admission = Admission(concurrency, settings.queue_size)
        readiness = Readiness(
            chosen,
            engine,
            stalled_s=admission.stalled_s,
            processing_timeout=settings.comparison.processing_timeout,
        )
        state = ServeState(
            settings, chosen, admission, anyio.CapacityLimiter(concurrency), readiness
        )
        if settings.events_token is not None:
            state.events = EventsEndpoint.build(
                settings, state.comparator, state.admission, state.limiter, endpoint_url, region
            )
        holder["state"] = state
        state.readiness.start()
        log = get_logger()
        log.info(
            "serve_started",
            comparator=state.comparator.info.name,
            concurrency=concurrency,
            queue_size=settings.queue_size,
            events=state.events is not None,
        )
        try:
            async with anyio.create_task_group() as group:
                if state.events is not None:
                    group.start_soon(state.events.recheck_loop)
                yield
                group.cancel_scope.cancel()
        finally:
            state.readiness.stop()
            if comparator is None:
                state.comparator.close()
            log.info("serve_stopped")

    app = FastAPI(
        title="pairwatch",
        description="Compare image pairs: uploads, object-store webhooks, probes and metrics.",
        lifespan=lifespan,
    )
    app.add_middleware(AccessLog)

    def state() -> ServeState:
        return holder["state"]

    @app.post("/v1/compare", openapi_extra=_V1_BODY, summary="Compare two uploaded images")
    async def compare_v1(request: Request) -> Response:
        """Answer the result JSON: 200 ok, 422 failed on its inputs or config, 504 timeout, 503
        model unavailable, 500 other model failures; or an error: 400 a form that is not the
        expected one, 408 an upload that stalls, 413 over the cap, 422 a field that is wrong
        (named in ``error.field``), 429 busy."""
        outcome = await PairRunner(state()).handle(request, _v1_request, "give two files, a and b")
        if isinstance(outcome, Refusal):
            return error_response(
                outcome.status,
                outcome.type,
                outcome.message,
                field=outcome.field,
                **outcome.headers,
            )
        if outcome is None:
            return Response(status_code=400)  # nobody is listening any more
        # pydantic's own serializer: the result is written once, without a dict in between.
        return Response(
            outcome.model_dump_json(), status_code=v1_status(outcome), media_type=JSON_TYPE
        )

    @app.post("/compare", openapi_extra=_COMPAT_BODY, summary="The original API (envelope)")
    async def compare_compat(request: Request) -> Response:
        """``{"code", "msg", "data"}``: 200 with the result; 400 for a file count other than two
        or an image that cannot be processed; 500 for timeouts and model failures."""
        outcome = await PairRunner(state()).handle(request, _compat_request, TWO_FILES_MESSAGE)
        if isinstance(outcome, Refusal):
            envelope = compat_envelope(outcome.status, outcome.message)
            return JSONResponse(envelope, status_code=outcome.status, headers=outcome.headers)
        if outcome is None:
            return Response(status_code=400)
        code = compat_status(outcome, INPUT_ERROR_TYPES)
        message = "success" if code == 200 else outcome.error.message if outcome.error else ""
        return JSONResponse(
            compat_envelope(code, message, outcome.model_dump(mode="json")), status_code=code
        )

    @app.post("/v1/events", summary="Object notifications (MinIO, SeaweedFS, S3 event JSON)")
    async def events(request: Request) -> Response:
        """``Authorization: Bearer <events_token>``. 200 once the event's pairs are done,
        recorded for a later look, or refused for good (listed in ``rejected``); 503 +
        Retry-After when a record must be delivered again; 400 malformed; 401 bad token; 408 a
        body that stalls; 404 when no ``events_token`` is configured."""
        endpoint = state().events
        if endpoint is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return await endpoint.handle(request)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The comparator can take pairs")
    async def readyz() -> Response:
        """200 once the comparator is ready (a model loaded; an engine behind ``vl_endpoint``
        answered its probe) and, for an engine, while it still answers; 503 otherwise."""
        current = state()
        problem = await current.readiness.problem()
        if problem is None:
            return JSONResponse({"status": "ready", "comparator": current.comparator.info.name})
        return JSONResponse({"status": "not_ready", "reason": problem}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def _v1_request(upload: Upload, base: ComparisonConfig) -> PairRequest:
    """Files ``a`` and ``b``, optional ``config`` (JSON) and ``pair_id``; nothing else."""
    by_name = {f.field_name: f for f in upload.files}
    unknown = sorted(set(upload.fields) - {"config", "pair_id"})
    if unknown or set(by_name) != {"a", "b"} or len(upload.files) != 2:
        raise RequestError(
            400,
            "bad_request",
            "expected files a and b and optional fields config, pair_id"
            + (f"; unknown fields: {', '.join(unknown)}" if unknown else ""),
        )
    return PairRequest(
        (by_name["a"], by_name["b"]),
        v1_config(upload.fields.get("config"), base),
        check_pair_id(upload.fields.get("pair_id")),
    )


def _compat_request(upload: Upload, base: ComparisonConfig) -> PairRequest:
    """Two ``files`` and the original config fields (others ignored, as the original did)."""
    files = [f for f in upload.files if f.field_name == "files"]
    if len(files) != 2 or len(upload.files) != 2:
        raise RequestError(400, "bad_request", TWO_FILES_MESSAGE)
    try:
        config = compat_config(upload.fields, base)
    except CompatRequestError as exc:
        raise RequestError(400, "bad_request", str(exc)) from None
    return PairRequest((files[0], files[1]), config, check_pair_id(None))


def _log_refused(exc: UploadTooLarge) -> None:
    get_logger().warning(
        "upload_refused",
        field=exc.field_name,
        limit=exc.limit,
        bytes_read=exc.bytes_read,
        reason="over the upload cap",
    )
