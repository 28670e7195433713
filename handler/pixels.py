"""Per-pixel rules of change detection, on strips of RGBA pixels (RGB flattened on white, plus
opacity) as ``handler.scan`` streams them.

- **Colour distance**: pixelmatch's YIQ distance. Where a pixel is not opaque in either image
  both are blended on pixelmatch's per-pixel background (48 or 207 per channel, varying from
  pixel to pixel), so a change of transparency is a change of colour and an edge against a
  transparent background is an edge.
- **Anti-aliasing, in either image** (pixelmatch's and odiff's rule): a pixel is smoothing when,
  in one of the images, it lies strictly between a darker and a brighter neighbour, has at most
  two equal neighbours, and its darkest or brightest neighbour has more than two equal
  neighbours of its own in both images (the "many siblings" test: that neighbour is inside a
  flat area, so the pixel is on the edge of one). Lossy inputs never hold exactly equal
  neighbours, so a tolerant variant adds: in each image the pixel lies strictly between its
  darkest and brightest neighbour and within the other image's 3 x 3 range (give or take
  ``AA_TOLERANCE``): the same edge drawn with other smoothing.
- **Structure** (the ``ignore_colors`` level): which of a pixel's neighbours look like it; a
  recolouring keeps that pattern, changed content does not.
- **Local moves**: the shift within ``MOVE_RADIUS`` that makes a block of B equal to A.

Coordinates: every function gets, per image, the strip and the candidates' rows and columns in
that strip, plus where the strip's rows and columns lie in the image (its row ``top`` and the
image's size), since pixelmatch treats pixels at the image's border specially. A strip holds
one row of context above and below: at its first and last rows the many-siblings test counts
the siblings the strip holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

#: pixelmatch's default: 0.1 on its 0..1 scale of the YIQ distance (35215 = the largest one).
COLOR_THRESHOLD = 0.1
MAX_DELTA = 35215.0 * COLOR_THRESHOLD**2
#: A "strong" changed pixel: YIQ distance over 0.25 (re-encoding noise stays below it).
STRONG_DELTA = 35215.0 * 0.25**2
#: Levels (0..255) a pixel may sit outside the other image's 3x3 range and still be smoothing.
AA_TOLERANCE = 12
#: A change in opacity of 10 % alone (colours equal on white) is a transparency change.
ALPHA_THRESHOLD = 26
#: Largest local move looked for (pixels, each way).
MOVE_RADIUS = 8
#: Two pixels are "the same" for the move test when their green values differ by no more.
_MOVE_TOLERANCE = 24
#: A block counts as moved when at most this share of its pixels disagree at the best shift.
MOVE_RESIDUAL = 0.02

#: What the move test finds for a block: its shift (dx, dy), ``"any"`` (a flat block that
#: several shifts fit) or None (no shift explains it).
Shift = tuple[int, int] | Literal["any"] | None
#: Pixel coordinates: 32-bit where a strip's pixels are listed (half the memory), else 64.
Index = NDArray[np.signedinteger[Any]]

YIQ = np.array(
    [
        [0.29889531, 0.59597799, 0.21147017],
        [0.58662247, -0.27417610, -0.52261711],
        [0.11448223, -0.32180189, 0.31114694],
    ],
    dtype=np.float32,
)
YIQ_WEIGHTS = np.array([0.5053, 0.299, 0.1957], dtype=np.float32)
LUMA = YIQ[:, 0]
_GOLDEN = 1.618033988749895

#: The 5 x 5 neighbourhood (the many-siblings test looks at the neighbours' neighbours), its
#: centre, the 3 x 3 ring around it, and for each ring position the indices of its own ring.
_GRID = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)], dtype=np.intp)
_CENTRE = 12
_RING = np.array(
    [i for i, (dy, dx) in enumerate(_GRID) if max(abs(dy), abs(dx)) == 1], dtype=np.intp
)
_RING_OF = np.array(
    [
        [
            j
            for j, (ey, ex) in enumerate(_GRID)
            if max(abs(ey - _GRID[i][0]), abs(ex - _GRID[i][1])) == 1
        ]
        for i in _RING
    ],
    dtype=np.intp,
)


@dataclass(frozen=True)
class Where:
    """Candidate pixels in one image's strip: strip rows ``ys``, columns ``xs``; the strip's
    first row is the image's row ``top``; the image is ``size`` (width, height)."""

    strip: NDArray[np.uint8]
    ys: Index
    xs: Index
    top: int
    size: tuple[int, int]

    def pixels(self) -> NDArray[np.uint8]:
        return self.strip[self.ys, self.xs]

    def subset(self, index: NDArray[np.intp]) -> Where:
        return Where(self.strip, self.ys[index], self.xs[index], self.top, self.size)


def background(ys: Index, xs: Index, width: int) -> NDArray[np.float32]:
    """pixelmatch's blending background per pixel (R, G, B), from the pixel's index."""
    k = 4 * (ys.astype(np.int64) * width + xs)
    red = np.full(len(k), 48.0, np.float32)  # (k is even: always 48)
    green = 48.0 + 159.0 * ((k / _GOLDEN).astype(np.int64) % 2)
    blue = 48.0 + 159.0 * ((k / (_GOLDEN + 1.0)).astype(np.int64) % 2)
    return np.stack([red, green, blue], axis=1).astype(np.float32)


def colour_delta(
    pa: NDArray[np.uint8], pb: NDArray[np.uint8], bg: NDArray[np.float32] | None
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """pixelmatch's squared YIQ distance of each pair of pixels, and the same on white alone
    (what tells a transparency-only change). ``bg`` may be None when every pixel is opaque."""
    diff = pa[:, :3].astype(np.float32) - pb[:, :3].astype(np.float32)
    on_white = (np.square(diff @ YIQ) * YIQ_WEIGHTS).sum(axis=1)
    if bg is None:
        return on_white, on_white
    alpha = (pa[:, 3].astype(np.float32) - pb[:, 3].astype(np.float32))[:, None]
    # Flattened on white, v = c*a/255 + 255 - a: on ``bg`` instead it is v - (255-bg)(255-a)/255.
    blended = diff + (255.0 - bg) * alpha / 255.0
    return (np.square(blended @ YIQ) * YIQ_WEIGHTS).sum(axis=1), on_white


def translucent(pa: NDArray[np.uint8], pb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    return (pa[:, 3] < 255) | (pb[:, 3] < 255)


def antialiased(a: Where, b: Where, *, exact_siblings: bool = True) -> NDArray[np.bool_]:
    """Smoothing in either image (see the module docstring), for pixels that differ.
    ``exact_siblings``: apply pixelmatch's rule too (its "many siblings" are exactly equal
    pixels, which lossy inputs hardly ever hold: there it costs time and finds nothing)."""
    result = _tolerant(_Near.of(a, _SMALL, bounds=False), _Near.of(b, _SMALL, bounds=False))
    undecided = np.flatnonzero(~result)
    if len(undecided) and exact_siblings:
        near_a, near_b = _Near.of(a.subset(undecided)), _Near.of(b.subset(undecided))
        result[undecided] = _pixelmatch(near_a, near_b) | _pixelmatch(near_b, near_a)
    return result


#: The 3 x 3 neighbourhood's positions in the 5 x 5 grid (ring, then centre).
_SMALL = np.append(_RING, _CENTRE)


@dataclass(frozen=True)
class _Near:
    """Each candidate's neighbourhood in one image (``positions`` of the 5 x 5 grid): flat strip
    indices (clipped), which positions lie inside the image, which lie on its border."""

    where: Where
    flat: NDArray[np.int32]
    valid: NDArray[np.bool_]
    border: NDArray[np.bool_]

    @classmethod
    def of(
        cls, where: Where, positions: NDArray[np.intp] | None = None, *, bounds: bool = True
    ) -> _Near:
        """Without ``bounds``, ``valid`` and ``border`` are left empty (the tolerant test does
        without them: a third of the temporary arrays)."""
        grid = (_GRID if positions is None else _GRID[positions]).astype(np.int32)
        height, width = where.strip.shape[:2]
        rows = where.ys.astype(np.int32)[:, None] + grid[:, 0]
        cols = where.xs.astype(np.int32)[:, None] + grid[:, 1]
        valid = border = np.zeros((0, 0), dtype=bool)
        if bounds:
            image_rows = rows + where.top
            valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < where.size[0])
            valid &= (image_rows >= 0) & (image_rows < where.size[1])
            border = (image_rows == 0) | (image_rows == where.size[1] - 1)
            border |= (cols == 0) | (cols == where.size[0] - 1)
        np.clip(rows, 0, height - 1, out=rows)
        np.clip(cols, 0, width - 1, out=cols)
        rows *= width
        rows += cols
        return cls(where, rows, valid, border)

    def rgb(self, positions: slice | NDArray[np.intp] = slice(None)) -> NDArray[np.uint8]:
        return self.where.strip.reshape(-1, 4)[self.flat[:, positions], :3]

    def alpha(self) -> NDArray[np.uint8]:
        return np.asarray(self.where.strip.reshape(-1, 4)[self.flat, 3])

    def packed(self) -> NDArray[np.uint32]:
        return self.where.strip.view(np.uint32).reshape(-1)[self.flat]


def _tolerant(near_a: _Near, near_b: _Near) -> NDArray[np.bool_]:
    """The lossy-input variant on the 3 x 3 neighbourhoods: an edge pixel in both images whose
    value in each lies within the other image's 3 x 3 range (give or take AA_TOLERANCE)."""
    result = np.ones(len(near_a.flat), dtype=bool)
    ranges = []
    for near in (near_a, near_b):
        own = near.rgb().astype(np.int16)
        brightness = own @ LUMA
        neighbours, mid = brightness[:, :-1], brightness[:, -1]
        result &= (neighbours.min(axis=1) < mid) & (mid < neighbours.max(axis=1))
        ranges.append((own[:, -1], own.min(axis=1), own.max(axis=1)))
    for (centre, _, _), (_, low, high) in ((ranges[0], ranges[1]), (ranges[1], ranges[0])):
        result &= ((centre >= low - AA_TOLERANCE) & (centre <= high + AA_TOLERANCE)).all(axis=1)
    return result


def _pixelmatch(this: _Near, other: _Near) -> NDArray[np.bool_]:
    """pixelmatch's ``antialiased(this, x, y, other)`` on 5 x 5 neighbourhoods."""
    packed = this.packed()
    ring_valid = this.valid[:, _RING]
    equal = (packed[:, _RING] == packed[:, _CENTRE, None]) & ring_valid
    zeroes = equal.sum(axis=1) + this.border[:, _CENTRE]
    # Brightness of the ring against the centre, both blended on the centre's background.
    luma = this.rgb(_SMALL).astype(np.float32) @ LUMA
    opacity = this.alpha()[:, _SMALL]
    if (opacity < 255).any():
        where = this.where
        bg = background(where.ys + where.top, where.xs, where.size[0])
        luma -= ((255.0 - bg) @ LUMA)[:, None] * (255.0 - opacity) / 255.0
    delta = np.where(ring_valid & ~equal, luma[:, -1:] - luma[:, :-1], 0.0)
    both = (delta.min(axis=1) < 0) & (delta.max(axis=1) > 0) & (zeroes <= 2)
    out = np.zeros(len(packed), dtype=bool)
    if not both.any():
        return out
    rows = np.flatnonzero(both)
    darkest, brightest = np.argmin(delta[rows], axis=1), np.argmax(delta[rows], axis=1)
    many_this = _many_siblings(packed[rows], this.valid[rows], this.border[rows])
    many_other = _many_siblings(other.packed()[rows], other.valid[rows], other.border[rows])
    at = np.arange(len(rows))
    out[rows] = (many_this[at, darkest] & many_other[at, darkest]) | (
        many_this[at, brightest] & many_other[at, brightest]
    )
    return out


def _many_siblings(
    packed: NDArray[np.uint32], valid: NDArray[np.bool_], border: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """For each ring position: more than two of its own neighbours equal it (a position on
    the image's border starts with one), pixelmatch's ``hasManySiblings``."""
    own = packed[:, _RING, None]
    around = packed[:, _RING_OF]
    equal = (around == own) & valid[:, _RING_OF]
    return np.asarray(equal.sum(axis=2) + border[:, _RING] > 2)


def structure_changed(a: Where, b: Where) -> NDArray[np.bool_]:
    """For the ``ignore_colors`` level: which of its 8 neighbours look like the pixel (YIQ
    distance under the threshold) differs between A and B in two neighbours or more."""
    patterns = []
    for where in (a, b):
        near = _Near.of(where, _SMALL)
        pixels = near.rgb().astype(np.float32)
        diff = pixels[:, :-1] - pixels[:, -1:]
        close = (np.square(diff @ YIQ) * YIQ_WEIGHTS).sum(axis=2) <= MAX_DELTA
        patterns.append(close | ~near.valid[:, :-1])
    return np.asarray((patterns[0] != patterns[1]).sum(axis=1) >= 2)


def local_shift(window_a: NDArray[np.uint8], block_b: NDArray[np.uint8], radius: int) -> Shift:
    """The shift (dx, dy), within ``radius`` and not (0, 0), that makes ``block_b`` equal to
    the part of ``window_a`` that far from its centre — ``window_a`` is the block's place in
    A grown by ``radius`` on every side: B at p is A at p - shift. Equal means all but
    MOVE_RESIDUAL of the block's pixels within _MOVE_TOLERANCE; ``"any"`` when several
    shifts fit (a flat block), None when none does."""
    height, width = block_b.shape[:2]
    if window_a.shape[0] != height + 2 * radius or window_a.shape[1] != width + 2 * radius:
        return None
    # The green channel alone (it carries most of the luminance): a third of the work.
    views = np.lib.stride_tricks.sliding_window_view(window_a[..., 1], (height, width))
    gaps = np.abs(views.astype(np.int16) - block_b[None, None, ..., 1].astype(np.int16))
    wrong = (gaps > _MOVE_TOLERANCE).sum(axis=(2, 3))
    fits = wrong <= MOVE_RESIDUAL * height * width
    if fits[radius, radius]:  # in place: not a move (the cell's change is elsewhere)
        return None
    found = np.argwhere(fits)
    if len(found) == 0:
        return None
    if len(found) > 1:
        return "any"
    row, column = int(found[0][0]), int(found[0][1])
    return radius - column, radius - row
