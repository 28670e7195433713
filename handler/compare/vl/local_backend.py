"""The local backend: the model in a worker process the service can kill, fed in batches.

``generate`` may be called from many threads at once. Calls are queued; one dispatcher thread
takes up to ``vl_batch_size`` of them (waiting at most ``BATCH_FILL_S`` for a batch to fill),
sends them to the worker as one batch and hands each pair its own reply as soon as the worker
sends it. Every pair keeps its own deadline (``Request.expires_at``, started when the pair was
taken, not when its batch was): the worker stops a pair's row at it (between tokens); a pair
still without a reply ``KILL_GRACE_S`` later gets
``timeout`` while its batch mates go on; once every pair of the batch is past its deadline plus
the grace (a stuck prefill or kernel), the worker is SIGKILLed and replaced, and only that
batch's pairs time out — queued pairs go to the successor.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

from handler.compare.vl.protocol import (
    TAKEN,
    LoadFailed,
    Ready,
    Reply,
    Request,
    Row,
    WorkerOptions,
)
from handler.compare.vl.worker import worker_main
from handler.config import Settings
from handler.errors import ComparisonTimeout, ModelCrashed, ModelUnavailable, PairError
from handler.logs import get_logger
from handler.result import VLDetails

#: Seconds past a pair's ``processing_timeout`` before it is given up on (and, once every pair
#: of its batch is, before the worker is killed). Inside the timeout the worker stops the pair
#: itself between tokens; the grace covers one last token step and the reply, so only a stuck
#: prefill or a hung kernel meets the kill.
KILL_GRACE_S = 2.0
#: Filling a batch: take pairs while the next one arrives within ``BATCH_GAP_S`` of the last,
#: for at most ``BATCH_FILL_S`` after the first — milliseconds against generate's seconds.
#: Concurrent callers run the metrics pre-gate first, so their pairs arrive spread out.
BATCH_GAP_S = 0.01
BATCH_FILL_S = 0.05
#: Default ``vl_batch_size``: batching pays on a GPU; on CPU the cores are already busy.
CUDA_BATCH_SIZE, CPU_BATCH_SIZE = 8, 1


@dataclass
class _Pending:
    request: Request
    future: Future[Reply] = field(default_factory=Future)

    def resolve(self, reply: Reply | None = None, error: PairError | None = None) -> None:
        """First outcome wins: a reply arriving after the pair was given up on is dropped (the
        dispatcher and a caller that stopped waiting may resolve it at the same moment)."""
        with contextlib.suppress(InvalidStateError):
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(reply)  # type: ignore[arg-type]


class LocalBackend:
    """``protocol.Backend`` on a spawned worker process (see the module docstring)."""

    name = "local"
    endpoint: str | None = None

    def __init__(self, settings: Settings) -> None:
        if not settings.model:
            raise ValueError("the VL comparator needs a model (PAIRWATCH_MODEL or --model)")
        self._options = WorkerOptions(
            model=settings.model, device=settings.device, max_new_tokens=settings.vl_max_new_tokens
        )
        self._load_timeout = settings.vl_load_timeout
        self._batch_size: int | None = settings.vl_batch_size
        self._device = settings.device
        self._context = multiprocessing.get_context("spawn")
        self._log = get_logger(comparator="vl", model=settings.model)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _worker and _closed against close()
        self._closed = False
        self._loaded = threading.Event()
        self._unavailable: ModelUnavailable | None = None
        self._worker: _Worker | None = self._start_worker()
        self._thread = threading.Thread(
            target=self._serve, name="pairwatch-vl-batches", daemon=True
        )
        self._thread.start()

    @property
    def device(self) -> str:
        return self._device

    @property
    def batch_size(self) -> int:
        """Most pairs per ``generate``: ``vl_batch_size``, else 8 on CUDA and 1 on CPU."""
        if self._batch_size is not None:
            return self._batch_size
        return CUDA_BATCH_SIZE if self._device.startswith("cuda") else CPU_BATCH_SIZE

    @property
    def worker_pid(self) -> int | None:
        """The current worker's process id (None between a kill and the next start)."""
        worker = self._worker
        return worker.process.pid if worker else None

    def wait_ready(self) -> None:
        self._loaded.wait()
        if self._unavailable is not None:
            raise ModelUnavailable(self._unavailable.message)

    def generate(self, request: Request) -> Reply:
        # A pair does not wait past its deadline for a model still loading (a replacement).
        self._loaded.wait(max(0.0, request.expires_at - time.monotonic()))
        if not self._loaded.is_set():
            raise ComparisonTimeout(
                f"the model was still loading at the pair's deadline ({request.timeout_s:g} s "
                "from when it was taken)"
            )
        self.wait_ready()
        pending = _Pending(request)
        with self._lock:
            if self._closed:
                raise ModelUnavailable("the VL comparator is closed")
            self._queue.put(pending)
        # The dispatcher answers by the deadline plus the grace once the batch is taken; the
        # caller never waits much longer, even behind a replacement worker that is loading.
        wait = max(0.0, request.expires_at - time.monotonic()) + 2 * KILL_GRACE_S
        try:
            return pending.future.result(timeout=wait)
        except TimeoutError:
            timeout = ComparisonTimeout(
                f"no answer from the model by the pair's deadline ({request.timeout_s:g} s "
                f"from when it was taken, +{2 * KILL_GRACE_S:g} s grace)"
            )
            pending.resolve(error=timeout)  # a late reply is dropped
            return pending.future.result()

    def close(self) -> None:
        """Stop taking pairs, stop the worker (politely, then by force), fail what is queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        self._thread.join(timeout=10)

    # -- the dispatcher thread ---------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._load()
            while (batch := self._next_batch()) is not None:
                self._run_batch(batch)
        except Exception as exc:  # never leave a caller waiting forever
            self._log.exception("vl_dispatcher_failed", error=str(exc))
            self._unavailable = ModelUnavailable(f"the VL dispatcher failed: {exc}")
        finally:
            self._loaded.set()
            self._fail_queued()

    def _load(self) -> None:
        try:
            self._ready_worker()
        except ModelUnavailable:
            pass  # recorded in _unavailable; every pair gets it
        finally:
            self._loaded.set()

    def _next_batch(self) -> list[_Pending] | None:
        """Block for one pair, then take what else arrives (``BATCH_GAP_S``, ``BATCH_FILL_S``)."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        fill_until = time.monotonic() + BATCH_FILL_S
        while len(batch) < self.batch_size:
            wait = min(BATCH_GAP_S, fill_until - time.monotonic())
            try:
                item = self._queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.resolve(error=ModelUnavailable("the VL comparator is closed"))

    def _run_batch(self, batch: list[_Pending]) -> None:
        if self._unavailable is not None:
            for pending in batch:
                pending.resolve(error=ModelUnavailable(self._unavailable.message))
            return
        batch = self._drop_late(batch)
        if not batch:
            return
        try:
            worker = self._ready_worker()
            try:
                worker.take([p.request for p in batch])
            except _WorkerGone:
                # It died before taking the batch (killed while idle): its successor gets it.
                self._replace(worker, "lost")
                worker = self._ready_worker()
                worker.take([p.request for p in batch])
        except ModelUnavailable as exc:
            for pending in batch:
                pending.resolve(error=ModelUnavailable(exc.message))
            return
        except _WorkerDied as exc:
            self._crash(batch, range(len(batch)), str(exc))
            self._replace(worker, "crashed")
            return
        self._collect(worker, batch)

    @staticmethod
    def _drop_late(batch: list[_Pending]) -> list[_Pending]:
        """The pairs of ``batch`` still within their deadline; the others time out now, never
        reaching the model (they waited too long for a worker: a replacement loading)."""
        now = time.monotonic()
        for pending in batch:
            if pending.request.expires_at <= now:
                pending.resolve(
                    error=ComparisonTimeout(
                        f"the pair's deadline ({pending.request.timeout_s:g} s from when it was "
                        "taken) passed before the model could take it",
                        details={"vl": _failed_details(pending, len(batch))},
                    )
                )
        return [pending for pending in batch if not pending.future.done()]

    def _collect(self, worker: _Worker, batch: list[_Pending]) -> None:
        """Hand out the batch's rows as they come; give up on pairs past their deadline (each
        pair gets the grace after its batch was taken at least, to say it ran out of time)."""
        taken = time.monotonic()
        give_up = [max(p.request.expires_at, taken) + KILL_GRACE_S for p in batch]
        open_rows = set(range(len(batch)))
        failed = False
        while open_rows:
            now = time.monotonic()
            waiting = [i for i in open_rows if give_up[i] > now]
            if not waiting:
                # Every pair of the batch is past its deadline and the grace: stuck. Killed
                # before the pairs hear of it, so a caller never sees a timeout from a live
                # worker still busy with its pair.
                self._replace(worker, "timeout")
            for index in open_rows - set(waiting):
                batch[index].resolve(error=self._timed_out(batch[index], len(batch), now - taken))
            if not waiting:
                return
            try:
                message = worker.receive(min(give_up[i] for i in waiting) - now)
            except _WorkerTimedOut:
                continue
            except _WorkerDied as exc:
                self._crash(batch, open_rows, str(exc))
                self._replace(worker, "crashed")
                return
            if not isinstance(message, Row) or message.index not in open_rows:
                self._crash(batch, open_rows, f"unexpected message {message!r}")
                self._replace(worker, "error")
                return
            open_rows.discard(message.index)
            reply = message.reply
            if reply.kind == "error":
                failed = True
                batch[message.index].resolve(
                    error=ModelCrashed(
                        f"the model failed: {reply.message}",
                        details={"vl": reply.details()},
                    )
                )
            else:
                batch[message.index].resolve(reply)
        if failed:
            # A CUDA error leaves the device context unusable: start clean.
            self._replace(worker, "error")

    @staticmethod
    def _crash(batch: list[_Pending], rows: Iterable[int], why: str) -> None:
        for index in rows:
            batch[index].resolve(
                error=ModelCrashed(
                    f"the model worker died during the comparison ({why})",
                    details={"vl": _failed_details(batch[index], len(batch))},
                )
            )

    @staticmethod
    def _timed_out(pending: _Pending, batch_size: int, waited: float) -> PairError:
        return ComparisonTimeout(
            f"the model did not answer by the pair's deadline ({pending.request.timeout_s:g} s "
            f"from when it was taken, +{KILL_GRACE_S:g} s grace); given up {waited:.1f} s after "
            "its batch went to the model",
            details={"vl": _failed_details(pending, batch_size)},
        )

    # -- worker lifetime (dispatcher thread only, except close) ------------------------------

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._context, self._options)
        self._log.info("vl_worker_started", pid=worker.process.pid)
        return worker

    def _ready_worker(self) -> _Worker:
        """The running worker, replaced if it died while idle, waited for until loaded."""
        with self._lock:
            if self._closed:
                raise ModelUnavailable("the VL comparator is closed")
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
                with self._lock:
                    self._worker = None
                self._unavailable = exc
                self._log.error("vl_model_unavailable", error=exc.message)
                raise
            self._device = ready.device
            self._log.info(
                "vl_worker_ready",
                pid=worker.process.pid,
                device=ready.device,
                load_ms=ready.load_ms,
                batch_size=self.batch_size,
            )
        return worker

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill ``worker`` and start its successor now, so it loads while the next pairs are
        being fetched and prepared."""
        worker.kill()
        self._log.warning("vl_worker_killed", pid=worker.process.pid, reason=reason)
        with self._lock:
            if self._worker is worker:
                self._worker = None if self._closed else self._start_worker()


def _failed_details(pending: _Pending, batch_size: int) -> VLDetails:
    return VLDetails(attempts=1, max_pixels=pending.request.max_pixels, batch_size=batch_size)


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
            message = self.receive(timeout)
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

    def take(self, batch: list[Request]) -> None:
        """Send a batch and wait for the worker to confirm it has it (``_WorkerGone`` if it
        died before)."""
        try:
            self.conn.send(batch)
            taken = self.receive(KILL_GRACE_S + 5)
        except (_WorkerDied, _WorkerTimedOut) as exc:
            raise _WorkerGone(str(exc) or "no answer") from None
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._died(_WorkerGone)
        if taken != TAKEN:
            raise _WorkerDied(f"unexpected message {taken!r}")

    def receive(self, timeout: float) -> object:
        try:
            if not self.conn.poll(max(0.0, timeout)):
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
