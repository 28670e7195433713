"""Resized copies of B made from A's where the two differ in a few rows only.

The everyday changed pair (a screenshot with one line of text changed) is the same picture
above and below a band of rows. Every resize of B (the prepared copy detection makes, the
metrics comparator's working image) then equals A's resize except in the output rows whose
filter reaches into that band: those few rows are resized from B, the rest taken from A's
copy, pixel for pixel what resizing all of B gives (the tests compare both). A resize is
separable and each output row is computed from the input rows under its kernel alone, so
nothing else can differ.

For Pillow this holds only where the output rows can be asked for by a ``box`` whose float
arithmetic is exact (a vertical scale with a short binary fraction, e.g. 1024 x 640 to
256 x 160) and the image is made smaller; other sizes are resized whole, as before, except
for the diff image's overview (``exact=False``: a picture for people, where a level of
rounding in a pixel is invisible).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

#: The widest kernel's reach, in rows of the side it is wider on (LANCZOS: 3 input rows
#: where it enlarges, 3 output rows where it shrinks).
KERNEL_REACH = 3
#: Output rows added above and below the rows a change reaches, beyond the kernel's own
#: reach (a box reduction before it: one more): rounding, with room.
MARGIN = 5
#: Beyond this share of the output rows, B is resized whole (the splice would save little).
MAX_SHARE = 0.5
#: A vertical scale is exact when it is a multiple of 2**-SCALE_BITS.
SCALE_BITS = 8


def differing_rows(a: NDArray[np.generic], b: NDArray[np.generic]) -> tuple[int, int] | None:
    """The first and one past the last row in which two images of one shape (rows, columns,
    channels) differ, byte for byte; None where they are the same."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    flat_a, flat_b = _words(a), _words(b)
    rows = np.flatnonzero((flat_a != flat_b).any(axis=1))
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1


def output_rows(rows: tuple[int, int], height: int, out_height: int) -> tuple[int, int] | None:
    """The output rows a resize from ``height`` to ``out_height`` rows computes from input
    ``rows`` (with MARGIN), or None where they are more than MAX_SHARE of them."""
    scale = height / out_height
    # Enlarging, the kernel spans KERNEL_REACH input rows: 1 / scale output rows each.
    reach = math.ceil(KERNEL_REACH * max(1.0, 1.0 / scale)) + MARGIN
    first = max(0, math.floor(rows[0] / scale) - reach)
    last = min(out_height, math.ceil(rows[1] / scale) + reach)
    if last - first > MAX_SHARE * out_height:
        return None
    return first, last


def resized_like(
    a: Image.Image,
    a_resized: Image.Image,
    b: Image.Image,
    resample: Image.Resampling,
    *,
    exact: bool = True,
) -> Image.Image:
    """``b.resize(a_resized.size, resample)``, made from ``a_resized`` (``a`` resized so)
    where ``a`` and ``b`` (same size and mode) differ in a few rows only.

    ``exact=False`` (an illustration, not a measurement) splices at any scale: where the
    scale is not a short binary fraction the recomputed rows' kernel centres may be rounded
    differently from the whole resize's, a level of difference in a rare pixel of them."""
    size = a_resized.size
    scale = b.height / size[1]
    if a.size != b.size or a.mode != b.mode or scale < 1.0:
        # (Enlarging, Pillow's resize of a box differs from its resize of the whole, measured.)
        return b.resize(size, resample)
    if exact and not _exact(b.height, size[1]):
        return b.resize(size, resample)
    changed = differing_rows(np.asarray(a), np.asarray(b))
    if changed is None:
        return a_resized.copy()
    span = output_rows(changed, b.height, size[1])
    if span is None:
        return b.resize(size, resample)
    first, last = span
    # Scale and kernel centres of these rows are the whole resize's, bit for bit (_exact).
    box = (0.0, first * scale, float(b.width), last * scale)
    part = b.resize((size[0], last - first), resample, box=box)
    out = a_resized.copy()
    out.paste(part, (0, first))
    return out


def _words(image: NDArray[np.generic]) -> NDArray[np.generic]:
    """One row per image row, in the widest words its bytes fill (8 bytes compared at once
    instead of one: the comparison costs a fraction of a millisecond a megapixel)."""
    flat = np.ascontiguousarray(image).reshape(len(image), -1).view(np.uint8)
    for word in (np.uint64, np.uint32):
        if flat.shape[1] % np.dtype(word).itemsize == 0:
            return flat.view(word)
    return flat


def _exact(height: int, out_height: int) -> bool:
    """Is ``height / out_height`` a multiple of 2**-SCALE_BITS (so that every kernel centre,
    ``top + (row + 0.5) * scale``, is computed exactly, whatever the order of operations)?"""
    return (height << SCALE_BITS) % out_height == 0
