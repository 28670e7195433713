"""The diff scan: one pass over both inputs' strips along an alignment (``Scan``, one loop
over strips), comparing them pixel by pixel under the pair's rules (``Rules``: boxes left
out, match levels, and ``handler.pixels``' colour distance and anti-aliasing tests) and
keeping only what survives a strip (``Scanned``): the change map of A, the content of each
band one image has alone and, in pass 1, the row signatures (``handler.align.Profiles``) and
the strips left for the alignment. Changed cells' content is looked for nearby in B (a local
move). ``handler.detect`` decides which passes run (its docstring tells the whole stage).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from handler import pixels as px
from handler.align import Alignment, Band, Profiles, moved_rows, rows_in_place
from handler.config import IgnoreRegion, MatchLevel, MatchRegion
from handler.deadline import Deadline
from handler.decode import KEEP_PIXELS, Stream
from handler.regions import BLOCK, CONTENT_TOLERANCE, BandContent, ChangeMap, Geometry, Levels
from handler.vips import release_freed_memory

#: Rows of context above and below a strip: the anti-aliasing tests' 3 x 3 neighbourhoods.
#: (pixelmatch's "many siblings" test looks one pixel further; at a strip's first and last
#: rows it counts the siblings the strip holds. Two rows of context cost the 100 MP pair
#: ~11 MB of peak memory: a strip's buffers no longer fit the allocator's reuse.)
CONTEXT = 1
#: Cells whose content is looked for nearby in B, per pass, and per strip (a strip with more
#: changed cells than that is not a local move: the alignment's business).
MAX_MOVE_CELLS = 256
MAX_MOVE_CELLS_PER_STRIP = 24
#: A strip in which at least this share of the pixels changed colour is classified without the
#: anti-aliasing test (it would spare only its few edges, at the cost of most of the time).
MASSIVE_SHARE = 0.3
#: Strips of pass 1 whose moved rows are looked for everywhere (after these, only at offsets
#: found before): a strip that changed in place costs a search, and there may be many.
MAX_OFFSET_SEARCHES = 16
#: Pass 1 strips with at least this share of pixels differing wait to be classified until it
#: is known whether their rows moved (classifying a moved page costs more than aligning it),
#: within HELD_BYTES of held pixels.
HOLD_SHARE = 0.05
HELD_BYTES = 2 << 20
#: How far from a one-image band its reference row (the page's background) is looked for.
REFERENCE_ROWS = 32
#: Strips hold about this many pixels per image (4 bytes each).
_STRIP_PIXELS = 1 << 16
#: Differing pixels classified at once (bounds the temporary arrays to a few MB).
_CHUNK = 8192
#: Decoded bytes (A and B) after which libvips' freed strip buffers are handed back: in the
#: first pass, and in the aligned pass (measured on the 100 MP pair from a moved camera: its
#: allocations grow the heap faster, 145 -> 134 MB peak when handed back twice as often).
_TRIM_EVERY_BYTES = 8 << 20
_TRIM_EVERY_BYTES_ALIGNED = 4 << 20
#: Pixel rules per level (``Rules.codes``).
_NORMAL, _EXACT, _COLOURS = 0, 1, 2


@dataclass(frozen=True)
class _Colour:
    """Per differing pixel: pixelmatch's colour distance, the same on white, the change of
    opacity (0..255)."""

    delta: NDArray[np.float32]
    on_white: NDArray[np.float32]
    #: None where both are opaque everywhere.
    opacity: NDArray[np.int16] | None


@dataclass(frozen=True)
class Rules:
    """What counts as changed where: boxes left out (``ignore_regions`` and ``ignore`` level
    boxes), boxes at another level, the pair's level; all in A's work pixels."""

    ignore: tuple[tuple[int, int, int, int], ...]
    levels: Levels
    lossless: bool
    width_a: int

    @classmethod
    def of(
        cls,
        ignore: Sequence[IgnoreRegion],
        regions: Sequence[MatchRegion],
        level: MatchLevel,
        geometry: Geometry,
    ) -> Rules:
        to_work = (
            geometry.work_a[0] / geometry.size_a[0],
            geometry.work_a[1] / geometry.size_a[1],
        )
        left_out = [_scale_box((r.x, r.y, r.width, r.height), to_work) for r in ignore]
        boxes = []
        for region in regions:
            box = _scale_box((region.x, region.y, region.width, region.height), to_work)
            if region.match_level == "ignore":
                left_out.append(box)
            else:
                boxes.append((box, str(region.match_level)))
        return cls(
            tuple(left_out), Levels(level, tuple(boxes)), geometry.lossless, geometry.work_a[0]
        )

    def kept(self, xs: px.Index, ys: px.Index) -> NDArray[np.bool_]:
        hit = np.zeros(len(xs), dtype=bool)
        for x0, y0, x1, y1 in self.ignore:
            hit |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        return ~hit

    def codes(self, xs: px.Index, ys: px.Index) -> NDArray[np.int8]:
        """The pixel rule of each pixel's level: normal, exact or colours ignored."""
        code = {"exact": _EXACT, "ignore_colors": _COLOURS}
        out = np.full(len(xs), code.get(self.levels.level, _NORMAL), np.int8)
        for (x0, y0, x1, y1), level in self.levels.boxes:
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            out[inside] = code.get(level, _NORMAL)
        return out

    def colour(self, a: px.Where, b: px.Where, xs: px.Index, ys: px.Index) -> _Colour:
        """The colour distance of each differing pixel (at A's work pixels ``xs``, ``ys``),
        the same on white (``handler.pixels.colour_delta``), and its change of opacity."""
        pa, pb = a.pixels(), b.pixels()
        see_through = px.translucent(pa, pb)
        bg = px.background(ys, xs, self.width_a) if see_through.any() else None
        delta, on_white = px.colour_delta(pa, pb, bg)
        if bg is None:  # all opaque: nothing more to keep
            return _Colour(delta, on_white, None)
        opacity = np.abs(pa[:, 3].astype(np.int16) - pb[:, 3].astype(np.int16))
        return _Colour(delta, on_white, opacity)

    def classify(
        self,
        a: px.Where,
        b: px.Where,
        xs: px.Index,
        ys: px.Index,
        colour: _Colour,
        *,
        rough: bool,
    ) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]:
        """Changed, strong, transparency-only and judged-exactly, per differing pixel, from
        its ``colour`` distances; ``rough``: without the anti-aliasing test (a strip that
        changed almost everywhere: the test would only spare its few edge pixels)."""
        delta, on_white = colour.delta, colour.on_white
        changed = delta > px.MAX_DELTA
        codes = self.codes(xs, ys)
        smoothing = np.flatnonzero(changed & (codes != _EXACT) & (not rough))
        if len(smoothing):
            smooth = px.antialiased(
                a.subset(smoothing), b.subset(smoothing), exact_siblings=self.lossless
            )
            changed[smoothing[smooth]] = False
        recoloured = np.flatnonzero(changed & (codes == _COLOURS))
        if len(recoloured):
            same = ~px.structure_changed(a.subset(recoloured), b.subset(recoloured))
            changed[recoloured[same]] = False
        strong = changed & (delta > px.STRONG_DELTA)
        transparency = np.zeros_like(changed)
        if colour.opacity is not None:
            opacity = colour.opacity > px.ALPHA_THRESHOLD
            transparency = changed & opacity & (on_white <= px.MAX_DELTA)
        return changed, strong, transparency, changed & (codes == _EXACT)


@dataclass(frozen=True)
class _Step:
    """One strip of one band: rows ``top:bottom`` of A (matched, removed) or of B (inserted)."""

    band: Band
    top: int
    bottom: int

    def rows_a(self) -> tuple[int, int] | None:
        return None if self.band.kind == "inserted" else (self.top, self.bottom)

    def rows_b(self) -> tuple[int, int] | None:
        if self.band.kind == "removed":
            return None
        shift = self.band.shift
        return (self.top + shift, self.bottom + shift)


def _steps(alignment: Alignment, rows: int, start: int) -> Iterator[_Step]:
    """Every band's rows in strips of ``rows`` (on a grid of ``rows`` in the band's image),
    top to bottom in both images; matched rows of A above ``start`` are skipped."""
    for band in alignment.bands:
        span = band.b if band.kind == "inserted" else band.a
        assert span is not None
        top, bottom = span
        if band.kind == "matched":
            top = max(top, start)
        while top < bottom:
            end = min(bottom, (top // rows + 1) * rows)
            yield _Step(band, top, end)
            top = end


@dataclass(frozen=True)
class _Held:
    """A matched strip waiting to be classified: its pixels (with their first rows), which of
    them differ, and the first column compared."""

    step: _Step
    strip_a: tuple[NDArray[np.uint8], int]
    strip_b: tuple[NDArray[np.uint8], int]
    differs: NDArray[np.bool_]
    left: int

    @property
    def nbytes(self) -> int:
        return self.strip_a[0].nbytes + self.strip_b[0].nbytes + self.differs.nbytes


@dataclass
class Scanned:
    """What a pass leaves: the change map of A, the content of each one-image band, and (pass
    1) the strips of rows left unclassified because their content moved (``deferred``)."""

    cells: ChangeMap
    contents: list[BandContent]
    deferred: list[tuple[int, int]]
    height: int
    #: Pass 1: strips the same in both images whose signatures wait (``Scan``), and their
    #: first rows.
    unsigned: list[tuple[int, NDArray[np.uint8]]] = field(default_factory=list)

    def deferred_rows(self) -> int:
        return sum(bottom - top for top, bottom in self.deferred)


def sign_rows(
    profiles: tuple[Profiles, Profiles], same: list[tuple[int, NDArray[np.uint8]]]
) -> None:
    """Both images' signatures of strips that are pixel for pixel the same in both (each
    given by its first row and A's pixels): in any order, as the profiles only add up."""
    profile_a, profile_b = profiles
    for top, rows in same:
        columns = profile_a.add(rows[..., 1], top)
        profile_b.repeat(profile_a, rows[..., 1], top, columns)


class Scan:
    """One pass over both inputs along ``alignment`` (see the module docstring): ONE loop over
    strips; over KEEP_PIXELS, B's strip decoded on a second thread while A's is decoded on
    this one (each decoder is single-threaded and libvips releases the GIL). Smaller inputs
    are decoded on this thread, one strip after the other: a 1 MP strip decodes in less time
    than handing it over costs, and pairs side by side keep the cores busy (measured: ~13 %
    more pairs a second at concurrency 2 on 2 cores, one pair alone no slower).

    Pass 1 (``profiles`` given) fills the row signatures and leaves a strip unclassified when
    its rows are rows of the other image at another height (``align.moved_rows``): classifying
    a page whose content moved down costs more than the alignment that explains it. Over
    inputs kept as they pass (small ones, as wide as each other), the signatures of strips
    that are the same in both wait while every strip so far was (``unsigned``): a pair that
    stays the same (one picture encoded twice) needs none; the first strip that differs, or
    the end of a pass that leaves something to align, signs them.
    ``reuse``: a change map of A and the row above which it stands (on the cell grid)."""

    def __init__(
        self,
        streams: tuple[Stream, Stream],
        alignment: Alignment,
        rules: Rules,
        profiles: tuple[Profiles, Profiles] | None,
        *,
        reuse: tuple[ChangeMap, int] | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.a, self.b = streams
        self.deadline = deadline
        self.alignment = alignment
        self.rules = rules
        self.profiles = profiles
        self.cells = ChangeMap.empty((self.a.width, self.a.height))
        self.contents = {
            band: BandContent(band, (self.a if band.kind == "removed" else self.b).width)
            for band in alignment.bands
            if band.kind != "matched"
        }
        self.start = 0
        if reuse is not None:
            self.start = max(0, (reuse[1] - CONTEXT) // BLOCK * BLOCK)
            self.cells.take_rows(reuse[0], self.start // BLOCK)
        self.deferred: list[tuple[int, int]] = []
        self._held: list[_Held] = []
        self._read = 0
        self._offsets: list[int] = []
        self._searches = MAX_OFFSET_SEARCHES
        self._move_budget = MAX_MOVE_CELLS
        waits = profiles is not None and self.a.width == self.b.width and alignment.dx == 0
        waits = waits and self.a.keeping and self.b.keeping
        self._unsigned: list[tuple[int, NDArray[np.uint8]]] | None = [] if waits else None
        # Small inputs' strips are kept or soon gone, and ``detect`` trims once at its end.
        self._large = max(self.a.width * self.a.height, self.b.width * self.b.height) > KEEP_PIXELS
        every = _TRIM_EVERY_BYTES if reuse is None else _TRIM_EVERY_BYTES_ALIGNED
        self._trim_every = every if self._large else None

    def run(self) -> Scanned:
        width = max(self.a.width, self.b.width)
        rows = max(BLOCK, (_STRIP_PIXELS // width) // BLOCK * BLOCK)
        decoded = 0
        with ExitStack() as stack:
            helper = None
            if self._large:
                helper = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="detect"))
            for step in _steps(self.alignment, rows, self.start):
                if self.deadline is not None:
                    self.deadline.check()
                span_a, span_b = step.rows_a(), step.rows_b()
                pending = helper.submit(_context, self.b, span_b) if helper and span_b else None
                strip_a = _context(self.a, span_a) if span_a else None
                if pending is not None:
                    strip_b: tuple[NDArray[np.uint8], int] | None = pending.result()
                else:
                    strip_b = _context(self.b, span_b) if span_b else None
                self._take(step, strip_a, strip_b)
                decoded += sum(s[0].nbytes for s in (strip_a, strip_b) if s is not None)
                if self._trim_every is not None and decoded >= self._trim_every:
                    release_freed_memory()
                    decoded = 0
            self._settle(final=True)
        contents = [self.contents[band] for band in self.contents]
        unsigned = self._unsigned or []
        return Scanned(self.cells, contents, sorted(self.deferred), self.a.height, unsigned)

    def _take(
        self,
        step: _Step,
        strip_a: tuple[NDArray[np.uint8], int] | None,
        strip_b: tuple[NDArray[np.uint8], int] | None,
    ) -> None:
        kind = step.band.kind
        if kind == "matched":
            assert strip_a is not None and strip_b is not None
            self._matched(step, strip_a, strip_b)
            return
        stream, strip = (self.a, strip_a) if kind == "removed" else (self.b, strip_b)
        assert strip is not None
        pixels, first = strip
        core = pixels[step.top - first : step.bottom - first]
        self.contents[step.band].add(core, step.top)
        self._reference(step, stream)
        if self.profiles is not None:
            self._sign_waiting()
            self.profiles[0 if kind == "removed" else 1].add(core[..., 1], step.top)

    def _reference(self, step: _Step, stream: Stream) -> None:
        """The row outside a one-image band its content is told from: the nearest uniform row
        (page background) within REFERENCE_ROWS above it (below, for a band at the top), else
        the row next to it. Read once, at the band's first (last) strip."""
        content = self.contents[step.band]
        top, bottom = content.rows
        if top > 0 and step.top == top:
            rows, _ = _context(stream, (top, top), REFERENCE_ROWS, 0)
            content.reference = _uniform_row(rows[::-1])
        elif top == 0 and step.bottom == bottom < stream.height:
            rows, _ = _context(stream, (bottom, bottom), 0, REFERENCE_ROWS)
            content.reference = _uniform_row(rows)

    def _matched(
        self,
        step: _Step,
        strip_a: tuple[NDArray[np.uint8], int],
        strip_b: tuple[NDArray[np.uint8], int],
    ) -> None:
        """Compare rows ``step.top:step.bottom`` of A with B's along the band (and ``dx``)."""
        (a, first_a), (b, first_b) = strip_a, strip_b
        dx, shift, count = self.alignment.dx, step.band.shift, step.bottom - step.top
        off_a, off_b = step.top - first_a, step.top + shift - first_b
        left, right = max(0, -dx), min(self.a.width, self.b.width - dx)
        if left >= right:
            return
        core_a = a.view(np.uint32)[off_a : off_a + count, left:right, 0]
        core_b = b.view(np.uint32)[off_b : off_b + count, left + dx : right + dx, 0]
        differs = core_a != core_b
        end = min(right, self.b.width)
        if dx and end > left and differs.any():
            # What stayed where it was while the rest moved sideways (a header, a rule
            # across the page) has not changed either.
            in_place = b.view(np.uint32)[off_b : off_b + count, left:end, 0]
            differs[:, : end - left] &= core_a[:, : end - left] != in_place
        equal = not differs.any()  # most strips of a screenshot: cheaper than nonzero()
        if self.profiles is None:
            if not equal:
                self._changes(_Held(step, strip_a, strip_b, differs, left), moves=True)
            return
        rows_a = a[off_a : off_a + count]
        if equal and self._unsigned is not None:
            self._unsigned.append((step.top, rows_a))  # (B's rows are these)
        else:
            self._sign_waiting()
            self._profile(step, rows_a, b[off_b : off_b + count], equal)
        self._read = step.bottom
        if not equal:
            held = _Held(step, strip_a, strip_b, differs, left)
            span = (step.top, step.bottom)
            # Cheap to classify, or changed where it is: no need to know whether it moved.
            if differs.mean() < HOLD_SHARE or rows_in_place(*self.profiles, span):
                self._changes(held, moves=True)
            elif self._moved(step, search=True):
                self.deferred.append(span)
            else:
                self._held.append(held)
        self._settle()

    def _sign_waiting(self) -> None:
        """Sign the strips that waited; from now on none waits."""
        if self._unsigned is not None and self.profiles is not None:
            sign_rows(self.profiles, self._unsigned)
        self._unsigned = None

    def _moved(self, step: _Step, *, search: bool) -> bool:
        """Pass 1: are this strip's rows the other image's rows at another height?"""
        assert self.profiles is not None
        span, read = (step.top, step.bottom), (self._read, self._read)
        search = search and self._searches > 0
        offset = moved_rows(*self.profiles, span, read, self._offsets, search)
        if offset is None:
            self._searches -= search
            return False
        if offset not in self._offsets:
            self._offsets.insert(0, offset)
            del self._offsets[4:]
        return True

    def _settle(self, *, final: bool = False) -> None:
        """Held strips whose rows turned out to have moved (their match was further down) are
        left for the alignment; the oldest are classified once the held pixels pass
        HELD_BYTES (or at the end), too far back for the move test's wider window."""
        kept = []
        for held in self._held:
            if self._offsets and self._moved(held.step, search=False):
                self.deferred.append((held.step.top, held.step.bottom))
            else:
                kept.append(held)
        while kept and (final or sum(h.nbytes for h in kept) > HELD_BYTES):
            self._changes(kept.pop(0), moves=False)
        self._held = kept

    def _profile(
        self, step: _Step, core_a: NDArray[np.uint8], core_b: NDArray[np.uint8], equal: bool
    ) -> None:
        assert self.profiles is not None
        profile_a, profile_b = self.profiles
        columns = profile_a.add(core_a[..., 1], step.top)
        top_b = step.top + step.band.shift
        same = equal and self.a.width == self.b.width and self.alignment.dx == 0
        if same:
            profile_b.repeat(profile_a, core_a[..., 1], step.top, columns)
        else:
            profile_b.add(core_b[..., 1], top_b)

    def _changes(self, held: _Held, *, moves: bool) -> None:
        """Classify the differing pixels of a matched strip and add the changed to the map;
        with ``moves``, look for the changed cells' content nearby (``_moves``)."""
        step, left = held.step, held.left
        ys, xs = (found.astype(np.int32) for found in np.nonzero(held.differs))
        image_ys, image_xs = ys + step.top, xs + left
        if self.rules.ignore:
            keep = self.rules.kept(image_xs, image_ys)
            ys, xs, image_ys, image_xs = ys[keep], xs[keep], image_ys[keep], image_xs[keep]
        if not len(ys):
            return
        cell_top = step.top // BLOCK
        per_row = np.bincount(image_ys // BLOCK - cell_top)
        self.cells.differing[cell_top : cell_top + len(per_row)] += per_row
        # In chunks: a photo re-encode differs in almost every pixel, and the neighbourhood
        # gathers cost a few hundred bytes per candidate. The colours first, for all: a strip
        # that changed almost everywhere skips the anti-aliasing test (``rough``).
        chunks = [slice(start, start + _CHUNK) for start in range(0, len(ys), _CHUNK)]
        colours = [
            self.rules.colour(
                *self._where(held, ys[part], xs[part]), image_xs[part], image_ys[part]
            )
            for part in chunks
        ]
        candidates = sum(int((colour.delta > px.MAX_DELTA).sum()) for colour in colours)
        rough = candidates >= MASSIVE_SHARE * held.differs.size
        touched: list[NDArray[np.intp]] = []
        for part, colour in zip(chunks, colours, strict=True):
            x, y = image_xs[part], image_ys[part]
            where_a, where_b = self._where(held, ys[part], xs[part])
            changed, strong, transparency, exact = self.rules.classify(
                where_a, where_b, x, y, colour, rough=rough
            )
            if not changed.any():
                continue
            x, y = x[changed], y[changed]
            self.cells.add(x, y, strong[changed], exact[changed], tight=not rough)
            seen = np.bincount(y[transparency[changed]] // BLOCK - cell_top)
            self.cells.transparency[cell_top : cell_top + len(seen)] += seen
            touched.append((y // BLOCK) * self.cells.count.shape[1] + x // BLOCK)
        if touched and moves and not rough:
            self._moves(step, _distinct(np.concatenate(touched)))

    def _where(self, held: _Held, ys: px.Index, xs: px.Index) -> tuple[px.Where, px.Where]:
        """Pixels of a held strip (rows ``ys`` of the step, columns ``xs`` from ``held.left``)
        in A's strip and in B's, along the alignment."""
        (a, first_a), (b, first_b) = held.strip_a, held.strip_b
        step, left = held.step, held.left
        off_a, off_b = step.top - first_a, step.top + step.band.shift - first_b
        return (
            px.Where(a, ys + off_a, xs + left, first_a, self.a.size),
            px.Where(b, ys + off_b, xs + left + self.alignment.dx, first_b, self.b.size),
        )

    def _moves(self, step: _Step, cells: NDArray[np.intp]) -> None:
        """Look for each changed cell's content near its place in B (a local move)."""
        if len(cells) > MAX_MOVE_CELLS_PER_STRIP or self._move_budget <= 0:
            return
        cells = cells[: self._move_budget]
        self._move_budget -= len(cells)
        radius = px.MOVE_RADIUS
        shift, dx = step.band.shift, self.alignment.dx
        window_a = _context(self.a, (step.top, step.bottom), radius)
        window_b = _context(self.b, (step.top + shift, step.bottom + shift), 0)
        columns = self.cells.count.shape[1]
        for cell in cells.tolist():
            row, column = divmod(cell, columns)
            found = _cell_shift(
                window_a, window_b, row, column, (step.top, step.bottom), shift, dx, radius
            )
            self.cells.record_move((row, column), found)


def _distinct(values: NDArray[np.intp]) -> NDArray[np.intp]:
    """The distinct values, sorted (``np.unique`` would import ``numpy.ma``, ~2 MB, while
    both decoders are at work)."""
    ordered = np.sort(values)
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return ordered[keep]


def _cell_shift(
    window_a: tuple[NDArray[np.uint8], int],
    window_b: tuple[NDArray[np.uint8], int],
    row: int,
    column: int,
    rows: tuple[int, int],
    shift: int,
    dx: int,
    radius: int,
) -> px.Shift:
    """Where the part of cell (row, column) inside ``rows`` lies in B around its place."""
    (a, first_a), (b, first_b) = window_a, window_b
    top, bottom = max(rows[0], row * BLOCK), min(rows[1], (row + 1) * BLOCK)
    left, right = column * BLOCK, (column + 1) * BLOCK
    a_top, a_left = top - radius - first_a, left - radius
    a_bottom, a_right = bottom + radius - first_a, right + radius
    b_top, b_left = top + shift - first_b, left + dx
    if a_top < 0 or a_left < 0 or a_bottom > len(a) or a_right > a.shape[1]:
        return None
    if b_top < 0 or b_left < 0 or b_top + bottom - top > len(b) or b_left + BLOCK > b.shape[1]:
        return None
    block = b[b_top : b_top + bottom - top, b_left : b_left + BLOCK]
    return px.local_shift(a[a_top:a_bottom, a_left:a_right], block, radius)


def _context(
    stream: Stream, span: tuple[int, int], above: int = CONTEXT, below: int | None = None
) -> tuple[NDArray[np.uint8], int]:
    """Rows ``span`` of the stream with ``above`` rows more above and ``below`` (default: as
    many) below, where the image has them, and the first row's index."""
    below = above if below is None else below
    first, last = max(0, span[0] - above), min(stream.height, span[1] + below)
    return stream.strip(first, last), first


def _uniform_row(rows: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
    """The first of ``rows`` whose pixels are all alike (within CONTENT_TOLERANCE), else the
    first row; None when there are no rows."""
    if not len(rows):
        return None
    spread = (rows.max(axis=1).astype(np.int16) - rows.min(axis=1)).max(axis=1)
    flat = np.flatnonzero(spread <= CONTENT_TOLERANCE)
    return np.array(rows[int(flat[0]) if len(flat) else 0])


def _scale_box(
    box: tuple[int, int, int, int], factor: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(x, y, width, height) -> (x0, y0, x1, y1) scaled, rounded outwards."""
    x, y, width, height = box
    return (
        int(x * factor[0]),
        int(y * factor[1]),
        int(np.ceil((x + width) * factor[0])),
        int(np.ceil((y + height) * factor[1])),
    )
