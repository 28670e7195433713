"""The ``pairwatch serve`` FastAPI application: its lifespan (comparator, the process's one
runner, admission, readiness), the access log and the routes (``watcher.serve.routes``).

Every pair goes through the process's one ``watcher.runner.Runner``, as in every watcher: its
``concurrency`` workers run uploads (``handler.pipeline.compare_pair``) and webhook events
(``handler.bucket_jobs.BucketJobs``) alike, and its rechecks look again at lone images. The
request bodies are read by ``watcher.serve.uploads`` as they stream in, never spooled to disk.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from handler.compare import Comparator
from handler.config import Settings
from handler.logs import get_logger
from watcher.runner import Submitted, runner_for
from watcher.serve.admission import Admission
from watcher.serve.events import EventsEndpoint
from watcher.serve.middleware import AccessLog
from watcher.serve.readiness import EngineCheck, Readiness
from watcher.serve.routes import router
from watcher.serve.state import ServeState
from watcher.shutdown import StopFlag


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
        # Serve answers every pair (model_unavailable while a model loads) and says why on
        # /readyz, so its runner does not hold pairs back until the comparator is ready.
        with runner_for(settings, comparator=comparator, wait_ready=False) as runner:
            chosen = runner.comparator
            engine = None
            if chosen.info.backend == "openai" and settings.vl_endpoint:
                engine = EngineCheck(settings.vl_endpoint, settings.vl_api_key)
            admission = Admission(runner, settings.queue_size)
            readiness = Readiness(
                chosen,
                engine,
                stalled_s=runner.stalled_s,
                processing_timeout=settings.comparison.processing_timeout,
            )
            state = ServeState(settings, runner, admission, readiness)
            if settings.events_token is not None:
                state.events = EventsEndpoint.build(settings, admission, endpoint_url, region)
            holder["state"] = state
            state.readiness.start()
            log = get_logger()
            log.info(
                "serve_started",
                comparator=chosen.info.name,
                concurrency=runner.concurrency,
                queue_size=settings.queue_size,
                events=state.events is not None,
            )
            stop = StopFlag()
            loop = threading.Thread(target=runner.run, args=(stop, Submitted()), name="runner")
            loop.start()
            try:
                yield
            finally:
                # uvicorn has answered the requests in hand by now: the runner finishes what
                # is left (rechecks are dropped, as in every watcher) and its threads end.
                stop.request()
                await anyio.to_thread.run_sync(loop.join)
                state.readiness.stop()
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
