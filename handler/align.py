"""Alignment of image B to image A: which rows of A are which rows of B, and by how much the
content moved sideways.

The most common real changes to a screenshot move everything below them (a banner inserted, a
paragraph removed or grown by a line), and a photo's camera is never exactly where it was.
Comparing such pairs pixel for pixel reports the whole image as changed. This module finds the
alignment from compact profiles that ``handler.scan`` collects while it streams the pixels
(so no image is ever held):

- a **row signature** per pixel row: its grey values averaged into ``SIGNATURE_BLOCKS`` column
  blocks (64 bytes a row: 700 KB for a 10,000-row page);
- a **column profile**: per pixel column, its grey values summed over each of
  ``PROFILE_BANDS`` horizontal bands of rows.

From them:

1. the horizontal offset ``dx`` (a margin that changed, a camera that moved): phase correlation
   of the column profiles, at native resolution (one value per pixel column);
2. the rows: a sequence alignment of A's row signatures with B's (shifted by ``dx``), where two
   rows match when their signatures agree within ``ROW_TOLERANCE`` (so JPEG noise and
   anti-aliasing do not break a match, where exact row hashes would). The candidate vertical
   offsets ("diagonals") come from rows whose signature is unique in both images and from the
   correlation of the row signatures; a dynamic programme then chooses, row by row, the
   diagonal each row of A lies on, paying one unit per unmatched row and ``GAP_COST`` per
   inserted or removed band. The result is a list of bands: ``matched`` (A rows and the B rows
   they are, at a vertical shift), ``inserted`` (B only) and ``removed`` (A only).

Columns are aligned with one global offset, not in bands: a column inserted into part of a page
(a sidebar that grows) moves only what is beside it, so no whole-image column alignment
describes it, and a per-band column alignment would need column profiles per band of rows,
which the streamed pass cannot know before the row alignment exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

#: Column blocks per row signature.
SIGNATURE_BLOCKS = 64
#: Horizontal bands of rows per column profile.
PROFILE_BANDS = 16
#: Column profiles sum every ROW_SAMPLE-th row.
ROW_SAMPLE = 4
#: Two rows match when no block of their signatures differs by more than this (0..255 grey).
ROW_TOLERANCE = 6
#: Cost of starting an inserted or removed band, in unmatched rows.
GAP_COST = 12
#: Most candidate diagonals the row alignment weighs.
MAX_DIAGONALS = 8
#: A diagonal needs this share of the uniquely matched rows to be a candidate ...
MIN_DIAGONAL_SHARE = 0.02
#: ... and with fewer such rows than this in all, the row signatures' correlation peaks are
#: candidates too (a photo's rows are rarely unique after re-encoding; a text page's are,
#: and its correlation has a peak at every multiple of the line height).
MIN_VOTES = 32
#: The horizontal offset searched, as a share of the narrower width (and at most MAX_SHIFT_X).
MAX_SHIFT_SHARE = 0.25
MAX_SHIFT_X = 512
#: The vertical offset the phase correlation of the rows looks for (a moved picture; bands
#: inserted or removed are found by the row alignment, at any height).
MAX_SHIFT_Y = 512
#: An offset is believed when its (whitened, 0..1) correlation peak, with its neighbours,
#: is at least MIN_PEAK (two different pictures: up to ~0.45; a moved one: 1.0, 0.6 for a very
#: smooth picture) and this many times the next best one away from it.
MIN_PEAK = 0.6
MIN_PEAK_RATIO = 1.5
#: ... or, for the vertical offset, when the rows at the best offset differ by at most this
#: share of what they differ in place.
VERIFIED_GAP = 0.7

#: Samples transformed at once by the phase correlation (a batch of profiles costs one call
#: instead of one each; bounded, as a 10,000-pixel profile's transforms are MB each).
_BATCH_SAMPLES = 1 << 16

BandKind = Literal["matched", "inserted", "removed"]
_INF = np.float64(1e18)


@dataclass(frozen=True)
class Band:
    """Rows ``a`` of A (``[top, bottom)``) and rows ``b`` of B; one of them is None for an
    inserted (B only) or removed (A only) band. A matched band's rows are the same content,
    moved down by ``shift`` (``b[0] - a[0]``, negative: up)."""

    kind: BandKind
    a: tuple[int, int] | None
    b: tuple[int, int] | None

    @property
    def shift(self) -> int:
        if self.a is None or self.b is None:
            return 0
        return self.b[0] - self.a[0]

    @property
    def height(self) -> int:
        rows = self.a if self.a is not None else self.b
        assert rows is not None
        return rows[1] - rows[0]


@dataclass(frozen=True)
class Alignment:
    """B's rows and columns in terms of A's: ``dx`` for every row, bands top to bottom (in A
    and in B). The identity (no shift, every row matched) means no alignment was needed."""

    dx: int
    bands: tuple[Band, ...]
    size_a: tuple[int, int]
    size_b: tuple[int, int]

    @property
    def dy(self) -> int:
        """The vertical shift of the largest matched band (0 when none matched)."""
        matched = [band for band in self.bands if band.kind == "matched"]
        return max(matched, key=lambda band: band.height).shift if matched else 0

    @property
    def identity(self) -> bool:
        return self.dx == 0 and all(
            band.kind == "matched" and band.shift == 0 for band in self.bands
        )


class Profiles:
    """One image's row signatures and column profiles, filled strip by strip as it streams."""

    def __init__(self, width: int, height: int, signed: int | None = None) -> None:
        """``signed``: the columns the row signatures cover, from the left (default: all);
        two images of different widths sign the columns both have, so that a block means
        the same pixels in both."""
        self.width, self.height = width, height
        self.signed = min(width, signed or width)
        half = (self.signed + 1) // 2  # (the signatures read every other pixel)
        blocks = min(SIGNATURE_BLOCKS, half)
        self._half = half
        self._half_edges = (np.arange(blocks) * half) // blocks
        self._half_widths = np.diff(np.append(self._half_edges, half)).astype(np.float32)
        self.rows = np.zeros((height, blocks), np.uint8)
        bands = min(PROFILE_BANDS, height)
        self._bands = bands
        self.columns = np.zeros((bands, width), np.uint32)

    def add(self, grey: NDArray[np.uint8], top: int) -> NDArray[np.uint32]:
        """Rows ``top:top + len(grey)`` of the image, one grey byte per pixel; returns their
        column sums (for ``repeat``). Both are estimates from a sample, which halves their
        cost: every other pixel of a row, every ROW_SAMPLE-th row of a column."""
        sampled_row = grey[:, : 2 * self._half : 2]
        sums = np.add.reduceat(sampled_row, self._half_edges, axis=1, dtype=np.uint32)
        self.rows[top : top + len(grey)] = sums / self._half_widths + 0.5
        first = (-top) % ROW_SAMPLE
        sampled = grey[first::ROW_SAMPLE]
        columns: NDArray[np.uint32] = sampled.sum(axis=0, dtype=np.uint32)
        self._to_bands(columns, sampled, top + first)
        return columns

    def _to_bands(
        self, columns: NDArray[np.uint32], sampled: NDArray[np.uint8], first: int
    ) -> None:
        """Add the sampled rows (image rows ``first``, ``first + ROW_SAMPLE``, ...) to their
        bands: a strip can cross a band's edge (a wide strip on a short image, many)."""
        if not len(sampled):
            return
        last = first + ROW_SAMPLE * (len(sampled) - 1)
        if self._band(first) == self._band(last):
            self.columns[self._band(first)] += columns
            return
        bands = (np.arange(first, last + 1, ROW_SAMPLE) * self._bands) // self.height
        edges = np.flatnonzero(np.diff(bands)) + 1
        starts = np.concatenate([[0], edges])
        sums = np.add.reduceat(sampled, starts, axis=0, dtype=np.uint32)
        np.add.at(self.columns, np.minimum(bands[starts], self._bands - 1), sums)

    def repeat(
        self, other: Profiles, grey: NDArray[np.uint8], top: int, columns: NDArray[np.uint32]
    ) -> None:
        """Rows ``top:top + len(grey)`` are pixel for pixel ``other``'s (same width): its
        signatures are copied and ``columns`` (what ``other.add`` returned for ``grey``)
        added, nothing computed again."""
        self.rows[top : top + len(grey)] = other.rows[top : top + len(grey)]
        first = (-top) % ROW_SAMPLE
        self._to_bands(columns, grey[first::ROW_SAMPLE], top + first)

    def _band(self, top: int) -> int:
        return min(self._bands - 1, (top * self._bands) // self.height)


def align(a: Profiles, b: Profiles) -> Alignment | None:
    """The alignment of B to A, or None when none explains the pair better than comparing
    pixel for pixel (or nothing moved). Cheap: a few passes over the signatures."""
    dx = horizontal_offset(a.columns, b.columns)
    rows_b = shifted_signatures(b.rows, dx, b.signed)
    dy = vertical_offset(a.rows, rows_b, moved=dx != 0)
    if dx:
        # Moved sideways: the whole picture (a camera, a margin). Rows shifted sideways match
        # only roughly (a photo's texture defeats the row tolerance), so no bands: the picture
        # moved by (dx, dy) as one.
        bands = translated(dy, a.height, b.height)
    else:
        diagonals = candidate_diagonals(a.rows, rows_b)
        if dy not in diagonals:
            diagonals = sorted([*diagonals, dy][: MAX_DIAGONALS + 1])
        if diagonals == [0] and a.height == b.height:  # nothing moved up or down
            bands = [_matched(0, a.height, 0)]
        else:
            bands = align_rows(a.rows, rows_b, diagonals)
        if dy and all(band.kind != "matched" or band.shift == 0 for band in bands):
            bands = translated(dy, a.height, b.height)  # (rows that matched nowhere else)
    alignment = Alignment(dx, tuple(bands), (a.width, a.height), (b.width, b.height))
    if alignment.identity and (a.width, a.height) == (b.width, b.height):
        return None
    return alignment


def moved_rows(
    a: Profiles,
    b: Profiles,
    span: tuple[int, int],
    read: tuple[int, int],
    hints: list[int],
    search: bool,
) -> int | None:
    """While the rows stream past: are rows ``span`` (read in both images, at the same place)
    the other image's rows at another height, among the rows read so far (``read``: A's and
    B's)? The offset d (B's row = A's row + d) where they are, or None.

    Rows that match in place did not move (``rows_in_place``). Tried: ``hints`` (offsets found
    for earlier strips), then, with ``search``, every offset up to SEARCH_ROWS. Flat rows (blank
    lines match anything) say nothing; most of a strip's other rows must match at one offset,
    A's rows found in B or B's in A.
    """
    if a.rows.shape[1] != b.rows.shape[1] or span[1] > min(a.height, b.height):
        return None
    if rows_in_place(a, b, span):
        return None
    for offset in hints:
        if _offset_fits(a, b, span, read, offset):
            return offset
    return _search_offset(a, b, span, read) if search else None


def rows_in_place(a: Profiles, b: Profiles, span: tuple[int, int]) -> bool:
    """Do most informative rows of ``span`` match where they are (noise, a change within the
    rows: not a move; a smooth picture's rows also match their neighbours, which says
    nothing)?"""
    if a.rows.shape[1] != b.rows.shape[1] or span[1] > min(a.height, b.height):
        return False
    own_a, own_b = a.rows[span[0] : span[1]], b.rows[span[0] : span[1]]
    informative = _informative(own_a) | _informative(own_b)
    if not informative.any():
        return True
    return bool(_matching(own_a, own_b)[informative].mean() >= 0.5)


#: How far ``moved_rows`` looks for a strip's content (rows above and below, in either image).
SEARCH_ROWS = 1024
#: Share of a strip's informative rows that must match at one offset.
MOVED_SHARE = 0.8


def _informative(rows: NDArray[np.uint8]) -> NDArray[np.bool_]:
    return np.asarray(rows.max(axis=1) - rows.min(axis=1) > 2)


def _matching(rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8]) -> NDArray[np.bool_]:
    gap = np.abs(rows_a.astype(np.int16) - rows_b.astype(np.int16)).max(axis=-1)
    return np.asarray(gap <= ROW_TOLERANCE)


def _offset_fits(
    a: Profiles, b: Profiles, span: tuple[int, int], read: tuple[int, int], offset: int
) -> bool:
    """Rows ``span`` of A are B's rows ``offset`` further down, or B's rows are A's
    ``offset`` further up; only rows read so far are looked at."""
    if offset == 0:
        return False
    top, bottom = span
    for here, there, shift, done in ((a, b, offset, read[1]), (b, a, -offset, read[0])):
        if top + shift < 0 or bottom + shift > done:
            continue
        own = here.rows[top:bottom]
        informative = _informative(own)
        if informative.sum() < min(4, bottom - top):
            continue
        fits = _matching(own, there.rows[top + shift : bottom + shift])
        if fits[informative].mean() >= MOVED_SHARE:
            return True
    return False


def _search_offset(
    a: Profiles, b: Profiles, span: tuple[int, int], read: tuple[int, int]
) -> int | None:
    """The offset (up to SEARCH_ROWS either way) at which most informative rows of one
    image's strip match the other image's rows read so far."""
    top, bottom = span
    count = bottom - top
    best: tuple[float, int] = (0.0, 0)
    for here, there, sign, done in ((a, b, 1, read[1]), (b, a, -1, read[0])):
        own = here.rows[top:bottom]
        informative = _informative(own)
        if informative.sum() < min(4, count):
            continue
        first, last = max(0, top - SEARCH_ROWS), min(done, bottom + SEARCH_ROWS)
        if last - first < count:
            continue
        around = there.rows[first:last].astype(np.int16)
        windows = np.lib.stride_tricks.sliding_window_view(around, (count, around.shape[1]))[:, 0]
        # (A few hundred offsets at a time: all at once, a 2,000-row search held ~4 MB.)
        share = np.concatenate(
            [
                (np.abs(part - own.astype(np.int16)).max(axis=-1) <= ROW_TOLERANCE)[
                    :, informative
                ].mean(axis=1)
                for part in np.array_split(windows, max(1, len(windows) // 256))
            ]
        )
        if 0 <= top - first < len(share):
            share[top - first] = 0.0  # in place is not moved
        k = int(np.argmax(share))
        if share[k] > best[0]:
            best = (float(share[k]), sign * (first + k - top))
    return best[1] if best[0] >= MOVED_SHARE and best[1] != 0 else None


# -- columns ---------------------------------------------------------------------------------


def horizontal_offset(columns_a: NDArray[np.uint32], columns_b: NDArray[np.uint32]) -> int:
    """How far B's content lies to the right of A's (negative: left), from the phase
    correlation of the column profiles; 0 unless one offset clearly stands out."""
    width_a, width_b = columns_a.shape[1], columns_b.shape[1]
    limit = min(MAX_SHIFT_X, int(min(width_a, width_b) * MAX_SHIFT_SHARE))
    if limit < 1:
        return 0
    bands = min(columns_a.shape[0], columns_b.shape[0])
    scores = _correlation(_banded(columns_a, bands), _banded(columns_b, bands), limit)
    return _peak(scores, limit)


def vertical_offset(
    rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8], *, moved: bool = False
) -> int:
    """How far B's content lies below A's (negative: above), from the phase correlation of the
    row signatures (groups of column blocks as signals): the whole picture moved, as when a
    camera moved. 0 unless one offset clearly stands out, or (a very smooth picture spreads
    the peak) the best one makes the rows agree clearly better than they do in place. With
    ``moved`` (the picture moved sideways, for sure) the best offset is taken when the rows
    agree better there than in place: the aligned pass that follows is kept only if it
    explains the pair better."""
    height_a, height_b = len(rows_a), len(rows_b)
    limit = min(MAX_SHIFT_Y, int(min(height_a, height_b) * MAX_SHIFT_SHARE))
    blocks = min(rows_a.shape[1], rows_b.shape[1])
    if limit < 1 or blocks < 1:
        return 0
    # Groups of blocks as channels: as good an answer, a quarter of the transforms.
    pa = _coarse_channels(rows_a[:, :blocks], 16)
    pb = _coarse_channels(rows_b[:, :blocks], 16)
    scores = _correlation(list(pa), list(pb), limit)
    found = _peak(scores, limit)
    if found:
        return found
    best = int(np.argmax(np.convolve(scores, np.ones(3), mode="same"))) - limit
    if moved:  # whichever makes the rows agree better: there, or in place (a text page's
        # lines repeat: its best peak may be a line away)
        return best if _row_gap(rows_a, rows_b, best) < _row_gap(rows_a, rows_b, 0) else 0
    if best and _row_gap(rows_a, rows_b, best) <= VERIFIED_GAP * _row_gap(rows_a, rows_b, 0):
        return best
    return 0


def _row_gap(rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8], offset: int) -> float:
    """The mean difference of A's row signatures and B's ``offset`` rows further down."""
    top, bottom = max(0, -offset), min(len(rows_a), len(rows_b) - offset)
    if bottom - top < 1:
        return float("inf")
    blocks = min(rows_a.shape[1], rows_b.shape[1])
    own = rows_a[top:bottom, :blocks].astype(np.int16)
    other = rows_b[top + offset : bottom + offset, :blocks].astype(np.int16)
    return float(np.abs(own - other).mean())


def translated(dy: int, height_a: int, height_b: int) -> list[Band]:
    """Bands of a picture moved down by ``dy`` (up, negative): the rows both have matched, the
    rest inserted into B or removed from A at the edges."""
    top, bottom = max(0, -dy), min(height_a, height_b - dy)
    if top >= bottom:
        return [Band("removed", (0, height_a), None), Band("inserted", None, (0, height_b))]
    bands = []
    if top:
        bands.append(Band("removed", (0, top), None))
    if top + dy:
        bands.append(Band("inserted", None, (0, top + dy)))
    bands.append(_matched(top, bottom, dy))
    if bottom < height_a:
        bands.append(Band("removed", (bottom, height_a), None))
    if bottom + dy < height_b:
        bands.append(Band("inserted", None, (bottom + dy, height_b)))
    return bands


def _banded(columns: NDArray[np.uint32], bands: int) -> list[NDArray[np.uint32]]:
    """``columns``' rows summed into ``bands`` rows (one view each where nothing is summed)."""
    if columns.shape[0] == bands:
        return list(columns)
    groups = np.array_split(np.arange(columns.shape[0]), bands)
    return [columns[group].sum(axis=0, dtype=np.uint64).astype(np.uint32) for group in groups]


def _normalised(signal: NDArray[np.number]) -> NDArray[np.float64]:
    """A profile minus its mean, over its own scale (a flat one stays zero)."""
    centred = signal.astype(np.float64)
    centred -= centred.mean()
    scale = float(np.sqrt((centred**2).sum()))
    return centred / scale if scale > 0 else centred


def _correlation(
    a: Sequence[NDArray[np.number]], b: Sequence[NDArray[np.number]], limit: int
) -> NDArray[np.float64]:
    """Phase correlation of ``b``'s profiles against ``a``'s (each normalised, tapered at both
    ends), summed over the profiles, for shifts ``-limit..limit`` (index ``limit`` = shift 0):
    the spectrum's magnitudes are whitened so every frequency votes alike (a sharp peak for a
    true shift). Short profiles (an everyday screenshot's) are transformed all at once, long
    ones one at a time: a 10,000-pixel profile's transforms stay a few MB."""
    length_a, length_b = len(a[0]), len(b[0])
    size = 1 << int(np.ceil(np.log2(length_a + length_b + 1)))
    # Tapered: the signals' edges would otherwise agree at shift 0 by themselves.
    taper_a, taper_b = np.hanning(length_a), np.hanning(length_b)
    summed = np.zeros(size // 2 + 1, np.complex128)
    step = max(1, _BATCH_SAMPLES // size)
    for start in range(0, len(a), step):
        rows_a = [_normalised(row) * taper_a for row in a[start : start + step]]
        rows_b = [_normalised(row) * taper_b for row in b[start : start + step]]
        spectra_a = np.fft.rfft(np.stack(rows_a), size, axis=-1)
        products = np.conj(spectra_a) * np.fft.rfft(np.stack(rows_b), size, axis=-1)
        for product in products:  # (one at a time, in order: the sum of the rows as before)
            summed += product
    magnitude = np.abs(summed)
    whitened = np.divide(summed, magnitude, out=np.zeros_like(summed), where=magnitude > 1e-9)
    scores = np.fft.irfft(whitened, size)
    return np.concatenate([scores[size - limit :], scores[: limit + 1]])


def _peak(scores: NDArray[np.float64], limit: int) -> int:
    """The shift of the highest score when its peak, with its two neighbours (a smooth picture
    spreads a shift's energy over a few places), reaches MIN_PEAK and beats every such sum
    more than three places away by MIN_PEAK_RATIO (a flat or periodic profile, or two
    different pictures, have no single answer: 0)."""
    summed = np.convolve(scores, np.ones(3), mode="same")
    best = int(np.argmax(summed))
    if summed[best] < MIN_PEAK:
        return 0
    away = np.abs(np.arange(len(summed)) - best) > 3
    rival = summed[away].max() if away.any() else 0.0
    if rival > 0 and summed[best] < MIN_PEAK_RATIO * rival:
        return 0
    around = slice(max(0, best - 1), best + 2)
    return int(np.argmax(scores[around])) + around.start - limit


def shifted_signatures(rows: NDArray[np.uint8], dx: int, width: int) -> NDArray[np.uint8]:
    """B's row signatures as they would be with its content moved left by ``dx`` pixels (so
    they line up with A's): the block values interpolated a fraction of a block over."""
    if dx == 0:
        return rows
    blocks = rows.shape[1]
    step = dx * blocks / width
    positions = np.clip(np.arange(blocks) + step, 0, blocks - 1)
    low = np.floor(positions).astype(np.intp)
    high = np.minimum(low + 1, blocks - 1)
    weight = (positions - low).astype(np.float32)
    mixed = rows[:, low] * (1 - weight) + rows[:, high] * weight
    return np.asarray(mixed + 0.5, dtype=np.uint8)


# -- rows ------------------------------------------------------------------------------------


def candidate_diagonals(rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8]) -> list[int]:
    """Vertical offsets worth weighing: 0, the offsets of rows whose (coarsened) signature is
    unique in A and in B, and the peaks of the row signatures' correlation."""
    votes: dict[int, int] = {}
    if rows_a.shape[1] == rows_b.shape[1]:
        votes = _unique_row_offsets(rows_a, rows_b)
    total = sum(votes.values())
    chosen = [
        offset
        for offset, count in sorted(votes.items(), key=lambda item: -item[1])
        if count >= max(2, MIN_DIAGONAL_SHARE * total)
    ]
    if total < MIN_VOTES:  # noisy or textured rows: no unique row to go by
        chosen += [peak for peak in _correlation_peaks(rows_a, rows_b) if peak not in chosen]
    diagonals = [0] + [offset for offset in chosen if offset != 0]
    return sorted(diagonals[:MAX_DIAGONALS])


def _unique_row_offsets(rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8]) -> dict[int, int]:
    """offset -> how many rows with a signature unique in both images lie on it."""
    coarse_a, coarse_b = rows_a >> 3, rows_b >> 3
    joined = np.concatenate([coarse_a, coarse_b])
    keys = np.ascontiguousarray(joined).view(np.dtype((np.void, joined.shape[1]))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    in_a, in_b = inverse[: len(rows_a)], inverse[len(rows_a) :]
    count_a = np.bincount(in_a, minlength=len(counts))
    count_b = np.bincount(in_b, minlength=len(counts))
    unique = (count_a == 1) & (count_b == 1)
    # Flat rows (blank lines) say nothing about where they are.
    flat = joined.max(axis=1) - joined.min(axis=1) <= 1
    unique &= ~np.bincount(inverse, weights=flat, minlength=len(counts)).astype(bool)
    row_a = np.full(len(counts), -1)
    row_a[in_a] = np.arange(len(rows_a))
    row_b = np.full(len(counts), -1)
    row_b[in_b] = np.arange(len(rows_b))
    offsets = row_b[unique] - row_a[unique]
    values, tally = np.unique(offsets, return_counts=True)
    return {int(v): int(t) for v, t in zip(values, tally, strict=True)}


def _correlation_peaks(
    rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8], count: int = 3
) -> list[int]:
    """The highest local maxima of the row signatures' (plain, not whitened) correlation, per
    row of overlap, among shifts that leave at least half the shorter image overlapping."""
    a, b = _coarse_channels(rows_a), _coarse_channels(rows_b)
    height_a, height_b = len(rows_a), len(rows_b)
    limit = max(1, max(height_a, height_b) - min(height_a, height_b) // 2)
    size = 1 << int(np.ceil(np.log2(height_a + height_b + 1)))
    product = np.zeros(size // 2 + 1, np.complex128)
    for row_a, row_b in zip(a, b, strict=True):
        product += np.conj(np.fft.rfft(row_a, size)) * np.fft.rfft(row_b, size)
    scores = np.fft.irfft(product, size)
    shifts = np.arange(-limit, limit + 1)
    scores = np.concatenate([scores[size - limit :], scores[: limit + 1]])
    overlap = np.minimum(height_a, height_b - shifts) - np.maximum(0, -shifts)
    keep = overlap >= min(height_a, height_b) // 2
    scores = np.where(keep, scores / np.clip(overlap, 1, None), -np.inf)
    interior = (scores[1:-1] >= scores[:-2]) & (scores[1:-1] >= scores[2:])
    peaks = np.nonzero(interior & np.isfinite(scores[1:-1]))[0] + 1
    best = peaks[np.argsort(-scores[peaks])][:count]
    return [int(shifts[p]) for p in best if scores[p] > 0]


def _coarse_channels(rows: NDArray[np.uint8], channels: int = 8) -> NDArray[np.float64]:
    """Row signatures summed into a few channels, each centred: the correlation's input."""
    groups = np.array_split(np.arange(rows.shape[1]), min(channels, rows.shape[1]))
    out = np.stack([rows[:, group].sum(axis=1, dtype=np.float64) for group in groups])
    return np.asarray(out - out.mean(axis=1, keepdims=True))


def match_costs(
    rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8], diagonals: list[int]
) -> NDArray[np.float64]:
    """``costs[k, i]``: 0 where row i of A matches row ``i + diagonals[k]`` of B, 1 where it
    does not, infinite where that row of B does not exist."""
    height_a, height_b = len(rows_a), len(rows_b)
    blocks = min(rows_a.shape[1], rows_b.shape[1])
    costs = np.full((len(diagonals), height_a), _INF)
    for k, d in enumerate(diagonals):
        first, last = max(0, -d), min(height_a, height_b - d)
        if first >= last:
            continue
        gap = np.abs(
            rows_a[first:last, :blocks].astype(np.int16)
            - rows_b[first + d : last + d, :blocks].astype(np.int16)
        )
        costs[k, first:last] = gap.max(axis=1) > ROW_TOLERANCE
    return costs


def align_rows(
    rows_a: NDArray[np.uint8], rows_b: NDArray[np.uint8], diagonals: list[int]
) -> list[Band]:
    """The cheapest path through the rows of A over the candidate diagonals (see the module
    docstring), as bands top to bottom. Rows that already match at the top (on diagonal 0)
    and at the bottom (on the diagonal that ends both images together) are set aside first,
    as a text diff strips a common prefix and suffix: the programme runs on what is left."""
    height_a, height_b = len(rows_a), len(rows_b)
    costs = match_costs(rows_a, rows_b, diagonals)
    top = _leading_zeros(costs[diagonals.index(0)])
    end_diagonal = height_b - height_a
    bottom = 0
    if end_diagonal in diagonals:
        bottom = _leading_zeros(costs[diagonals.index(end_diagonal), top:][::-1])
    bottom = min(bottom, height_a - top, height_b - top)
    middle_a, middle_b = (top, height_a - bottom), (top, height_b - bottom)
    pieces = [_matched(0, top, 0)] if top else []
    steps = _Steps(diagonals, middle_a[1] - top, middle_b[1] - top)
    for band in steps.solve(costs[:, middle_a[0] : middle_a[1]].copy()):
        pieces.append(_moved_down(band, top))
    if bottom:
        pieces.append(_matched(height_a - bottom, height_a, end_diagonal))
    return _merged(pieces)


def _leading_zeros(costs: NDArray[np.float64]) -> int:
    nonzero = np.flatnonzero(costs != 0)
    return int(nonzero[0]) if len(nonzero) else len(costs)


def _moved_down(band: Band, rows: int) -> Band:
    def moved(span: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if span is None else (span[0] + rows, span[1] + rows)

    return Band(band.kind, moved(band.a), moved(band.b))


_START = -1_000_000
_MATCH = -1


class _Steps:
    """The dynamic programme of ``align_rows`` over A's rows ``0..height_a`` and B's rows
    ``0..height_b``: ``cost[i][k]`` is the cheapest way to account for A's rows above i and B's
    rows above ``i + diagonals[k]``. Plain Python lists: with a handful of diagonals, a row's
    few dozen comparisons cost less than as many numpy calls would."""

    def __init__(self, diagonals: list[int], height_a: int, height_b: int) -> None:
        self.d = diagonals
        self.height_a, self.height_b = height_a, height_b

    def solve(self, costs: NDArray[np.float64]) -> list[Band]:
        if self.height_a == 0:
            return [Band("inserted", None, (0, self.height_b))] if self.height_b else []
        rows = np.arange(self.height_a)
        for k, d in enumerate(self.d):  # this part of B only
            costs[k, (rows + d < 0) | (rows + d >= self.height_b)] = _INF
        cost, came = self._run(costs)
        return self._bands(cost, came)

    def _run(self, costs: NDArray[np.float64]) -> tuple[list[list[float]], list[list[int]]]:
        d, count = self.d, len(self.d)
        height_a, height_b = self.height_a, self.height_b
        inf = float(_INF)
        match = [[float(v) for v in column] for column in costs.T.tolist()]
        cost: list[list[float]] = [[inf] * count for _ in range(height_a + 1)]
        came: list[list[int]] = [[_START] * count for _ in range(height_a + 1)]
        cost[0][d.index(0)] = 0.0
        for k in range(count):  # starting below A's first rows: the rows above are removed
            if d[k] < 0 and -d[k] <= height_a:
                cost[-d[k]][k] = GAP_COST - d[k]
        inserts = [
            (k1, k2, GAP_COST + d[k2] - d[k1], height_b - d[k2])
            for k2 in range(count)
            for k1 in range(count)
            if d[k1] < d[k2]
        ]
        removals = [
            (k1, k2, d[k1] - d[k2], GAP_COST + d[k1] - d[k2])
            for k1 in range(count)
            for k2 in range(count)
            if d[k1] > d[k2]
        ]
        for i in range(height_a + 1):
            row, source = cost[i], came[i]
            for k1, k2, price, room in inserts:
                value = row[k1] + price
                # On a tie, the later insertion: rows stay on their diagonal while they can.
                if value <= row[k2] and value < inf and i <= room:
                    row[k2], source[k2] = value, k1
            if i == height_a:
                break
            for k1, k2, rows, price in removals:
                target = i + rows
                if target <= height_a:
                    value = row[k1] + price
                    if value < cost[target][k2]:
                        cost[target][k2], came[target][k2] = value, -2 - k1
            nxt, step, here = cost[i + 1], came[i + 1], match[i]
            for k in range(count):
                value = row[k] + here[k]
                if value < nxt[k]:
                    nxt[k], step[k] = value, _MATCH
        return cost, came

    def _end(self, cost: list[list[float]]) -> tuple[int, int]:
        """Where the cheapest path ends: (row of A, diagonal index) — at A's last row (the
        rest of B inserted), or where B ran out (the rest of A removed)."""
        d = self.d
        height_a, height_b = self.height_a, self.height_b
        best = (float(_INF), height_a, 0)
        for k in range(len(d)):
            tail = height_b - (height_a + d[k])
            if tail >= 0:
                total = cost[height_a][k] + (GAP_COST + tail if tail else 0)
                if total < best[0]:
                    best = (total, height_a, k)
            row = height_b - d[k]  # B exhausted at this row of A
            if 0 <= row < height_a:
                total = cost[row][k] + GAP_COST + (height_a - row)
                if total < best[0]:
                    best = (total, row, k)
        return best[1], best[2]

    def _bands(self, cost: list[list[float]], came: list[list[int]]) -> list[Band]:
        d = self.d
        height_a, height_b = self.height_a, self.height_b
        i, k = self._end(cost)
        pieces: list[Band] = []
        if i < height_a:
            pieces.append(Band("removed", (i, height_a), None))
        elif height_a + d[k] < height_b:
            pieces.append(Band("inserted", None, (height_a + d[k], height_b)))
        match_end: int | None = None
        while True:
            source = came[i][k]
            if source == _MATCH:
                match_end = i if match_end is None else match_end
                i -= 1
                continue
            if match_end is not None:
                pieces.append(_matched(i, match_end, d[k]))
                match_end = None
            if source == _START:
                if d[k] < 0:  # the start below A's first rows
                    pieces.append(Band("removed", (0, i), None))
                break
            if source >= 0:
                pieces.append(Band("inserted", None, (i + d[source], i + d[k])))
                k = source
            else:
                k_from = -2 - source
                rows = d[k_from] - d[k]
                pieces.append(Band("removed", (i - rows, i), None))
                i, k = i - rows, k_from
        return pieces[::-1]


def _matched(top: int, bottom: int, shift: int) -> Band:
    return Band("matched", (top, bottom), (top + shift, bottom + shift))


def _merged(bands: list[Band]) -> list[Band]:
    """Adjacent bands of one kind (and shift) as one; empty ones dropped."""
    out: list[Band] = []
    for band in bands:
        if band.height <= 0:
            continue
        if out and out[-1].kind == band.kind and out[-1].shift == band.shift:
            last = out[-1]
            out[-1] = Band(
                band.kind,
                None if last.a is None or band.a is None else (last.a[0], band.a[1]),
                None if last.b is None or band.b is None else (last.b[0], band.b[1]),
            )
            continue
        out.append(band)
    return out
