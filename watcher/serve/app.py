"""The ``pairwatch serve`` FastAPI application: its lifespan (comparator, admission, readiness,
webhook rechecks), the access log and the routes (``watcher.serve.routes``).

Every pair goes through the same ``handler.pipeline.compare_pair`` (uploads) or
``handler.bucket_jobs.BucketJobs`` (webhook events) as the watchers, in a worker thread, inside
one ``Admission`` slot. The request bodies are read by ``watcher.serve.uploads`` as they stream
in, never spooled to disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from handler.compare import Comparator, create_comparator, resolve_concurrency
from handler.config import Settings
from handler.logs import get_logger
from watcher.serve.admission import Admission
from watcher.serve.events import EventsEndpoint
from watcher.serve.middleware import AccessLog
from watcher.serve.readiness import EngineCheck, Readiness
from watcher.serve.routes import router
from watcher.serve.state import ServeState


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

    app.include_router(router(state))
    return app
