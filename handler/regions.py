"""From what the streamed scan found to regions that say what happened.

The scan (``handler.scan``) leaves a small change map of A's pixels (``ChangeMap``: per
BLOCK x BLOCK cell, a changed-pixel count and tight bounds, and which cells' content turned
up nearby in B), the content of each band that exists in one image only (``BandContent``) and
the alignment it compared under. Here:

- changed cells within one cell of each other form a cluster; a cluster is a **confident**
  change by the input's rules: between lossless inputs one strongly changed pixel is enough
  (pixelmatch's and odiff's semantics); otherwise (lossy inputs, a rescaled copy, weak
  changes) at least ``MIN_CLUSTER_PIXELS`` changed pixels of which ``MIN_STRONG_PIXELS``
  strong, or ``WEAK_CLUSTER_PIXELS`` in all (re-encoding leaves weak specks); under the
  ``exact`` level any changed pixel;
- a confident cluster whose cells all reappear in B at one small shift is ``moved``, else
  ``changed``; a band inserted into B is ``added``, one removed from A is ``removed``;
  columns one image has beyond the other likewise; the strips at the edges that a global
  shift uncovers (a camera that moved, a margin that changed) are the alignment's, not
  regions;
- each region gets its box in A and in B (native pixels), and the pair's verdict under the
  match levels: ``strict`` counts every region and any move, ``ignore_moves`` neither moved
  regions nor the alignment's moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from handler.align import Alignment, Band
from handler.config import MatchLevel
from handler.pixels import Index, Shift
from handler.result import AlignmentInfo, BandInfo, Box, Region, RegionKind
from handler.vips import pyvips

#: Cell size of the streamed change map (work pixels).
BLOCK = 16
#: Fewer changed pixels than this in a cluster of lossy inputs is noise (a stray JPEG
#: artefact), not a change ...
MIN_CLUSTER_PIXELS = 12
#: ... and it needs this many strong pixels, or WEAK_CLUSTER_PIXELS changed pixels in all (a
#: faint change over a larger area).
MIN_STRONG_PIXELS = 4
WEAK_CLUSTER_PIXELS = 256
MAX_REGIONS = 20
#: Regions are the changed pixels' bounds plus this margin: the faint anti-aliased rim of a
#: changed word is under the colour threshold but part of the word.
REGION_PAD = 2
#: Strips at the top and bottom (or sides) that a global shift of at most this many pixels, or
#: this share of the image, uncovers belong to the alignment, not to the regions.
EDGE_PIXELS = 8
EDGE_SHARE = 0.02
#: A cell whose content lies elsewhere in B at no single shift (several fit: a flat patch).
ANY_SHIFT = "any"
#: Levels (0..255) by which a band's pixel must differ from the neighbouring row to be content.
CONTENT_TOLERANCE = 16


@dataclass
class ChangeMap:
    """Per BLOCK x BLOCK cell of A (work pixels): changed-pixel count, strong ones, tight
    bounds (offsets inside the cell, valid where ``count`` > 0; 8 bytes a cell, so a 100 MP map
    is 3 MB), whether any was judged at the ``exact`` level; per row of cells the differing
    and transparency-only pixels; and per tested cell the shift at which its content lies in
    B (``moves``)."""

    count: NDArray[np.uint16]
    strong: NDArray[np.uint16]
    exact: NDArray[np.bool_]
    x0: NDArray[np.uint8]
    y0: NDArray[np.uint8]
    x1: NDArray[np.uint8]
    y1: NDArray[np.uint8]
    differing: NDArray[np.int64]
    transparency: NDArray[np.int64]
    moves: dict[tuple[int, int], Shift] = field(default_factory=dict)

    @classmethod
    def empty(cls, size: tuple[int, int]) -> ChangeMap:
        grid = (-(-size[1] // BLOCK), -(-size[0] // BLOCK))
        return cls(
            count=np.zeros(grid, np.uint16),
            strong=np.zeros(grid, np.uint16),
            exact=np.zeros(grid, bool),
            x0=np.full(grid, BLOCK, np.uint8),
            y0=np.full(grid, BLOCK, np.uint8),
            x1=np.zeros(grid, np.uint8),
            y1=np.zeros(grid, np.uint8),
            differing=np.zeros(grid[0], np.int64),
            transparency=np.zeros(grid[0], np.int64),
        )

    def add(
        self,
        xs: Index,
        ys: Index,
        strong: NDArray[np.bool_],
        exact: NDArray[np.bool_] | None,
        *,
        tight: bool = True,
    ) -> None:
        """Changed pixels at A's (work) pixels ``xs``, ``ys``; without ``tight`` bounds, the
        cells they fall in are marked changed whole (cheaper, for a strip changed almost
        everywhere)."""
        rows, columns = ys // BLOCK, xs // BLOCK
        top = int(rows.min())
        flat = (rows - top) * self.count.shape[1] + columns
        span = (int(rows.max()) - top + 1) * self.count.shape[1]
        counts = np.bincount(flat, minlength=span).reshape(-1, self.count.shape[1])
        strongs = np.bincount(flat, weights=strong, minlength=span).reshape(counts.shape)
        window = slice(top, top + len(counts))
        # (Counts saturate rather than wrap: a cell holds at most BLOCK x BLOCK pixels.)
        self.count[window] = np.minimum(self.count[window] + counts, np.iinfo(np.uint16).max)
        self.strong[window] += strongs.astype(np.uint16)
        index = (rows, columns)
        if exact is not None and exact.any():
            self.exact[rows[exact], columns[exact]] = True
        if not tight:
            hit = counts > 0
            self.x0[window][hit] = self.y0[window][hit] = 0
            self.x1[window][hit] = self.y1[window][hit] = BLOCK - 1
            return
        dx, dy = (xs % BLOCK).astype(np.uint8), (ys % BLOCK).astype(np.uint8)
        np.minimum.at(self.x0, index, dx)
        np.minimum.at(self.y0, index, dy)
        np.maximum.at(self.x1, index, dx)
        np.maximum.at(self.y1, index, dy)

    def take_rows(self, other: ChangeMap, rows: int) -> None:
        """The first ``rows`` rows of cells from ``other`` (a scan of the same A)."""
        for name in ("count", "strong", "exact", "x0", "y0", "x1", "y1"):
            getattr(self, name)[:rows] = getattr(other, name)[:rows]
        self.differing[:rows] = other.differing[:rows]
        self.transparency[:rows] = other.transparency[:rows]
        self.moves.update({cell: shift for cell, shift in other.moves.items() if cell[0] < rows})

    def record_move(self, cell: tuple[int, int], shift: Shift) -> None:
        """A cell tested in two strips keeps a shift only where both agree."""
        if cell in self.moves and self.moves[cell] != shift:
            previous = self.moves[cell]
            shift = previous if shift == ANY_SHIFT else shift if previous == ANY_SHIFT else None
        self.moves[cell] = shift


@dataclass
class BandContent:
    """Where the content of a band that exists in one image only lies: the colour range of
    each of its columns and rows, against the row just outside the band (``reference``, taken
    when the scan passes it), all in that image's work pixels."""

    band: Band
    width: int
    reference: NDArray[np.uint8] | None = None
    col_low: NDArray[np.uint8] = field(init=False)
    col_high: NDArray[np.uint8] = field(init=False)
    row_low: NDArray[np.uint8] = field(init=False)
    row_high: NDArray[np.uint8] = field(init=False)

    def __post_init__(self) -> None:
        self.col_low = np.full((self.width, 4), 255, np.uint8)
        self.col_high = np.zeros((self.width, 4), np.uint8)
        self.row_low = np.full((self.band.height, 4), 255, np.uint8)
        self.row_high = np.zeros((self.band.height, 4), np.uint8)

    @property
    def rows(self) -> tuple[int, int]:
        rows = self.band.a if self.band.kind == "removed" else self.band.b
        assert rows is not None
        return rows

    def add(self, pixels: NDArray[np.uint8], first: int) -> None:
        """Rows ``first:first + len(pixels)`` of the image, all inside the band."""
        np.minimum(self.col_low, pixels.min(axis=0), out=self.col_low)
        np.maximum(self.col_high, pixels.max(axis=0), out=self.col_high)
        at = first - self.rows[0]
        self.row_low[at : at + len(pixels)] = pixels.min(axis=1)
        self.row_high[at : at + len(pixels)] = pixels.max(axis=1)

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the pixels unlike the neighbouring row; the whole band when
        nothing stands out (blank space added is still a band added)."""
        top, bottom = self.rows
        whole = (0, top, self.width, bottom)
        if self.reference is None:
            return whole
        ref = self.reference.astype(np.int16)
        tol = CONTENT_TOLERANCE
        columns = (
            (self.col_high.astype(np.int16) > ref + tol)
            | (self.col_low.astype(np.int16) < ref - tol)
        ).any(axis=1)
        ref_low, ref_high = ref.min(axis=0), ref.max(axis=0)
        rows = (
            (self.row_high.astype(np.int16) > ref_high + tol)
            | (self.row_low.astype(np.int16) < ref_low - tol)
        ).any(axis=1)
        if not columns.any() or not rows.any():
            return whole
        xs, ys = np.flatnonzero(columns), np.flatnonzero(rows)
        return (int(xs[0]), top + int(ys[0]), int(xs[-1]) + 1, top + int(ys[-1]) + 1)


@dataclass(frozen=True)
class Geometry:
    """The two images' native sizes, the sizes they were compared at (both the smaller one's
    for a rescaled copy, each its own otherwise), and whether one strongly changed pixel is a
    change (lossless inputs compared at their own size)."""

    size_a: tuple[int, int]
    size_b: tuple[int, int]
    work_a: tuple[int, int]
    work_b: tuple[int, int]
    lossless: bool

    def native(self, box: tuple[int, int, int, int], which: str) -> Box:
        """(x0, y0, x1, y1) in one image's work pixels -> a box in its native pixels."""
        size, work = (self.size_a, self.work_a) if which == "a" else (self.size_b, self.work_b)
        fx, fy = size[0] / work[0], size[1] / work[1]
        x0, y0, x1, y1 = box
        left = min(size[0] - 1, max(0, int(x0 * fx)))
        top = min(size[1] - 1, max(0, int(y0 * fy)))
        right = min(size[0], max(left + 1, int(np.ceil(x1 * fx))))
        bottom = min(size[1], max(top + 1, int(np.ceil(y1 * fy))))
        return Box(x=left, y=top, width=right - left, height=bottom - top)

    def rows_native(self, rows: tuple[int, int], which: str) -> tuple[int, int]:
        box = self.native((0, rows[0], 1, rows[1]), which)
        return (box.y, box.y + box.height)


@dataclass(frozen=True)
class Levels:
    """The pair's match level and the boxes (A's work pixels, x0, y0, x1, y1) that override it."""

    level: MatchLevel = "strict"
    boxes: tuple[tuple[tuple[int, int, int, int], str], ...] = ()

    def at(self, box: tuple[int, int, int, int]) -> str:
        """The level of the last override box holding ``box``'s centre, else the pair's."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        level: str = self.level
        for (x0, y0, x1, y1), override in self.boxes:
            if x0 <= cx < x1 and y0 <= cy < y1:
                level = override
        return level


@dataclass(frozen=True)
class Findings:
    """Regions (largest first, at most MAX_REGIONS), their pixels, the counts, the alignment as
    the result shows it, and whether the pair differs under its match levels."""

    regions: tuple[Region, ...] = ()
    region_pixels: tuple[int, ...] = ()
    #: Whether each region makes the pair different under its level (moved content under
    #: ``ignore_moves`` does not).
    counted: tuple[bool, ...] = ()
    changed_pixels: int = 0
    moved_pixels: int = 0
    transparency_pixels: int = 0
    differing_pixels: int = 0
    alignment: AlignmentInfo | None = None
    differs: bool = False
    #: Rows holding a change, an addition or a removal (lower: the better account of the pair).
    unexplained: int = 0


@dataclass(frozen=True)
class _Found:
    kind: RegionKind
    box_a: tuple[int, int, int, int] | None  # work pixels of A
    box_b: tuple[int, int, int, int] | None  # work pixels of B
    shift: tuple[int, int] | None
    pixels: int
    level: str
    band: int | None = None


def findings(
    cells: ChangeMap,
    contents: list[BandContent],
    alignment: Alignment,
    geometry: Geometry,
    levels: Levels,
) -> Findings:
    """Everything the result says about where A and B differ (see the module docstring),
    when the scan compared them along ``alignment``."""
    found = _clusters(cells, alignment, geometry, levels)
    # (The identity between images of one size is no alignment: they line up as they lie.)
    aligned = not alignment.identity or geometry.work_a != geometry.work_b
    edges = _edges(alignment, geometry)
    for content in contents:
        index = alignment.bands.index(content.band)
        if index in edges:
            continue
        box = content.box()
        which = "a" if content.band.kind == "removed" else "b"
        kind: RegionKind = "removed" if which == "a" else "added"
        found.append(
            _Found(
                kind,
                box if which == "a" else None,
                box if which == "b" else None,
                None,
                _area(box),
                levels.at(box) if which == "a" else levels.level,
                band=index,
            )
        )
    found.extend(_side_strips(alignment, geometry, levels))
    found.sort(key=lambda item: -item.pixels)
    kept = found[:MAX_REGIONS]
    regions = tuple(_region(item, geometry) for item in kept)
    moved = sum(item.pixels for item in found if item.kind == "moved")
    changed = sum(item.pixels for item in found if item.kind != "moved")
    counted = [item for item in found if _counts(item)]
    differs = bool(counted) or (aligned and levels.level != "ignore_moves")
    transparency = int(cells.transparency.sum())
    return Findings(
        regions=regions,
        region_pixels=tuple(item.pixels for item in kept),
        counted=tuple(_counts(item) for item in kept),
        changed_pixels=changed,
        moved_pixels=moved,
        transparency_pixels=min(transparency, changed),
        differing_pixels=int(cells.differing.sum()),
        alignment=_alignment_info(alignment, geometry, kept) if aligned else None,
        differs=differs,
        unexplained=_unexplained_rows(found),
    )


def _unexplained_rows(found: list[_Found]) -> int:
    """How many rows of A (and of B, for bands added there) hold a change, an addition or a
    removal: what tells an alignment that explains the pair from one that does not."""
    rows_a: list[tuple[int, int]] = []
    rows_b = 0
    for item in found:
        if item.kind == "moved":
            continue
        if item.box_a is not None:
            rows_a.append((item.box_a[1], item.box_a[3]))
        elif item.box_b is not None:
            rows_b += item.box_b[3] - item.box_b[1]
    covered, reach = 0, -1
    for top, bottom in sorted(rows_a):
        top = max(top, reach)
        if bottom > top:
            covered += bottom - top
        reach = max(reach, bottom)
    return covered + rows_b


def _counts(item: _Found) -> bool:
    return not (item.kind == "moved" and item.level == "ignore_moves")


def _clusters(
    cells: ChangeMap, alignment: Alignment, geometry: Geometry, levels: Levels
) -> list[_Found]:
    occupied = cells.count > 0
    if not occupied.any():
        return []
    label, count = _labels(occupied)
    rows, cols = np.nonzero(occupied)
    pixels = np.bincount(label, weights=cells.count[occupied], minlength=count)
    strong = np.bincount(label, weights=cells.strong[occupied], minlength=count)
    exact = np.bincount(label, weights=cells.exact[occupied], minlength=count)
    x0 = _smallest(label, count, cols * BLOCK + cells.x0[occupied])
    y0 = _smallest(label, count, rows * BLOCK + cells.y0[occupied])
    x1 = -_smallest(label, count, -(cols * BLOCK + cells.x1[occupied]))
    y1 = -_smallest(label, count, -(rows * BLOCK + cells.y1[occupied]))
    members: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    if cells.moves:
        for index, cell in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            members[label[index]].append(cell)
    out = []
    for i in range(count):
        if not _confident(int(pixels[i]), int(strong[i]), bool(exact[i]), geometry.lossless):
            continue
        box = _padded((int(x0[i]), int(y0[i]), int(x1[i]) + 1, int(y1[i]) + 1), geometry.work_a)
        shift = _cluster_shift(members[i], cells.moves)
        placed = _placed(box, int(pixels[i]), shift, alignment, geometry, levels.at(box))
        if placed is not None:
            out.append(placed)
    return out


def _placed(
    box: tuple[int, int, int, int],
    pixels: int,
    local: tuple[int, int] | None,
    alignment: Alignment,
    geometry: Geometry,
    level: str,
) -> _Found | None:
    """A confident cluster of A (work pixels) as a changed or moved region with its box in B
    (None: content that stayed in place while everything around it moved)."""
    if local is None:
        return _Found(
            "changed", box, _in_b(box, alignment, geometry), _offset(box, alignment), pixels, level
        )
    # The cluster holds the content's old and new places: A's box is the old one.
    sx, sy = local
    x0, y0, x1, y1 = box
    old = (x0 + max(0, -sx), y0 + max(0, -sy), x1 - max(0, sx), y1 - max(0, sy))
    if old[2] <= old[0] or old[3] <= old[1]:
        old = box
    dx, dy = _offset(old, alignment)
    if (dx + sx, dy + sy) == (0, 0):  # it stayed where it was while the rest moved
        return None
    moved = (old[0] + dx + sx, old[1] + dy + sy, old[2] + dx + sx, old[3] + dy + sy)
    return _Found("moved", old, _clipped(moved, geometry.work_b), (dx + sx, dy + sy), pixels, level)


def _offset(box: tuple[int, int, int, int], alignment: Alignment) -> tuple[int, int]:
    """Where the alignment puts ``box``'s top row: (dx, the shift of its band)."""
    return alignment.dx, _row_in_b(box[1], alignment) - box[1]


def _in_b(
    box: tuple[int, int, int, int], alignment: Alignment, geometry: Geometry
) -> tuple[int, int, int, int] | None:
    dx, dy = _offset(box, alignment)  # (a box across a band's edge keeps its top's shift)
    return _clipped((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy), geometry.work_b)


def _row_in_b(row: int, alignment: Alignment) -> int:
    """Row ``row`` of A in B: through its matched band, or where its removed band was."""
    for band in alignment.bands:
        if band.a is None or not band.a[0] <= row < band.a[1]:
            continue
        if band.kind == "matched":
            return row + band.shift
        return _removed_at(band, alignment)
    return row


def _removed_at(band: Band, alignment: Alignment) -> int:
    """The row of B where a removed band of A would have been."""
    index = alignment.bands.index(band)
    for earlier in reversed(alignment.bands[:index]):
        if earlier.b is not None:
            return earlier.b[1]
    return 0


def _clipped(
    box: tuple[int, int, int, int], size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(size[0], box[2]), min(size[1], box[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _cluster_shift(
    cells: list[tuple[int, int]], moves: dict[tuple[int, int], Shift]
) -> tuple[int, int] | None:
    """The one shift every cell of a cluster agrees on (a flat cell agrees with any), or None."""
    if not cells:
        return None
    found: tuple[int, int] | None = None
    for cell in cells:
        shift = moves.get(cell)
        if shift is None:
            return None
        if shift == ANY_SHIFT:
            continue
        assert not isinstance(shift, str)
        if found is not None and shift != found:
            return None
        found = shift
    return found


def _edges(alignment: Alignment, geometry: Geometry) -> set[int]:
    """Indexes of the bands a global vertical shift uncovers: an inserted band at one end and a
    removed one of the same height at the other, no higher than the edge allowance, between
    images of one height."""
    bands = alignment.bands
    if len(bands) < 2 or geometry.work_a[1] != geometry.work_b[1]:
        return set()
    first, last = bands[0], bands[-1]
    allowance = max(EDGE_PIXELS, int(EDGE_SHARE * geometry.work_a[1]))
    pair = {first.kind, last.kind} == {"inserted", "removed"}
    if pair and first.height == last.height <= allowance:
        return {0, len(bands) - 1}
    return set()


def _side_strips(alignment: Alignment, geometry: Geometry, levels: Levels) -> list[_Found]:
    """Columns one image has beyond the other once the global offset is taken into account:
    added (B wider) or removed (A wider) on the right."""
    (width_a, height_a), (width_b, height_b) = geometry.work_a, geometry.work_b
    dx = alignment.dx
    out: list[_Found] = []
    if width_b > width_a:
        left = max(width_a + max(dx, 0), 0)
        if left < width_b:
            box = (left, 0, width_b, height_b)
            out.append(_Found("added", None, box, None, _area(box), levels.level))
    elif width_a > width_b:
        left = max(width_b - min(dx, 0), 0)
        if left < width_a:
            box = (left, 0, width_a, height_a)
            out.append(_Found("removed", box, None, None, _area(box), levels.at(box)))
    return out


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _region(item: _Found, geometry: Geometry) -> Region:
    a = geometry.native(item.box_a, "a") if item.box_a else None
    b = geometry.native(item.box_b, "b") if item.box_b else None
    main = a or b
    assert main is not None
    shift = None
    if item.shift is not None and a is not None and b is not None:
        shift = (b.x - a.x, b.y - a.y) if item.kind == "moved" else _native_shift(item, geometry)
    return Region(
        x=main.x,
        y=main.y,
        width=main.width,
        height=main.height,
        kind=item.kind,
        a=a,
        b=b,
        shift=shift,
    )


def _native_shift(item: _Found, geometry: Geometry) -> tuple[int, int]:
    assert item.shift is not None
    fx = geometry.size_a[0] / geometry.work_a[0]
    fy = geometry.size_a[1] / geometry.work_a[1]
    return (round(item.shift[0] * fx), round(item.shift[1] * fy))


def _alignment_info(alignment: Alignment, geometry: Geometry, kept: list[_Found]) -> AlignmentInfo:
    fx = geometry.size_a[0] / geometry.work_a[0]
    fy = geometry.size_a[1] / geometry.work_a[1]
    region_of = {item.band: index for index, item in enumerate(kept) if item.band is not None}
    bands = [
        BandInfo(
            kind=band.kind,
            a=geometry.rows_native(band.a, "a") if band.a else None,
            b=geometry.rows_native(band.b, "b") if band.b else None,
            shift=round(band.shift * fy),
            region=region_of.get(index),
        )
        for index, band in enumerate(alignment.bands)
    ]
    return AlignmentInfo(offset=(round(alignment.dx * fx), round(alignment.dy * fy)), bands=bands)


def _labels(occupied: NDArray[np.bool_]) -> tuple[NDArray[np.intp], int]:
    """Cluster labels of the occupied cells (in ``occupied``'s order) and the label count.

    Cells one empty cell apart belong to one cluster (a word's letters, a moved label's old
    and new place): the map is dilated by one cell, then labelled. libvips does both on the
    small map; it is loaded already, where scipy would cost ~0.2 s and ~18 MB to import.
    """
    cell_map = pyvips.Image.new_from_array(occupied.astype(np.uint8) * 255)
    joined = cell_map.morph(pyvips.Image.new_from_array(np.full((3, 3), 255, np.uint8)), "dilate")
    # (A 1 x 1 map comes back from numpy() as a 0-d array: give it its two dimensions back.)
    labels = np.asarray(joined.labelregions().numpy()).reshape(occupied.shape)[occupied]
    # labelregions numbers every region, the empty background's included: renumber 0..n-1.
    kept, index = np.unique(labels, return_inverse=True)
    return index.astype(np.intp), len(kept)


def _smallest(label: NDArray[np.intp], count: int, values: NDArray[np.intp]) -> NDArray[np.intp]:
    """The smallest of ``values`` per cluster label."""
    out = np.full(count, np.iinfo(np.intp).max, dtype=np.intp)
    np.minimum.at(out, label, values)
    return out


def _padded(box: tuple[int, int, int, int], limit: tuple[int, int]) -> tuple[int, int, int, int]:
    """REGION_PAD more on each side, inside the image."""
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - REGION_PAD),
        max(0, y0 - REGION_PAD),
        min(limit[0], x1 + REGION_PAD),
        min(limit[1], y1 + REGION_PAD),
    )


def _confident(pixels: int, strong: int, exact: bool, lossless: bool) -> bool:
    """A real change, not re-encoding noise: JPEG q70 leaves clusters of up to ~60 weak pixels
    (measured on the scikit-image photos) but never a strong one; lossless inputs have no
    noise, so one strongly changed pixel is a change there."""
    if exact:
        return pixels > 0
    if lossless and strong > 0:
        return True
    if pixels < MIN_CLUSTER_PIXELS:
        return False
    return strong >= MIN_STRONG_PIXELS or pixels >= WEAK_CLUSTER_PIXELS
