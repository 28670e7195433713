"""One pair, end to end: fetch -> prepare -> detect -> compare -> result.

Each input is fetched, hashed and its header checked in turn (format, size, pixel budget:
nothing decoded). Byte-identical inputs (same sha256, same size) are answered at once: the
comparator's verdict for identical images, neither decoded (a PNG's chunks are verified, the
file is not trusted blindly). Otherwise both inputs are compared at native resolution
(``handler.detect``, streamed), which resizes each to its prepared size on the way: every
input is decoded once, not once for detection and again for its prepared image. The
comparator sees the prepared images plus the detection — and, when it wants them (the VL
comparator) or a diff image is drawn, native-resolution crops of the largest changed regions,
with ignored boxes filled as in the prepared images.

Decoding is the memory-hungry part: it takes the pair's megapixels from the process's decode
budget (``handler.budget``, ``decode_budget_mp``) and gives them back once the prepared images
exist, so small pairs decode side by side while a pair as large as the budget runs alone; peak
RAM follows the budget, not the number of pairs in flight.

The whole pair runs against one ``handler.deadline.Deadline`` (``processing_timeout``): every
stage declares itself to it and asks it between units of work, waiting for room in the decode
budget counts, and a pair past its deadline stops with a ``timeout`` result that names the
stage it was in (``error.stage``) and keeps the timings so far. A pair nobody waits for any
more (``serve``: its client left) is stopped through the same deadline (``abandon``).

Every ``PairError`` becomes a result with ``status`` error/timeout. What still raises is not
about the pair itself and is worth a retry: storage trouble from ``ImageInput.load`` (an object
replaced mid-read, the network) and programming errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, overload

from PIL import Image

from handler.budget import DEFAULT_DECODE_BUDGET_MP, DecodeBudget, process_budget
from handler.compare.base import Comparator, Verdict
from handler.config import ComparisonConfig, Settings
from handler.crops import RegionCrop, cut_crops
from handler.deadline import Deadline, current
from handler.detect import Detection, check_ignore_regions, check_match_regions, detect
from handler.errors import ComparisonTimeout, PairError
from handler.images import (
    STREAM_PIXELS,
    InputHeader,
    PreparedImage,
    fill_boxes,
    fitted_size,
    mask_boxes,
    prepare,
    prepare_shrunk,
    read_header,
    verify,
)
from handler.logs import elapsed_ms, get_logger
from handler.prepared_cache import CacheKey, PreparedCache, cache_key, process_cache
from handler.result import Box, ComparisonResult, InputInfo, failure_result
from handler.vips import release_after


@dataclass(frozen=True)
class ImageInput:
    """A named input whose bytes are fetched only when the pipeline gets to it.

    ``digest``, where the source has one, gives the sha256 of what ``load`` returned, computed
    while the bytes streamed in (a bucket's body, an upload), so they are not hashed again."""

    name: str
    load: Callable[[], bytes]
    etag: str | None = None
    digest: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class PairOutcome:
    """The result, plus the diff image's PNG bytes when one was asked for and could be drawn."""

    result: ComparisonResult
    diff_png: bytes | None = None


def compare_pair(
    pair_id: str,
    a: ImageInput,
    b: ImageInput,
    config: ComparisonConfig,
    comparator: Comparator,
    *,
    max_input_pixels: int,
    diff_image: bool = False,
    cache_mb: int = 0,
    decode_budget_mp: float = DEFAULT_DECODE_BUDGET_MP,
    deadline: Deadline | None = None,
) -> PairOutcome:
    """Compare ``a`` with ``b``; failures come back as error/timeout results, never raised.

    With ``diff_image`` the outcome carries a PNG (``handler.diff_image``) whenever both images
    were prepared, failed comparisons included (byte-identical inputs: the legend alone; not a
    timed-out pair: its time is up); the caller names and writes it. ``cache_mb`` sizes the
    process's cache of prepared images (0: none), ``decode_budget_mp`` its decode budget.
    ``deadline`` is the pair's, started by whoever took the pair (else the thread's current
    one, else ``config.processing_timeout`` from now); ``config`` may only shorten it.
    A caller holding the deployment's ``Settings`` goes through ``compare_pair_with_settings``.
    """
    log = get_logger(pair_id=pair_id)
    deadline = pair_deadline(deadline or current(), config)
    started = time.perf_counter()
    infos = [InputInfo(name=a.name, etag=a.etag), InputInfo(name=b.name, etag=b.etag)]
    timings: dict[str, float] = {}
    prepared: list[PreparedImage] = []
    crops: list[RegionCrop] = []
    failed: str | None = None
    compare_start: float | None = None
    identical = False
    preparation = _Preparation(
        config, max_input_pixels, process_cache(cache_mb), timings, log, deadline
    )
    detection: Detection | None = None
    try:
        encoded: list[bytes] = []
        started_inputs: list[PreparedImage | InputHeader] = []
        for source, info in zip((a, b), infos, strict=True):
            failed = "a" if not encoded else "b"
            deadline.enter("fetch")
            encoded.append(source.load())
            deadline.enter("prepare")
            started_inputs.append(preparation.start(source, encoded[-1], info))
        failed = None
        # (What a failure's diff image can show until detection has finished the rest.)
        prepared = [item for item in started_inputs if isinstance(item, PreparedImage)]
        identical = infos[0].sha256 == infos[1].sha256 and infos[0].bytes == infos[1].bytes
        if identical:
            deadline.enter("compare")
            compare_start = time.perf_counter()
            outcome = _identical(encoded[0], started_inputs[0], infos, config, comparator)
        else:
            deadline.enter("detect")
            budget = process_budget(decode_budget_mp)
            with _decoding(budget, _megapixels(started_inputs), deadline, log):
                detection, crops = _detect(
                    encoded,
                    config,
                    max_input_pixels,
                    [preparation.wanted(item) for item in started_inputs],
                    diff_image or comparator.wants_crops,
                    timings,
                    log,
                    deadline,
                )
                deadline.enter("prepare")
                prepared = preparation.finished(started_inputs, (a, b), encoded, infos, detection)
            del encoded
            prepared = _masked(prepared, config, detection.size_a)
            crops = _masked_crops(crops, config, detection)
            deadline.enter("compare")
            compare_start = time.perf_counter()
            outcome = comparator.compare(
                prepared[0],
                prepared[1],
                config,
                detection=detection,
                crops=crops,
                deadline=deadline,
            )
        timings["compare"] = elapsed_ms(compare_start)
    except PairError as exc:
        failed = exc.details.get("input", failed)
        if isinstance(exc, ComparisonTimeout):
            exc.details.setdefault("stage", deadline.stage)
            _add_stage_time(timings, deadline)
        elif compare_start is not None and "compare" not in timings:
            timings["compare"] = elapsed_ms(compare_start)
        timings["total"] = elapsed_ms(started)
        result = failure_result(
            pair_id, exc, infos, config, comparator.info, timings=timings, failed_input=failed
        )
        log.warning(
            "pair_failed",
            error_type=exc.type,
            error=exc.message,
            input=failed,
            stage=exc.details.get("stage"),
            duration_ms=timings["total"],
        )
        if isinstance(exc, ComparisonTimeout):
            return PairOutcome(result)  # no diff image: the pair's time is up
        return _with_diff(result, prepared, diff_image, crops)
    timings["total"] = elapsed_ms(started)
    log.info(
        "pair_compared",
        comparator=comparator.info.name,
        similarity=round(outcome.similarity, 4),
        is_similar=outcome.is_similar,
        regions=len(outcome.changed_regions),
        identical_bytes=identical,
        compare_ms=timings["compare"],
        duration_ms=timings["total"],
    )
    result = ComparisonResult(
        pair_id=pair_id,
        status="ok",
        similarity=outcome.similarity,
        is_similar=outcome.is_similar,
        summary=outcome.summary,
        differences=outcome.differences,
        changed_regions=outcome.changed_regions,
        metrics=outcome.metrics,
        comparator=comparator.info,
        inputs=infos,
        config=config,
        timings_ms=timings,
        vl=outcome.vl,
        alignment=detection.alignment if detection is not None else None,
    )
    if identical:
        return _with_legend(result, diff_image)
    return _with_diff(result, prepared, diff_image, crops)


def compare_pair_with_settings(
    settings: Settings,
    pair_id: str,
    a: ImageInput,
    b: ImageInput,
    config: ComparisonConfig,
    comparator: Comparator,
    *,
    diff_image: bool = False,
    deadline: Deadline | None = None,
) -> PairOutcome:
    """``compare_pair`` bounded by a deployment's ``settings``: the one place that turns them
    into its limits (``max_input_pixels``, ``decode_budget_mp``, ``cache_mb``), so that every
    entry point (a job, ``serve``, ``pairwatch compare``, ``handler.compare_files``) bounds
    its pairs alike and a new limit is added here once.

    ``config`` stays the caller's (a manifest or a request may override the settings' own);
    ``diff_image`` too: only a job writes one.
    """
    return compare_pair(
        pair_id,
        a,
        b,
        config,
        comparator,
        max_input_pixels=settings.max_input_pixels,
        diff_image=diff_image,
        cache_mb=settings.cache_mb,
        decode_budget_mp=settings.decode_budget_mp,
        deadline=deadline,
    )


def pair_deadline(deadline: Deadline | None, config: ComparisonConfig) -> Deadline:
    """``deadline`` shortened to ``config.processing_timeout`` (a pair may ask for less time
    than the deployment, never for more), or a new one from now when None."""
    if deadline is None:
        return Deadline(config.processing_timeout)
    return deadline.capped(config.processing_timeout)


def _add_stage_time(timings: dict[str, float], deadline: Deadline) -> None:
    """A timed-out pair's timings so far: the stage it stopped in counts up to now."""
    stage = deadline.stage
    timings[stage] = round(timings.get(stage, 0.0) + deadline.stage_ms(), 2)


def _identical(
    data: bytes,
    item: PreparedImage | InputHeader,
    infos: list[InputInfo],
    config: ComparisonConfig,
    comparator: Comparator,
) -> Verdict:
    """Byte-identical inputs: the comparator's verdict for identical images, neither decoded.
    The file is verified without decoding (a broken PNG is still an ``invalid_image``), the
    ignore and level boxes checked against its header's size. Nothing differs, so nothing
    counts under any match level: the detection of identical images (no region, nothing
    moved, no alignment)."""
    size = _size(item)
    try:
        verify(data)
    except PairError as exc:
        exc.details.setdefault("input", "a")
        raise
    check_ignore_regions(config.ignore_regions, size)
    check_match_regions(config.regions, size)
    for info in infos:
        info.processed_size = fitted_size(size, config.max_image_size)
    return comparator.identical(config, Detection(size_a=size, size_b=size, work_size=size))


def _size(item: PreparedImage | InputHeader) -> tuple[int, int]:
    return item.original_size if isinstance(item, PreparedImage) else item.size


def _megapixels(items: Sequence[PreparedImage | InputHeader]) -> float:
    return sum(width * height for width, height in map(_size, items)) / 1e6


@contextmanager
def _decoding(
    budget: DecodeBudget, megapixels: float, deadline: Deadline, log: Any
) -> Iterator[None]:
    """The pair's decoding stage (detection, crops, prepared images) holding its megapixels of
    the process's decode budget; logged when it starts (how long it waited for room) and
    when it gives them back. Waiting for room counts against ``deadline``: a pair that gets
    none in time stops with ``timeout``, in the stage it waited in."""
    asked = time.perf_counter()
    with ExitStack() as stack:
        try:
            held = budget.held(megapixels, timeout=deadline.remaining())
            granted = stack.enter_context(held)
        except ComparisonTimeout as exc:
            raise deadline.timeout(exc.message) from None
        deadline.check()  # (abandoned while it waited)
        start = time.perf_counter()
        log.info(
            "decode_started",
            megapixels=round(megapixels, 2),
            waited_ms=round((start - asked) * 1000, 2),
            budget_in_use_mp=round(budget.in_use, 2),
        )
        try:
            yield
        finally:
            log.info("decode_finished", megapixels=round(granted, 2), held_ms=elapsed_ms(start))


def _detect(
    encoded: list[bytes],
    config: ComparisonConfig,
    max_input_pixels: int,
    shrunk_sizes: list[tuple[int, int] | None],
    want_crops: bool,
    timings: dict[str, float],
    log: Any,
    deadline: Deadline,
) -> tuple[Detection, list[RegionCrop]]:
    """Native-resolution detection (and the crops, for the diff image or the comparator, cut
    from the pixels detection kept where the inputs are small)."""
    start = time.perf_counter()
    detection = detect(
        encoded[0],
        encoded[1],
        max_pixels=max_input_pixels,
        ignore=config.ignore_regions,
        shrunk_sizes=(shrunk_sizes[0], shrunk_sizes[1]),
        keep_pixels=want_crops,
        match_level=config.match_level,
        regions=config.regions,
        deadline=deadline,
    )
    crops = (
        cut_crops(encoded[0], encoded[1], detection, max_pixels=max_input_pixels, deadline=deadline)
        if want_crops
        else []
    )
    detection = dataclasses.replace(detection, pixels=(None, None))  # (memory: crops are cut)
    timings["detect"] = elapsed_ms(start)
    log.info(
        "changes_detected",
        regions=len(detection.regions),
        changed_pixels=detection.changed_pixels,
        changed_percent=round(detection.changed_percent, 4),
        work_size=detection.work_size,
        alignment=detection.alignment.offset if detection.alignment else None,
        crops=len(crops),
        duration_ms=timings["detect"],
    )
    return detection, crops


def _masked(
    prepared: list[PreparedImage], config: ComparisonConfig, size_a: tuple[int, int]
) -> list[PreparedImage]:
    """Ignore regions get the same neutral fill in both prepared images (what comparators and
    the VL model see), mapped proportionally from A's native pixels."""
    if not config.ignore_regions:
        return prepared
    width, height = size_a
    boxes = [
        (r.x / width, r.y / height, (r.x + r.width) / width, (r.y + r.height) / height)
        for r in config.ignore_regions
    ]
    return [mask_boxes(image, boxes, config.image_quality) for image in prepared]


def _masked_crops(
    crops: list[RegionCrop], config: ComparisonConfig, detection: Detection
) -> list[RegionCrop]:
    """Ignore regions filled with the same NEUTRAL grey in both crops of each region, as
    ``_masked`` fills them in the prepared images: each box (A's native pixels) is mapped into
    A's cut box, and proportionally into B's native pixels (as ``_masked`` maps it) and from
    there into B's cut box; the fill is scaled with a crop that was scaled down to fit."""
    if not config.ignore_regions or not crops:
        return crops
    (width_a, height_a), (width_b, height_b) = detection.size_a, detection.size_b
    to_b = (width_b / width_a, height_b / height_a)
    boxes_a = [(r.x, r.y, r.x + r.width, r.y + r.height) for r in config.ignore_regions]
    boxes_b = [
        (x0 * to_b[0], y0 * to_b[1], x1 * to_b[0], y1 * to_b[1]) for x0, y0, x1, y1 in boxes_a
    ]
    return [
        dataclasses.replace(
            crop,
            a=_fill(crop.a, crop.box_a, boxes_a),
            b=_fill(crop.b, crop.box_b, boxes_b),
        )
        for crop in crops
    ]


@overload
def _fill(
    image: Image.Image, cut: Box | None, boxes: Sequence[tuple[float, float, float, float]]
) -> Image.Image: ...
@overload
def _fill(
    image: None, cut: Box | None, boxes: Sequence[tuple[float, float, float, float]]
) -> None: ...
def _fill(
    image: Image.Image | None, cut: Box | None, boxes: Sequence[tuple[float, float, float, float]]
) -> Image.Image | None:
    """A copy of ``image`` (which shows ``cut``) with the part of each box inside it filled
    (no image: a region that one image does not have)."""
    if image is None or cut is None:
        return image
    scale_x, scale_y = image.width / cut.width, image.height / cut.height
    shown: list[tuple[float, float, float, float]] = []
    for x0, y0, x1, y1 in boxes:
        # The part of the box inside the cut (empty when it lies outside), in the crop's pixels.
        left, top = max(x0, cut.x) - cut.x, max(y0, cut.y) - cut.y
        right, bottom = min(x1, cut.x + cut.width) - cut.x, min(y1, cut.y + cut.height) - cut.y
        shown.append((left * scale_x, top * scale_y, right * scale_x, bottom * scale_y))
    return fill_boxes(image, shown)


def _with_diff(
    result: ComparisonResult,
    prepared: list[PreparedImage],
    wanted: bool,
    crops: list[RegionCrop],
) -> PairOutcome:
    if not wanted or len(prepared) != 2:
        return PairOutcome(result)
    from handler.diff_image import render_diff

    try:
        return PairOutcome(result, render_diff(prepared[0], prepared[1], result, crops))
    except Exception as exc:  # the diff is an illustration: never lose the result over it
        get_logger(pair_id=result.pair_id).error(
            "diff_failed", error_type=type(exc).__name__, error=str(exc)
        )
        return PairOutcome(result)


def _with_legend(result: ComparisonResult, wanted: bool) -> PairOutcome:
    """Byte-identical inputs: a diff image of the legend alone (no pixels were decoded to
    show), so that an older diff image beside the result is replaced, never left stale."""
    if not wanted:
        return PairOutcome(result)
    from handler.diff_image import render_legend

    return PairOutcome(result, render_legend(result))


@dataclass(frozen=True)
class _Preparation:
    """Preparing one pair's inputs: from the process's cache when an input was prepared before,
    else from the copy detection resizes on the way (or, where it makes none, decoded on its
    own, and then kept in the cache). One ``image_prepared`` event per prepared input."""

    config: ComparisonConfig
    max_input_pixels: int
    cache: PreparedCache | None
    timings: dict[str, float]
    log: Any
    deadline: Deadline

    def start(
        self, source: ImageInput, data: bytes, info: InputInfo
    ) -> PreparedImage | InputHeader:
        """The cached prepared image, or the checked header of an input left to ``finished``."""
        started = time.perf_counter()
        info.bytes = len(data)
        info.sha256 = (source.digest and source.digest()) or hashlib.sha256(data).hexdigest()
        image = self.cache.get(self._key(info.sha256)) if self.cache is not None else None
        if image is not None:
            return self._record(source.name, info, image, "hit", started)
        header = read_header(data, self.max_input_pixels)
        info.format, info.original_size = header.format, header.size
        self._add_time(started)
        return header

    def wanted(self, item: PreparedImage | InputHeader) -> tuple[int, int] | None:
        """The size of the copy detection should make of a started input: its prepared size.

        None (prepared on its own) for a cached input; for CMYK (libvips converts it through
        an ICC profile, the prepared image has always been Pillow's plain conversion); and for
        a JPEG over ``STREAM_PIXELS``: Pillow decodes it in the DCT domain at 1/2 to 1/8 scale
        for a fraction of a full decode, where resizing it in detection's stream cost more
        (measured on a 100 MP pair: ~50 MB more peak memory, and no faster).
        """
        if isinstance(item, PreparedImage) or item.mode == "CMYK":
            return None
        width, height = item.size
        if item.format in ("JPEG", "MPO") and width * height > STREAM_PIXELS:
            return None
        return fitted_size(item.size, self.config.max_image_size)

    def finished(
        self,
        items: list[PreparedImage | InputHeader],
        sources: tuple[ImageInput, ImageInput],
        encoded: list[bytes],
        infos: list[InputInfo],
        detection: Detection,
    ) -> list[PreparedImage]:
        """Every input's prepared image, those only started finished from detection's copies
        (a failure names its input: one decoded on its own may fail where detection did not)."""
        prepared = []
        for which, item, source, data, info, shrunk in zip(
            "ab", items, sources, encoded, infos, detection.shrunk, strict=True
        ):
            if isinstance(item, PreparedImage):
                prepared.append(item)
                continue
            try:
                prepared.append(self._finish(source.name, data, info, item, shrunk))
            except PairError as exc:
                exc.details.setdefault("input", which)
                raise
        return prepared

    def _finish(
        self,
        name: str,
        data: bytes,
        info: InputInfo,
        header: InputHeader,
        shrunk: Image.Image | None,
    ) -> PreparedImage:
        started = time.perf_counter()
        config = self.config
        if shrunk is not None:
            image = prepare_shrunk(header, shrunk, config.max_image_size, config.image_quality)
        else:
            image = self._decoded(data, header)
        return self._record(name, info, image, "miss", started, from_detection=shrunk is not None)

    def _decoded(self, data: bytes, header: InputHeader) -> PreparedImage:
        """Prepared on its own (no copy from detection), within the decode budget the pair
        holds; a libvips shrink is killed once the deadline passes."""
        config = self.config
        try:
            image = prepare(
                data,
                config.max_image_size,
                config.image_quality,
                max_pixels=self.max_input_pixels,
                expired=self.deadline.expired,
            )
        except ComparisonTimeout as exc:
            raise self.deadline.timeout(exc.message) from None
        finally:
            # The decoder's buffers are free now, but glibc would keep them for this process.
            release_after(4 * header.size[0] * header.size[1])
        # A Pillow decode cannot be interrupted: a pair that ran past its deadline stops here.
        self.deadline.check()
        return image

    def _key(self, sha256: str) -> CacheKey:
        config = self.config
        return cache_key(sha256, config.max_image_size, config.image_quality, self.max_input_pixels)

    def _add_time(self, started: float) -> float:
        elapsed = elapsed_ms(started)
        self.timings["prepare"] = round(self.timings.get("prepare", 0.0) + elapsed, 2)
        return elapsed

    def _record(
        self,
        name: str,
        info: InputInfo,
        image: PreparedImage,
        cached: str,
        started: float,
        *,
        from_detection: bool = False,
    ) -> PreparedImage:
        # A copy detection made on the way cost no decode of its own: not worth its memory.
        if cached == "miss" and not from_detection and self.cache is not None and info.sha256:
            self.cache.put(self._key(info.sha256), image)
        info.format = image.format
        info.original_size = image.original_size
        info.processed_size = image.size
        self.log.info(
            "image_prepared",
            input=name,
            bytes=info.bytes,
            format=image.format,
            original_size=image.original_size,
            processed_size=image.size,
            jpeg_bytes=len(image.jpeg),
            cache="off" if self.cache is None else cached,
            from_detection=from_detection,
            duration_ms=self._add_time(started),
        )
        return image
