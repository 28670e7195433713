"""``GET /readyz`` of ``pairwatch serve``: can the comparator take pairs *now*?

Two parts. ``Readiness`` waits on a thread for the comparator to become ready once (a local
model loaded; an engine behind ``vl_endpoint`` answering its probe, see
``OpenAIBackend.wait_ready``). After that a local model stays ready, but an engine is another
process that can go away and come back, so ``EngineCheck`` asks it again: ``GET
{vl_endpoint}/models`` (every OpenAI-compatible engine answers it, cheaply, without touching
the model) with a short timeout, at most once every ``CHECK_INTERVAL_S`` whatever the probe
rate, the answer cached in between. Any HTTP answer below 500 counts as "it answers"; a refused
connection, a timeout or a 5xx make ``/readyz`` answer 503 until the engine answers again.

A process can also be stuck (a read that never returns, a bug): pairs are bounded by their
deadline (``processing_timeout``), so when every compare slot has been held for longer than
that plus ``STUCK_GRACE_S`` with no pair finishing, ``/readyz`` answers 503 too, and a load
balancer sends the traffic elsewhere; it turns 200 again as soon as a slot frees up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import httpx2
from pydantic import SecretStr

from handler.compare.base import Comparator
from handler.errors import PairError
from handler.logs import get_logger

#: ``/readyz`` asks the engine at most this often; answers in between are cached.
CHECK_INTERVAL_S = 5.0
#: An engine that does not answer ``GET /models`` within this is reported as not answering.
CHECK_TIMEOUT_S = 2.0
#: After ``wait_ready`` gave up on an engine (``vl_load_timeout``, or a refused probe), serve
#: waits this long and waits for it again: the engine may still come (or be fixed).
ENGINE_RETRY_S = 30.0

STARTING = "the comparator is starting"
#: What a pair may take past its deadline before its slot counts as stuck: the VL kill grace,
#: the result write's grace and one object-store request fit in it.
STUCK_GRACE_S = 30.0


class EngineCheck:
    """Whether the engine at ``endpoint`` answers right now (cached ``CHECK_INTERVAL_S``)."""

    def __init__(
        self,
        endpoint: str,
        api_key: SecretStr | None,
        *,
        interval_s: float = CHECK_INTERVAL_S,
        timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        # Imported here: only a deployment with an engine needs the openai client at all.
        from handler.compare.vl.openai_backend import NO_API_KEY, public_endpoint

        self._url = endpoint.rstrip("/") + "/models"
        self._public = public_endpoint(endpoint)
        key = api_key.get_secret_value() if api_key else NO_API_KEY
        self._headers = {"Authorization": f"Bearer {key}"}  # as the backend sends it
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._lock = anyio.Lock()

    async def problem(self) -> str | None:
        """None while the engine answers, else why ``/readyz`` should say 503."""
        async with self._lock:  # concurrent probes share one request
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self._interval_s:
                problem = await self._ask()
                if problem != self._problem:
                    log = get_logger(endpoint=self._public)
                    if problem is None:
                        log.info("vl_engine_answers")
                    else:
                        log.warning("vl_engine_not_answering", error=problem)
                self._problem = problem
                self._checked_at = time.monotonic()
            return self._problem

    async def _ask(self) -> str | None:
        try:
            async with httpx2.AsyncClient(timeout=self._timeout_s) as client:
                answer = await client.get(self._url, headers=self._headers)
        except httpx2.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return f"the model server at {self._public} does not answer ({reason})"
        if answer.status_code >= 500:
            return f"the model server at {self._public} answers {answer.status_code}"
        return None


class Readiness:
    """The comparator's readiness for ``/readyz``: ``problem()`` is None when pairs can go."""

    def __init__(
        self,
        comparator: Comparator,
        engine: EngineCheck | None = None,
        *,
        stalled_s: Callable[[], float],
        processing_timeout: float,
    ) -> None:
        """``stalled_s``: how long no runner worker has taken work with all of them busy
        (``Runner.stalled_s``); past ``processing_timeout + STUCK_GRACE_S`` it is stuck."""
        self.comparator = comparator
        self.engine = engine
        self._stalled_s = stalled_s
        self._stuck_after = processing_timeout + STUCK_GRACE_S
        #: The comparator became ready once (its ``wait_ready`` returned).
        self.ready = False
        self.reason = STARTING
        self._stopped = threading.Event()

    def start(self) -> None:
        """Wait for the comparator (a model loading, an engine answering) on a thread."""
        threading.Thread(target=self._wait, name="readiness", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    async def problem(self) -> str | None:
        if not self.ready:
            return self.reason
        stalled = self._stalled_s()
        if stalled > self._stuck_after:
            return (
                f"stuck: no compare slot has finished a pair for {stalled:.0f} s (every pair "
                f"ends within processing_timeout + {STUCK_GRACE_S:g} s = {self._stuck_after:g} s)"
            )
        if self.engine is not None:
            return await self.engine.problem()
        return None

    def _wait(self) -> None:
        log = get_logger()
        while not self._stopped.is_set():
            try:
                self.comparator.wait_ready()
            except PairError as exc:
                self.reason = f"{exc.type}: {exc.message}"
                if self.engine is None or self._stopped.is_set():
                    # A local model that cannot load never will: serve stays not ready.
                    log.error("serve_not_ready", error_type=exc.type, error=exc.message)
                    return
                log.error(
                    "serve_not_ready",
                    error_type=exc.type,
                    error=exc.message,
                    retry_in_s=ENGINE_RETRY_S,
                )
                self._stopped.wait(ENGINE_RETRY_S)
                continue
            self.ready = True
            return
