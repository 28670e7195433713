"""Native-resolution crops of the largest changed regions, for people (the diff image) and
models (the VL comparator): each at most ``CROP_SIDE`` pixels square, cut from the pixels
detection kept (``Detection.pixels``), else in one more streamed pass over the input that
stops below the lowest crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from handler.deadline import Deadline
from handler.decode import fetch_rows, first_line, normalised
from handler.detect import Detection
from handler.errors import InvalidImage
from handler.regions import BLOCK
from handler.result import Box
from handler.vips import pyvips

__all__ = ["CROP_SIDE", "MAX_CROPS", "RegionCrop", "cut_crops"]

#: Crops of the largest regions: how many, their longest side, and context around a region.
MAX_CROPS = 4
CROP_SIDE = 448
CROP_MARGIN = 24


@dataclass(frozen=True)
class RegionCrop:
    """Native-resolution views of one region in A and in B (for people and models): an added
    region has no view in A, a removed one none in B.

    ``box_a``/``box_b`` are the cut boxes (the region plus some context) in each image's native
    pixels; a box larger than the crop side is scaled down to fit it, so every crop is bounded.
    """

    region: int
    box_a: Box | None
    box_b: Box | None
    a: Image.Image | None
    b: Image.Image | None


def cut_crops(
    data_a: bytes,
    data_b: bytes,
    detection: Detection,
    *,
    max_pixels: int,
    count: int = MAX_CROPS,
    side: int = CROP_SIDE,
    deadline: Deadline | None = None,
) -> list[RegionCrop]:
    """Crops of the ``count`` largest regions, each at most ``side`` x ``side`` pixels, each
    from the region's own place in each image where it has one.

    Cut from the pixels detection kept (``Detection.pixels``), else in one more streamed pass
    over the input, stopping below the lowest crop (or with ``ComparisonTimeout`` once
    ``deadline`` has passed, checked once per strip).
    """
    indexes = range(min(count, len(detection.regions)))
    if not indexes:
        return []
    regions = [detection.regions[i] for i in indexes]
    boxes_a = [_crop_box(r.a, detection.size_a, side) if r.a else None for r in regions]
    boxes_b = [_crop_box(r.b, detection.size_b, side) if r.b else None for r in regions]
    kept_a, kept_b = detection.pixels
    source_a = data_a if kept_a is None else kept_a
    source_b = data_b if kept_b is None else kept_b
    try:
        crops_a = _cut_some(source_a, detection.size_a, boxes_a, side, max_pixels, deadline)
        crops_b = _cut_some(source_b, detection.size_b, boxes_b, side, max_pixels, deadline)
    except pyvips.Error as exc:
        raise InvalidImage(f"cannot decode the image: {first_line(exc)}") from exc
    return [
        RegionCrop(region=i, box_a=boxes_a[i], box_b=boxes_b[i], a=crops_a[i], b=crops_b[i])
        for i in indexes
    ]


def _crop_box(region: Box, size: tuple[int, int], side: int) -> Box:
    """``region`` grown by CROP_MARGIN, and to at least ``side`` pixels where the image allows."""
    width = min(size[0], max(region.width + 2 * CROP_MARGIN, side))
    height = min(size[1], max(region.height + 2 * CROP_MARGIN, side))
    left = min(max(0, region.x + region.width // 2 - width // 2), size[0] - width)
    top = min(max(0, region.y + region.height // 2 - height // 2), size[1] - height)
    return Box(x=left, y=top, width=width, height=height)


def _cut_some(
    source: bytes | NDArray[np.uint8],
    size: tuple[int, int],
    boxes: list[Box | None],
    side: int,
    max_pixels: int,
    deadline: Deadline | None,
) -> list[Image.Image | None]:
    """``_cut`` for the boxes that are there (no pass at all when none is)."""
    present = [box for box in boxes if box is not None]
    if not present:
        return [None for _ in boxes]
    cut = iter(_cut(source, size, present, side, max_pixels, deadline))
    return [next(cut) if box is not None else None for box in boxes]


def _cut(
    source: bytes | NDArray[np.uint8],
    size: tuple[int, int],
    boxes: list[Box],
    side: int,
    max_pixels: int,
    deadline: Deadline | None,
) -> list[Image.Image]:
    """Fill every box from ``source``: the native pixels detection kept (each box sliced at
    once), or one top-to-bottom pass over the encoded input; rows and columns of a box much
    larger than the crop are skipped while reading (to at most 2 x ``side``), then it is
    resized."""
    steps = [
        max(1, min(box.width, box.height) // (2 * side), max(box.width, box.height) // (4 * side))
        for box in boxes
    ]
    if isinstance(source, bytes):
        parts = _cut_streamed(source, size, boxes, steps, max_pixels, deadline)
    else:
        if deadline is not None:
            deadline.check()
        parts = [
            [source[box.y : box.y + box.height : step, box.x : box.x + box.width : step, :3]]
            for box, step in zip(boxes, steps, strict=True)
        ]
    crops = []
    for pieces in parts:
        crop = Image.fromarray(np.concatenate(pieces, axis=0), "RGB")
        if max(crop.size) > side:
            crop.thumbnail((side, side), Image.Resampling.LANCZOS)
        crops.append(crop)
    return crops


def _cut_streamed(
    data: bytes,
    size: tuple[int, int],
    boxes: list[Box],
    steps: list[int],
    max_pixels: int,
    deadline: Deadline | None,
) -> list[list[NDArray[np.uint8]]]:
    """Each box's rows (on its own grid of ``steps``) from one top-to-bottom streamed pass,
    stopping below the lowest box."""
    image, _ = normalised(data, size, size, max_pixels)
    parts: list[list[NDArray[np.uint8]]] = [[] for _ in boxes]
    bottom = max(box.y + box.height for box in boxes)
    region = pyvips.Region.new(image)
    rows = BLOCK
    for top in range(min(box.y for box in boxes), bottom, rows):
        last = min(bottom, top + rows)
        needed = [i for i, box in enumerate(boxes) if box.y < last and top < box.y + box.height]
        if not needed:
            continue
        if deadline is not None:
            deadline.check()
        strip = fetch_rows(region, top, last, size[0])
        for i in needed:
            box, step = boxes[i], steps[i]
            first = max(top, box.y)
            first += (-(first - box.y)) % step  # keep the rows on the box's own grid
            end = min(last, box.y + box.height)
            if first < end:
                parts[i].append(
                    strip[
                        first - top : end - top : step, box.x : box.x + box.width : step, :3
                    ].copy()
                )
    return parts
