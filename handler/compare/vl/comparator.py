"""The VL comparator: metrics first, then the model through one ``Backend``.

Per pair: the CPU metrics run in the calling thread (milliseconds); a pixel-identical or
near-identical pair stops there. Otherwise the two prepared JPEGs, the prompt and the answer's
JSON Schema go to the backend (the local worker process by default, see ``local_backend``),
which answers within ``processing_timeout`` or raises. ``compare`` may be called from several
threads at once: concurrent pairs are what fill the local worker's batches. Whatever happens,
the metrics' numbers stay in the result.
"""

from __future__ import annotations

import numpy as np

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.compare.vl.backends import create_backend
from handler.compare.vl.local_backend import KILL_GRACE_S, LocalBackend
from handler.compare.vl.prompt import AnswerInvalid, answer_schema, build_prompt, parse_answer
from handler.compare.vl.protocol import Backend, Fault, Reply, Request
from handler.config import ComparisonConfig, Settings
from handler.detect import Detection
from handler.errors import ComparisonTimeout, ModelOutputInvalid, OutOfMemory, PairError
from handler.images import PreparedImage
from handler.logs import get_logger
from handler.result import ComparatorInfo, VLDetails

__all__ = ["KILL_GRACE_S", "VLComparator", "pixel_budget"]

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

    The backend starts (the local one loads the model in its worker) as soon as the comparator
    is built, so loading overlaps whatever the caller does before the first pair. ``fault`` is
    a test-only hook (``protocol.Fault``) sent with every request while set.
    """

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        if not settings.model:
            raise ValueError("the VL comparator needs a model (PAIRWATCH_MODEL or --model)")
        self._model = settings.model
        self._metrics = MetricsComparator()
        self._schema = answer_schema()
        self._log = get_logger(comparator="vl", model=settings.model)
        self.fault: Fault | None = None
        self._backend = backend if backend is not None else create_backend(settings)

    @property
    def info(self) -> ComparatorInfo:
        return ComparatorInfo(
            name="vl",
            model=self._model,
            device=self._backend.device,
            backend=self._backend.name,
            endpoint=self._backend.endpoint,
        )

    @property
    def worker_pid(self) -> int | None:
        """The local worker's process id (None between a kill and the next start, or for a
        remote backend)."""
        backend = self._backend
        return backend.worker_pid if isinstance(backend, LocalBackend) else None

    def wait_ready(self) -> None:
        """Block until the model can take pairs; ``ModelUnavailable`` if it never will."""
        self._backend.wait_ready()

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
            schema=self._schema,
            fault=self.fault,
        )
        try:
            reply = self._backend.generate(request)
        except PairError as exc:
            exc.details.setdefault("metrics", metrics.metrics)
            raise
        return self._outcome(reply, metrics, config)

    def close(self) -> None:
        """Stop the backend (the local worker, politely then by force) and free its memory."""
        self._backend.close()

    # -- answers -----------------------------------------------------------------------------

    def _outcome(self, reply: Reply, metrics: Verdict, config: ComparisonConfig) -> Verdict:
        details = reply.details()
        self._log.info(
            "vl_generated",
            attempts=reply.attempts,
            batch_size=reply.batch_size,
            constrained=reply.constrained,
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
                f"the model ran out of memory, also after splitting its batch and a retry at "
                f"half the pixels ({reply.max_pixels} per image): {reply.message}",
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
