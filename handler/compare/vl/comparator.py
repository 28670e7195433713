"""The VL comparator: metrics first, then the model through one ``Backend``.

Per pair: the CPU metrics run in the calling thread (milliseconds); a pair with no change at
native resolution (the pipeline's detection found no region) stops there, and so does a
pixel-identical one, or without a detection a near-identical one. Otherwise the pictures — the
two prepared overviews, then a native-resolution crop of A and of B for each of the largest
changed regions (``handler.crops.cut_crops``), all within the pair's pixel budget (see
``plan_pictures``) — the prompt naming the region each crop pair shows, and the answer's JSON
Schema go to the backend (the local worker process by default, see ``local_backend``), which
answers within ``processing_timeout`` or raises. ``compare`` may be called from several threads
at once: concurrent pairs are what fill the local worker's batches. Whatever happens, the
metrics' numbers stay in the result.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from handler import describe
from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.compare.vl.backends import create_backend
from handler.compare.vl.local_backend import KILL_GRACE_S, LocalBackend
from handler.compare.vl.prompt import (
    AnswerInvalid,
    CropView,
    answer_schema,
    build_prompt,
    parse_answer,
)
from handler.compare.vl.protocol import Backend, Fault, LabelledImage, Reply, Request
from handler.compare.vl.worker import fit_pixels
from handler.config import ComparisonConfig, Settings
from handler.crops import RegionCrop
from handler.deadline import Deadline
from handler.detect import Detection
from handler.errors import ComparisonTimeout, ModelOutputInvalid, OutOfMemory, PairError
from handler.images import PreparedImage
from handler.logs import get_logger
from handler.result import ComparatorInfo, Difference, Region, VLDetails

__all__ = ["KILL_GRACE_S", "VLComparator", "pixel_budget", "plan_pictures"]

#: Near-identical bound: same size and no channel of any pixel differs by more than this
#: (of 255) — decoder and colour-conversion rounding. Deliberately not an SSIM bound: a small
#: text edit ("42" drawn on a photo) scores SSIM 0.9999, above a plain JPEG re-encode (0.98).
NEAR_IDENTICAL_MAX_DELTA = 2
PIXEL_IDENTICAL = "pixel-identical"
NO_CHANGE = "no change at native resolution"
#: Crops get at least this share of a pair's pixel budget, the overviews held to the rest.
MIN_CROP_SHARE = 0.25
#: A crop given fewer pixels than this (16 Qwen2-VL tokens) would say too little for its
#: tokens: the smallest regions' crop pairs are dropped until the others get at least this.
MIN_CROP_PIXELS = 112 * 112


def pixel_budget(max_image_size: tuple[int, int]) -> int:
    """Pixels per image the model may see: the area of the ``max_image_size`` box. For Qwen2-VL
    (one visual token per 28x28 pixels) 1024x1024 means at most 1,337 tokens per image."""
    return max_image_size[0] * max_image_size[1]


@dataclass(frozen=True)
class PicturePlan:
    """What one pair sends: the overviews' pixel cap and the crops (A's, B's: one of them None
    for a region only one image has) that fit."""

    #: Cap on every picture (the request's ``max_pixels``): ``pixel_budget`` unless the crops'
    #: minimum share needs room from the overviews.
    max_pixels: int
    crops: tuple[tuple[RegionCrop, Image.Image | None, Image.Image | None], ...] = ()

    @property
    def crop_pixels(self) -> int:
        return sum(
            image.width * image.height
            for _, a, b in self.crops
            for image in (a, b)
            if image is not None
        )


def plan_pictures(
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    crops: Sequence[RegionCrop],
    max_image_size: tuple[int, int],
) -> PicturePlan:
    """Fit the crops and the overviews into one pair's pixel budget.

    The pair's budget is 2 x ``pixel_budget(max_image_size)`` (what two overviews may use).
    The crops share what the two prepared overviews leave of it, but at least MIN_CROP_SHARE
    of it, evenly: every crop picture (A's and B's of each region, largest regions first; one
    of them for a region that only one image has) gets at most ``share / pictures`` pixels and
    is downscaled to fit (never upscaled; crops are already at most ``CROP_SIDE`` square).
    When that is below MIN_CROP_PIXELS the smallest region's crops are dropped and the rest
    share again. Only when overviews and crops together would exceed the budget are the
    overviews held to what the crops leave (``max_pixels``, at least 3/8 of the budget each).
    So the pixels reaching the model are at most the budget — up to the model processor's
    rounding to its patch grid — whatever the inputs' size, and GPU memory per pair stays
    bounded as before.
    """
    per_image = pixel_budget(max_image_size)
    budget = 2 * per_image
    overviews = size_a[0] * size_a[1] + size_b[0] * size_b[1]
    share = max(budget - overviews, int(budget * MIN_CROP_SHARE))
    shown = [crop for crop in crops if crop.a is not None or crop.b is not None]

    def pictures() -> int:
        return sum((crop.a is not None) + (crop.b is not None) for crop in shown)

    while shown and share // pictures() < MIN_CROP_PIXELS:
        shown.pop()
    if not shown:
        return PicturePlan(max_pixels=per_image)
    each = share // pictures()
    fitted = tuple((crop, _fit_crop(crop.a, each), _fit_crop(crop.b, each)) for crop in shown)
    plan = PicturePlan(max_pixels=per_image, crops=fitted)
    if overviews + plan.crop_pixels > budget:
        plan = PicturePlan(max_pixels=(budget - plan.crop_pixels) // 2, crops=fitted)
    return plan


def _fit_crop(image: Image.Image | None, max_pixels: int) -> Image.Image | None:
    if image is None:
        return None
    return fit_pixels(image, max_pixels, resample=Image.Resampling.LANCZOS)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


class VLComparator:
    """Vision-language comparison with bounded memory, a hard timeout and crash isolation.

    The backend starts (the local one loads the model in its worker) as soon as the comparator
    is built, so loading overlaps whatever the caller does before the first pair. ``fault`` is
    a test-only hook (``protocol.Fault``) sent with every request while set.
    """

    #: The pipeline cuts native-resolution crops of the changed regions for this comparator.
    wants_crops = True

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
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict:
        """The metrics, then the model's answer by the pair's ``deadline`` (from the moment the
        pair was taken, not from when the model gets to it; ``processing_timeout`` from now
        without one)."""
        deadline = deadline or Deadline(config.processing_timeout)
        metrics = self._metrics.compare(a, b, config, detection=detection, deadline=deadline)
        skip_reason = _skip_reason(a, b, metrics.metrics, detection)
        if skip_reason is not None:
            return _skipped(metrics, skip_reason, config)
        request = self._request(a, b, config, detection, metrics.changed_regions, crops, deadline)
        try:
            reply = self._backend.generate(request)
        except PairError as exc:
            exc.details.setdefault("metrics", metrics.metrics)
            raise
        return self._outcome(
            reply, metrics, config, pictures=len(request.images), seconds=deadline.seconds
        )

    def identical(self, config: ComparisonConfig, detection: Detection) -> Verdict:
        """Byte-identical inputs: the metrics' verdict, the model not run (pixel-identical)."""
        return _skipped(self._metrics.identical(config, detection), PIXEL_IDENTICAL, config)

    def _request(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        detection: Detection | None,
        regions: list[Region],
        crops: Sequence[RegionCrop],
        deadline: Deadline,
    ) -> Request:
        """The overviews as prepared, then the crops that fit (``plan_pictures``: each region's
        view in A and in B, or in the one image that has it), encoded once here as JPEG at
        ``image_quality``; the prompt says what each crop shows and how B lines up with A."""
        known = [crop for crop in crops if 0 <= crop.region < len(regions)]
        plan = plan_pictures(a.size, b.size, known, config.max_image_size)
        images = [LabelledImage("Image A:", a.jpeg), LabelledImage("Image B:", b.jpeg)]
        views = []
        for crop, crop_a, crop_b in plan.crops:
            number = crop.region
            for which, picture in (("A", crop_a), ("B", crop_b)):
                if picture is not None:
                    label = f"Region {number} in image {which}:"
                    images.append(LabelledImage(label, _jpeg(picture, config.image_quality)))
            views.append(
                CropView(
                    region=number,
                    found=regions[number],
                    shown_a=crop.box_a if crop_a is not None else None,
                    shown_b=crop.box_b if crop_b is not None else None,
                )
            )
        moves = []
        if detection is not None and detection.alignment is not None:
            moves = describe.alignment_clauses(detection.alignment)
        return Request(
            images=tuple(images),
            prompt=build_prompt(config, views, moves),
            max_pixels=plan.max_pixels,
            timeout_s=deadline.seconds,
            expires_at=deadline.expires_at_monotonic(),
            schema=self._schema,
            fault=self.fault,
        )

    def close(self) -> None:
        """Stop the backend (the local worker, politely then by force) and free its memory."""
        self._backend.close()

    # -- answers -----------------------------------------------------------------------------

    def _outcome(
        self,
        reply: Reply,
        metrics: Verdict,
        config: ComparisonConfig,
        *,
        pictures: int,
        seconds: float,
    ) -> Verdict:
        details = reply.details()
        self._log.info(
            "vl_generated",
            attempts=reply.attempts,
            batch_size=reply.batch_size,
            pictures=pictures,
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
                f"the model did not finish its answer within {seconds:g} s (the pair's "
                "processing_timeout, counted from when it was taken)",
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
            differences=known_regions(answer.differences, len(metrics.changed_regions)),
            changed_regions=metrics.changed_regions,
            metrics=metrics.metrics,
            vl=details,
        )


def known_regions(differences: list[Difference], regions: int) -> list[Difference]:
    """``differences`` with a ``region`` outside ``changed_regions`` (``regions`` of them) set
    to null: a result only ever points at regions it has."""
    return [
        d if d.region is None or d.region < regions else d.model_copy(update={"region": None})
        for d in differences
    ]


def _skipped(metrics: Verdict, reason: str, config: ComparisonConfig) -> Verdict:
    """The metrics' verdict for a pair the model need not look at (``_skip_reason``)."""
    similarity = 1.0 if reason == PIXEL_IDENTICAL else metrics.similarity
    return Verdict(
        similarity=similarity,
        is_similar=similarity >= config.similarity_threshold,
        summary=f"{_skip_summary(reason)}; the VL model was not run.",
        differences=[],
        changed_regions=metrics.changed_regions,
        metrics=metrics.metrics,
        vl=VLDetails(skipped=True, skip_reason=reason),
    )


def _skip_summary(reason: str) -> str:
    return "No change at native resolution" if reason == NO_CHANGE else f"The images are {reason}"


def _skip_reason(
    a: PreparedImage, b: PreparedImage, metrics: dict[str, float], detection: Detection | None
) -> str | None:
    """Why the model need not look at this pair, or None: pixel-identical; else, with the
    native-resolution detection, no confident change there (no region, no transparency-only
    change) — exact, where comparing the prepared images could miss a one-word change or be
    fooled by re-encoding noise; else, without one, near-identical prepared images (see
    ``NEAR_IDENTICAL_MAX_DELTA``)."""
    if metrics.get("pixel_identical") == 1.0:
        return PIXEL_IDENTICAL
    if detection is not None:
        return None if detection.differs else NO_CHANGE
    if a.size != b.size:
        return None
    delta = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
    largest = int(delta.max())
    if largest <= NEAR_IDENTICAL_MAX_DELTA:
        return f"near-identical (no pixel differs by more than {largest}/255)"
    return None
