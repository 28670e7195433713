"""The routes of ``pairwatch serve``: both compare endpoints, webhook events, probes, metrics.

``state`` gives the process's ``ServeState``, which the app's lifespan makes at start-up.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from watcher.prometheus import render
from watcher.serve.errors import INPUT_ERROR_TYPES, Refusal, v1_status
from watcher.serve.forms import (
    COMPAT_BODY,
    TWO_FILES_MESSAGE,
    V1_BODY,
    compat_request,
    v1_request,
)
from watcher.serve.legacy import compat_envelope, compat_status
from watcher.serve.responses import error_response
from watcher.serve.state import ServeState
from watcher.serve.upload_compare import UploadCompare

JSON_TYPE = "application/json"


def router(state: Callable[[], ServeState]) -> APIRouter:
    """The routes, each reading the process's state through ``state``."""
    routes = APIRouter()

    @routes.post("/v1/compare", openapi_extra=V1_BODY, summary="Compare two uploaded images")
    async def compare_v1(request: Request) -> Response:
        """Answer the result JSON: 200 ok, 422 failed on its inputs or config, 504 timeout, 503
        model unavailable, 500 other model failures; or an error: 400 a form that is not the
        expected one, 408 an upload that stalls, 413 over the cap, 422 a field that is wrong
        (named in ``error.field``), 429 busy."""
        outcome = await UploadCompare(state()).handle(
            request, v1_request, "give two files, a and b"
        )
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

    @routes.post("/compare", openapi_extra=COMPAT_BODY, summary="The original API (envelope)")
    async def compare_compat(request: Request) -> Response:
        """``{"code", "msg", "data"}``: 200 with the result; 400 for a file count other than two
        or an image that cannot be processed; 500 for timeouts and model failures."""
        outcome = await UploadCompare(state()).handle(request, compat_request, TWO_FILES_MESSAGE)
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

    @routes.post("/v1/events", summary="Object notifications (MinIO, SeaweedFS, S3 event JSON)")
    async def events(request: Request) -> Response:
        """``Authorization: Bearer <events_token>``. 200 once the event's pairs are done,
        recorded for a later look, or refused for good (listed in ``rejected``); 503 +
        Retry-After when a record must be delivered again; 400 malformed; 401 bad token; 408 a
        body that stalls; 404 when no ``events_token`` is configured."""
        endpoint = state().events
        if endpoint is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return await endpoint.handle(request)

    @routes.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/readyz", summary="The comparator can take pairs")
    async def readyz() -> Response:
        """200 once the comparator is ready (a model loaded; an engine behind ``vl_endpoint``
        answered its probe) and, for an engine, while it still answers; 503 otherwise."""
        current = state()
        problem = await current.readiness.problem()
        if problem is None:
            return JSONResponse({"status": "ready", "comparator": current.comparator.info.name})
        return JSONResponse({"status": "not_ready", "reason": problem}, status_code=503)

    @routes.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = render()
        return Response(body, media_type=content_type)

    return routes
