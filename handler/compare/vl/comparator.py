"""The VL comparator: metrics first, then the model in a worker process it can kill.

Per pair: the CPU metrics run in this process (milliseconds); a pixel-identical or
near-identical pair stops there. Otherwise the two prepared JPEGs and the prompt go to the
worker, which has ``processing_timeout`` to answer; at ``processing_timeout + KILL_GRACE_S`` it
is SIGKILLed and replaced. Whatever happens, the metrics' numbers stay in the result.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

import numpy as np

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.compare.vl.prompt import AnswerInvalid, build_prompt, parse_answer
from handler.compare.vl.protocol import (
    TAKEN,
    Fault,
    LoadFailed,
    Ready,
    Reply,
    Request,
    WorkerOptions,
)
from handler.compare.vl.worker import worker_main
from handler.config import ComparisonConfig, Settings
from handler.detect import Detection
from handler.errors import (
    ComparisonTimeout,
    ModelCrashed,
    ModelOutputInvalid,
    ModelUnavailable,
    OutOfMemory,
    PairError,
)
from handler.images import PreparedImage
from handler.logs import get_logger
from handler.result import ComparatorInfo, VLDetails

#: Seconds past ``processing_timeout`` before the worker is killed. Inside the timeout the
#: worker stops ``generate`` itself between tokens (``max_time``); the grace covers one last
#: token step and the reply, so only a stuck prefill or a hung kernel meets the kill.
KILL_GRACE_S = 2.0
#: Near-identical bound: same size and no channel of any pixel differs by more than this
#: (of 255) — decoder and colour-conversion rounding. Deliberately not an SSIM bound: a small
#: text edit ("42" drawn on a photo) scores SSIM 0.9999, above a plain JPEG re-encode (0.98).
NEAR_IDENTICAL_MAX_DELTA = 2
PIXEL_IDENTICAL = "pixel-identical"


def pixel_budget(max_image_size: tuple[int, int]) -> int:
    """Pixels per image the model may see: the area of the ``max_image_size`` box. For Qwen2-VL
    (one visual token per 28x28 pixels) 1024x1024 means at most 1,337 tokens per image."""
    return max_image_size[0] * max_image_size[1]


class VLComparator:
    """Vision-language comparison with bounded memory, a hard timeout and crash isolation.

    The worker starts (and loads the model) as soon as the comparator is built, so loading
    overlaps whatever the caller does before the first pair. ``fault`` is a test-only hook
    (``protocol.Fault``) sent with every request while set.
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.model:
            raise ValueError("the VL comparator needs a model (PAIRWATCH_MODEL or --model)")
        self._options = WorkerOptions(
            model=settings.model, device=settings.device, max_new_tokens=settings.vl_max_new_tokens
        )
        self._load_timeout = settings.vl_load_timeout
        self._metrics = MetricsComparator()
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._unavailable: ModelUnavailable | None = None
        self._info = ComparatorInfo(name="vl", model=settings.model, device=settings.device)
        self._log = get_logger(comparator="vl", model=settings.model)
        self.fault: Fault | None = None
        self._worker = self._start_worker()

    @property
    def info(self) -> ComparatorInfo:
        return self._info

    @property
    def worker_pid(self) -> int | None:
        """The current worker's process id (None between a kill and the next start)."""
        return self._worker.process.pid if self._worker else None

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
    ) -> Verdict:
        metrics = self._metrics.compare(a, b, config, detection=detection)
        skip_reason = _skip_reason(a, b, metrics.metrics)
        if skip_reason is not None:
            similarity = 1.0 if skip_reason == PIXEL_IDENTICAL else metrics.similarity
            return Verdict(
                similarity=similarity,
                is_similar=similarity >= config.similarity_threshold,
                summary=f"The images are {skip_reason}; the VL model was not run.",
                differences=[],
                changed_regions=metrics.changed_regions,
                metrics=metrics.metrics,
                vl=VLDetails(skipped=True, skip_reason=skip_reason),
            )
        request = Request(
            jpegs=(a.jpeg, b.jpeg),
            prompt=build_prompt(config),
            max_pixels=pixel_budget(config.max_image_size),
            timeout_s=config.processing_timeout,
            fault=self.fault,
        )
        try:
            with self._lock:
                reply = self._ask(request)
        except PairError as exc:
            exc.details.setdefault("metrics", metrics.metrics)
            raise
        return self._outcome(reply, metrics, config)

    def wait_ready(self) -> None:
        """Block until the worker has loaded the model (``ModelUnavailable`` if it cannot)."""
        with self._lock:
            self._ready_worker()

    def close(self) -> None:
        """Stop the worker (politely, then by force) and free its memory."""
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    # -- worker management -------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._context, self._options)
        self._log.info("vl_worker_started", pid=worker.process.pid)
        return worker

    def _ready_worker(self) -> _Worker:
        """The running worker, replaced if it died while idle, waited for until loaded."""
        if self._unavailable is not None:
            raise ModelUnavailable(self._unavailable.message)
        worker = self._worker
        if worker is not None and not worker.process.is_alive():
            self._log.warning(
                "vl_worker_lost", pid=worker.process.pid, exitcode=worker.process.exitcode
            )
            worker.stop()
            worker = None
        if worker is None:
            worker = self._worker = self._start_worker()
        if worker.ready is None:
            try:
                ready = worker.wait_ready(self._load_timeout)
            except ModelUnavailable as exc:
                # Missing files or an unreachable hub do not heal between pairs; retrying
                # would cost every later pair the same wait. A restart of the service retries.
                worker.stop()
                self._worker = None
                self._unavailable = exc
                self._log.error("vl_model_unavailable", error=exc.message)
                raise
            self._info = self._info.model_copy(update={"device": ready.device})
            self._log.info(
                "vl_worker_ready",
                pid=worker.process.pid,
                device=ready.device,
                load_ms=ready.load_ms,
            )
        return worker

    def _ask(self, request: Request) -> Reply:
        worker = self._ready_worker()
        limit = request.timeout_s + KILL_GRACE_S
        started = time.perf_counter()
        try:
            try:
                reply = worker.ask(request, limit)
            except _WorkerGone:
                # It died before taking the pair (killed while idle): its successor gets it.
                self._replace(worker, "lost")
                worker = self._ready_worker()
                started = time.perf_counter()
                reply = worker.ask(request, limit)
        except _WorkerDied as exc:
            self._replace(worker, "crashed")
            raise ModelCrashed(
                f"the model worker died during the comparison ({exc})",
                details={"vl": VLDetails(attempts=1, max_pixels=request.max_pixels)},
            ) from None
        except _WorkerTimedOut:
            self._replace(worker, "timeout")
            raise ComparisonTimeout(
                f"the model did not answer within {request.timeout_s:g} s (+{KILL_GRACE_S:g} s "
                f"grace); its worker was killed after {time.perf_counter() - started:.1f} s",
                details={"vl": VLDetails(attempts=1, max_pixels=request.max_pixels)},
            ) from None
        if reply.kind == "error":
            # A CUDA error leaves the device context unusable: start clean.
            self._replace(worker, "error")
            raise ModelCrashed(
                f"the model failed: {reply.message}", details={"vl": _details(reply)}
            )
        return reply

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill ``worker`` and start its successor now, so it loads while the next pair is
        being fetched and prepared."""
        worker.kill()
        self._log.warning("vl_worker_killed", pid=worker.process.pid, reason=reason)
        self._worker = self._start_worker()

    # -- answers -----------------------------------------------------------------------------

    def _outcome(self, reply: Reply, metrics: Verdict, config: ComparisonConfig) -> Verdict:
        details = _details(reply)
        self._log.info(
            "vl_generated",
            attempts=reply.attempts,
            max_pixels=reply.max_pixels,
            visual_tokens=reply.visual_tokens,
            prompt_tokens=reply.prompt_tokens,
            new_tokens=reply.new_tokens,
            generate_ms=reply.generate_ms,
            out_of_time=reply.out_of_time,
            peak_memory_mb=reply.peak_memory_mb,
        )
        context = {"vl": details, "metrics": metrics.metrics}
        if reply.kind == "oom":
            raise OutOfMemory(
                f"the model ran out of memory, also after a retry at half the pixels "
                f"({reply.max_pixels} per image): {reply.message}",
                details=context,
            )
        if reply.out_of_time:
            raise ComparisonTimeout(
                f"the model did not finish its answer within {config.processing_timeout:g} s",
                details=context,
            )
        try:
            answer = parse_answer(reply.text)
        except AnswerInvalid as exc:
            raise ModelOutputInvalid(str(exc), details=context) from None
        return Verdict(
            similarity=answer.similarity,
            is_similar=answer.similarity >= config.similarity_threshold,
            summary=answer.summary,
            differences=answer.differences,
            changed_regions=metrics.changed_regions,
            metrics=metrics.metrics,
            vl=details,
        )


def _details(reply: Reply) -> VLDetails:
    return VLDetails(
        raw_text=reply.text or None,
        visual_tokens=reply.visual_tokens,
        attempts=reply.attempts,
        max_pixels=reply.max_pixels,
        peak_memory_mb=reply.peak_memory_mb,
    )


def _skip_reason(a: PreparedImage, b: PreparedImage, metrics: dict[str, float]) -> str | None:
    """Why the model need not look at this pair, or None. See ``NEAR_IDENTICAL_MAX_DELTA``."""
    if metrics.get("pixel_identical") == 1.0:
        return PIXEL_IDENTICAL
    if a.size != b.size:
        return None
    delta = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
    largest = int(delta.max())
    if largest <= NEAR_IDENTICAL_MAX_DELTA:
        return f"near-identical (no pixel differs by more than {largest}/255)"
    return None


class _WorkerDied(Exception):
    pass


class _WorkerGone(_WorkerDied):
    """Died before taking the request."""


class _WorkerTimedOut(Exception):
    pass


class _Worker:
    """One child process and the service's end of its pipe."""

    def __init__(self, context: Any, options: WorkerOptions) -> None:
        parent_end, child_end = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=worker_main, args=(child_end, options), name="pairwatch-vl", daemon=True
        )
        self.process.start()
        # Only the child holds its end now: if the child dies, reads here see EOF at once.
        child_end.close()
        self.conn: Connection = parent_end
        self.ready: Ready | None = None

    def wait_ready(self, timeout: float) -> Ready:
        try:
            message = self._receive(timeout)
        except _WorkerTimedOut:
            self.kill()
            raise ModelUnavailable(f"the model did not load within {timeout:g} s") from None
        except _WorkerDied as exc:
            raise ModelUnavailable(f"the model worker died while loading ({exc})") from None
        if isinstance(message, LoadFailed):
            raise ModelUnavailable(f"cannot load the model: {message.message}")
        if not isinstance(message, Ready):
            raise ModelUnavailable(f"unexpected message from the model worker: {message!r}")
        self.ready = message
        return message

    def ask(self, request: Request, timeout: float) -> Reply:
        """Send one pair and wait up to ``timeout`` seconds in all for the reply."""
        deadline = time.monotonic() + timeout
        try:
            self.conn.send(request)
            taken = self._receive(timeout)
        except _WorkerDied as exc:
            raise _WorkerGone(str(exc)) from None
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._died(_WorkerGone)
        if taken != TAKEN:
            raise _WorkerDied(f"unexpected message {taken!r}")
        reply = self._receive(max(0.0, deadline - time.monotonic()))
        if not isinstance(reply, Reply):
            raise _WorkerDied(f"unexpected message {reply!r}")
        return reply

    def _receive(self, timeout: float) -> object:
        try:
            if not self.conn.poll(timeout):
                raise _WorkerTimedOut
            return self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            self._died(_WorkerDied)

    def _died(self, error: type[_WorkerDied]) -> NoReturn:
        self.process.join(timeout=5)
        code = self.process.exitcode
        self.conn.close()
        if code is not None and code < 0:
            raise error(f"killed by signal {-code} ({signal.Signals(-code).name})")
        raise error(f"exit code {code}")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask a loaded, idle worker to exit; kill one that is still loading or does not."""
        if self.ready is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=2)
        self.kill()
