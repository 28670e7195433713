"""One pair, end to end: load each input, prepare it (one at a time), compare, build the result.

Every ``PairError`` becomes a result with ``status`` error/timeout. What still raises is not
about the pair itself and is worth a retry: storage trouble from ``ImageInput.load`` (an object
replaced mid-read, the network) and programming errors.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handler.compare.base import Comparator
from handler.config import ComparisonConfig
from handler.errors import PairError
from handler.images import PreparedImage, prepare
from handler.logs import elapsed_ms, get_logger
from handler.result import ComparatorInfo, ComparisonResult, ErrorInfo, InputInfo


@dataclass(frozen=True)
class ImageInput:
    """A named input whose bytes are fetched only when the pipeline gets to it."""

    name: str
    load: Callable[[], bytes]
    etag: str | None = None


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
) -> PairOutcome:
    """Compare ``a`` with ``b``; failures come back as error/timeout results, never raised.

    With ``diff_image`` the outcome carries a PNG (``handler.diff_image``) whenever both images
    were prepared, failed comparisons included; the caller names and writes it.
    """
    log = get_logger(pair_id=pair_id)
    started = time.perf_counter()
    infos = [InputInfo(name=a.name, etag=a.etag), InputInfo(name=b.name, etag=b.etag)]
    timings: dict[str, float] = {}
    prepared: list[PreparedImage] = []
    try:
        for source, info in zip((a, b), infos, strict=True):
            prepared.append(_prepare_one(source, info, config, max_input_pixels, timings, log))
        compare_start = time.perf_counter()
        outcome = comparator.compare(prepared[0], prepared[1], config)
        timings["compare"] = elapsed_ms(compare_start)
    except PairError as exc:
        failed = "a" if len(prepared) == 0 else "b" if len(prepared) == 1 else None
        if "compare" not in timings and len(prepared) == 2:
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
            duration_ms=timings["total"],
        )
        return _with_diff(result, prepared, diff_image)
    timings["total"] = elapsed_ms(started)
    log.info(
        "pair_compared",
        comparator=comparator.info.name,
        similarity=round(outcome.similarity, 4),
        is_similar=outcome.is_similar,
        regions=len(outcome.changed_regions),
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
    )
    return _with_diff(result, prepared, diff_image)


def _with_diff(
    result: ComparisonResult, prepared: list[PreparedImage], wanted: bool
) -> PairOutcome:
    if not wanted or len(prepared) != 2:
        return PairOutcome(result)
    from handler.diff_image import render_diff

    try:
        return PairOutcome(result, render_diff(prepared[0], prepared[1], result))
    except Exception as exc:  # the diff is an illustration: never lose the result over it
        get_logger(pair_id=result.pair_id).error(
            "diff_failed", error_type=type(exc).__name__, error=str(exc)
        )
        return PairOutcome(result)


def _prepare_one(
    source: ImageInput,
    info: InputInfo,
    config: ComparisonConfig,
    max_input_pixels: int,
    timings: dict[str, float],
    log: Any,
) -> PreparedImage:
    """Load, hash and prepare one input; its raw bytes are dropped before the next one loads."""
    start = time.perf_counter()
    data = source.load()
    info.bytes = len(data)
    info.sha256 = hashlib.sha256(data).hexdigest()
    image = prepare(data, config.max_image_size, config.image_quality, max_pixels=max_input_pixels)
    del data
    info.format = image.format
    info.original_size = image.original_size
    info.processed_size = image.size
    elapsed = elapsed_ms(start)
    timings["prepare"] = round(timings.get("prepare", 0.0) + elapsed, 2)
    log.info(
        "image_prepared",
        input=source.name,
        bytes=info.bytes,
        format=image.format,
        original_size=image.original_size,
        processed_size=image.size,
        jpeg_bytes=len(image.jpeg),
        duration_ms=elapsed,
    )
    return image


def failure_result(
    pair_id: str,
    error: PairError,
    inputs: list[InputInfo],
    config: ComparisonConfig,
    comparator: ComparatorInfo,
    *,
    timings: dict[str, float] | None = None,
    failed_input: str | None = None,
) -> ComparisonResult:
    """An error/timeout result; also used by the watchers for pair-level problems."""
    vl_details = error.details.get("vl")
    return ComparisonResult(
        pair_id=pair_id,
        status="timeout" if error.status == "timeout" else "error",
        summary=f"Comparison failed: {error.message}",
        comparator=comparator,
        inputs=inputs,
        config=config,
        timings_ms=timings or {"total": 0.0},
        error=ErrorInfo(
            type=error.type,
            message=error.message,
            input="a" if failed_input == "a" else "b" if failed_input == "b" else None,
        ),
        vl=vl_details,
        metrics=error.details.get("metrics", {}),
    )
