"""Change detection at native resolution, streamed: where do A and B really differ, and what
happened there (changed, added, removed, moved)?

The comparators work on downsized images, where a changed word on a long page is invisible.
This stage compares the inputs pixel by pixel at their own resolution without ever holding a
decoded image: libvips decodes both in strips (sequential access, its operation cache off),
numpy looks at one strip at a time, and what survives a strip is small: a map of BLOCK x BLOCK
cells of A (``handler.regions.ChangeMap``, 8 bytes a cell) and each row's signature
(``handler.align.Profiles``, 64 bytes a row), so memory does not grow with the pixel count.

**Sizes.** A B of another size is a rescaled copy only when both its sides differ from A's in
one proportion (within ``ASPECT_TOLERANCE``, or a pixel of rounding): both are then compared at
the smaller size. Otherwise each image is compared at its own size, and what one has beyond
the other (rows, columns) is itself a difference: a size change never passes silently.

**Two passes at most, each one loop over strips:**

1. the images as they lie, top-left corners together; per pixel the rules of ``handler.pixels``
   (pixelmatch's colour distance with transparency, anti-aliasing in either image, the match
   levels); on the way the row signatures and column profiles of both images and, where asked
   (``shrunk_sizes``), the copies the prepared images are made from: a small input's (up to
   ``KEEP_PIXELS``) from its pixels kept as they pass, which then also serve pass 2 and the
   crops (each input decoded once), a larger one's resized in the stream itself;
2. only when pass 1 found a change (or the sizes differ) and the signatures say the content
   moved (``handler.align``: bands inserted or removed, a global horizontal offset): the same
   comparison along that alignment, each matched band at its own vertical shift, the bands one
   image has alone taken as added or removed content. Its account replaces pass 1's when it
   leaves fewer rows unexplained; rows above the first place where the alignment departs from
   the identity are taken from pass 1, not compared again. Nothing that explains the pair
   better (two different scenes, a rotation): pass 1's account stands, as before alignment.

Per changed cell (a few hundred at most, in strips with few of them) its content is looked for
nearby in B (``handler.pixels.local_shift``): content that reappears whole at one small shift
moved. ``handler.regions`` turns the map into regions with a kind and a box in each image.

Sensitivity follows the inputs: between lossless inputs compared at native size one strongly
changed pixel is a change; lossy inputs (or a rescaled copy) need a cluster of them.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, fields

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from handler import pixels as px
from handler import splice
from handler.align import Alignment, Band, Profiles, align, moved_rows, rows_in_place
from handler.config import IgnoreRegion, MatchLevel, MatchRegion
from handler.deadline import Deadline
from handler.errors import ImageTooLarge, InvalidImage, InvalidManifest
from handler.regions import (
    BLOCK,
    CONTENT_TOLERANCE,
    MAX_REGIONS,
    REGION_PAD,
    BandContent,
    ChangeMap,
    Findings,
    Geometry,
    Levels,
    findings,
)
from handler.result import Box
from handler.vips import open_header, pyvips, release_after, release_freed_memory

__all__ = [
    "BLOCK",
    "CROP_SIDE",
    "KEEP_PIXELS",
    "MAX_CROPS",
    "MAX_REGIONS",
    "REGION_PAD",
    "Detection",
    "RegionCrop",
    "cut_crops",
    "detect",
    "image_size",
]

#: Two sizes are one picture rescaled when width and height scale alike within this share.
ASPECT_TOLERANCE = 0.01
#: Crops of the largest regions: how many, their longest side, and context around a region.
MAX_CROPS = 4
CROP_SIDE = 448
CROP_MARGIN = 24
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
#: Source rows shrunk at once: each fetch from libvips costs more than the rows it shrinks.
_SHRINK_ROWS = 128
#: Source rows per shrunk row beyond which the copy is not made on the way: the resize kernel
#: reaches ~3 of them up and down, and libvips keeps only a few hundred recent rows.
_MAX_SHRINK = 32
#: Inputs up to this many pixels keep their native pixels as they pass (4 bytes a pixel):
#: their resized copy is made from them, pass 2 reads them instead of decoding again, and
#: ``cut_crops`` cuts from them where asked (``keep_pixels``).
KEEP_PIXELS = 4_000_000
#: Decoded bytes (A and B) after which libvips' freed strip buffers are handed back: in the
#: first pass, and in the aligned pass (measured on the 100 MP pair from a moved camera: its
#: allocations grow the heap faster, 145 -> 134 MB peak when handed back twice as often).
_TRIM_EVERY_BYTES = 8 << 20
_TRIM_EVERY_BYTES_ALIGNED = 4 << 20
#: Pixel rules per level (``_Rules.codes``).
_NORMAL, _EXACT, _COLOURS = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class Detection(Findings):
    """What changed between A and B at native resolution: the findings (``regions`` say what
    happened where — kind, box in A and in B, shift — largest first; ``region_pixels[i]`` is
    what ``regions[i]`` holds: changed pixels, or the area of added and removed content;
    ``alignment`` how B lines up with A when content moved, None as it lies; ``differs``: the
    pair is different under its match levels), and the sizes: ``work_size`` is the resolution
    A was compared at (its own, or the smaller image's for a rescaled copy).
    """

    size_a: tuple[int, int]
    size_b: tuple[int, int]
    work_size: tuple[int, int]
    #: Whether the match levels ignore anything (``ignore_moves``, ``ignore_colors``, a box
    #: at one of those or at ``ignore``).
    lenient: bool = False
    #: The pixels changed_percent is a share of: the larger image's, as compared.
    compared_pixels: int = 0
    #: The inputs resized on the way to ``shrunk_sizes``, where ``detect`` was asked for them.
    shrunk: tuple[Image.Image | None, Image.Image | None] = field(
        default=(None, None), compare=False, repr=False
    )
    #: The inputs' native pixels (RGB on white + opacity), where ``detect`` kept them
    #: (``keep_pixels``).
    pixels: tuple[NDArray[np.uint8] | None, NDArray[np.uint8] | None] = field(
        default=(None, None), compare=False, repr=False
    )

    @property
    def changed_percent(self) -> float:
        compared = self.compared_pixels or self.work_size[0] * self.work_size[1]
        return min(100.0, 100.0 * self.changed_pixels / compared)

    @property
    def identical(self) -> bool:
        """Same size, nothing moved and not one pixel different (outside ignored boxes)."""
        return self.size_a == self.size_b and self.differing_pixels == 0 and self.alignment is None

    @property
    def transparency_only(self) -> bool:
        return self.changed_pixels > 0 and self.transparency_pixels >= self.changed_pixels

    def metrics(self) -> dict[str, float]:
        return {
            "changed_pixels": float(self.changed_pixels),
            "changed_percent": round(self.changed_percent, 4),
            "moved_pixels": float(self.moved_pixels),
            "transparency_pixels": float(self.transparency_pixels),
            "pixel_identical": float(self.identical),
        }


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Display-oriented (EXIF applied) size from the header; the pixel budget is checked."""
    image = _open(data, max_pixels)
    return _display_size(image)


def detect(
    data_a: bytes,
    data_b: bytes,
    *,
    max_pixels: int,
    ignore: Sequence[IgnoreRegion] = (),
    shrunk_sizes: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None),
    keep_pixels: bool = False,
    match_level: MatchLevel = "strict",
    regions: Sequence[MatchRegion] = (),
    deadline: Deadline | None = None,
) -> Detection:
    """Compare two encoded images at native resolution (see the module docstring).

    ``shrunk_sizes[i]`` asks for a copy of input i resized to that size (display-oriented RGB
    flattened on white), made while the input streams past (``Detection.shrunk``): the prepared
    image, so the input is decoded once. Only an input compared at its own size gets one.
    ``keep_pixels`` keeps such inputs' native pixels, up to ``KEEP_PIXELS`` each
    (``Detection.pixels``): ``cut_crops`` then cuts from them instead of decoding again.
    ``match_level`` and ``regions`` (boxes in A's pixels at their own level, or ignored) set
    what counts as a difference.

    Raises ``InvalidImage`` (``details["input"]`` = "a"/"b") for undecodable inputs,
    ``InvalidManifest`` for an ignore or level box outside image A, and ``ComparisonTimeout``
    once ``deadline`` has passed (checked once per strip, in every pass).
    """
    size_a = _checked_size(data_a, max_pixels, "a")
    size_b = _checked_size(data_b, max_pixels, "b")
    check_ignore_regions(ignore, size_a)
    check_match_regions(regions, size_a)
    geometry = _geometry(data_a, data_b, size_a, size_b)
    rules = _Rules.of(ignore, regions, match_level, geometry)
    (width_a, height_a), (width_b, height_b) = geometry.work_a, geometry.work_b
    try:
        result = _detected(
            (data_a, data_b), geometry, rules, max_pixels, shrunk_sizes, keep_pixels, deadline
        )
    except pyvips.Error as exc:
        raise InvalidImage(f"cannot decode the image: {_first_line(exc)}") from exc
    finally:
        # The decoders are gone: what comes next starts lower (small pairs share a trim).
        release_after(4 * (width_a * height_a + width_b * height_b))
    found, shrunk, kept = result
    return Detection(
        **{item.name: getattr(found, item.name) for item in fields(Findings)},
        size_a=size_a,
        size_b=size_b,
        work_size=geometry.work_a,
        lenient=any(
            level in ("ignore_moves", "ignore_colors", "ignore")
            for level in (match_level, *(region.match_level for region in regions))
        ),
        compared_pixels=max(width_a * height_a, width_b * height_b),
        shrunk=shrunk,
        pixels=kept if keep_pixels else (None, None),
    )


#: Both inputs, A's then B's: their encoded bytes, or their native pixels kept in pass 1.
_Sources = tuple[bytes | NDArray[np.uint8], bytes | NDArray[np.uint8]]
_Pair = tuple[Image.Image | None, Image.Image | None]
_Kept = tuple[NDArray[np.uint8] | None, NDArray[np.uint8] | None]
#: The sizes of the copies asked for (``shrunk_sizes``).
_Wanted = tuple[tuple[int, int] | None, tuple[int, int] | None]


def _detected(
    data: tuple[bytes, bytes],
    geometry: Geometry,
    rules: _Rules,
    max_pixels: int,
    shrunk_sizes: _Wanted,
    keep: bool,
    deadline: Deadline | None,
) -> tuple[Findings, _Pair, _Kept]:
    """Pass 1; pass 2 where an alignment may explain the pair better (module docstring), or
    where pass 1 left strips for it that the alignment did not explain after all. Pass 2 reads
    the small inputs' pixels pass 1 kept, and decodes only the others again."""
    signed = min(geometry.work_a[0], geometry.work_b[0])
    profiles = (Profiles(*geometry.work_a, signed), Profiles(*geometry.work_b, signed))
    as_laid = _as_laid(geometry.work_a, geometry.work_b)
    streams = _streams(data, geometry, max_pixels, shrunk_sizes, keep)
    first = _Scan(streams, as_laid, rules, profiles, deadline=deadline).run()
    shrunk = _copies(streams, first, rules, geometry, shrunk_sizes)
    kept = (streams[0].kept(), streams[1].kept())
    del streams
    result = findings(first.cells, first.contents, as_laid, geometry, rules.levels)
    if not result.regions and not first.deferred and geometry.work_a == geometry.work_b:
        return result, shrunk, kept
    _sign(profiles, first.unsigned)
    alignment = align(*profiles)
    del profiles
    sources: _Sources = (
        data[0] if kept[0] is None else kept[0],
        data[1] if kept[1] is None else kept[1],
    )
    if alignment is not None and alignment != as_laid:
        aligned = _again(sources, geometry, rules, max_pixels, alignment, first, deadline)
        if aligned.unexplained < result.unexplained + first.deferred_rows():
            return aligned, shrunk, kept
    if first.deferred:  # they were left for an alignment that did not explain them
        result = _again(sources, geometry, rules, max_pixels, as_laid, first, deadline)
    return result, shrunk, kept


def _copies(
    streams: tuple[_Stream, _Stream],
    first: _Scanned,
    rules: _Rules,
    geometry: Geometry,
    shrunk_sizes: _Wanted,
) -> _Pair:
    """The resized copies pass 1 made. Not one pixel differs (and none was left out): the same
    pixels resize the same, so one copy serves both (a re-encoded screenshot's pair). Where
    they differ in a few rows (one changed line), B's copy is A's with those rows resized
    again (``_Stream.shrunk``)."""
    copy_a = streams[0].shrunk()
    same = (
        not rules.ignore
        and not first.cells.differing.any()
        and not first.deferred
        and geometry.size_a == geometry.size_b == geometry.work_a == geometry.work_b
        and shrunk_sizes[0] == shrunk_sizes[1]
    )
    if same:
        return copy_a, copy_a
    return copy_a, streams[1].shrunk(alike=(streams[0].kept(), copy_a))


def _again(
    sources: _Sources,
    geometry: Geometry,
    rules: _Rules,
    max_pixels: int,
    alignment: Alignment,
    first: _Scanned,
    deadline: Deadline | None,
) -> Findings:
    """Another pass along ``alignment``, pass 1's cells kept above where it departs from the
    identity (and from the first strip pass 1 left)."""
    if any(isinstance(source, bytes) for source in sources):
        release_freed_memory()
    start = min(_departure(alignment), *(top for top, _ in first.deferred), first.height)
    streams = _streams(sources, geometry, max_pixels, (None, None), False)
    scanned = _Scan(
        streams, alignment, rules, None, reuse=(first.cells, start), deadline=deadline
    ).run()
    del streams
    return findings(scanned.cells, scanned.contents, alignment, geometry, rules.levels)


def _departure(alignment: Alignment) -> int:
    """The first row of A that ``alignment`` does not leave where it is."""
    first = alignment.bands[0]
    if alignment.dx != 0 or first.kind != "matched" or first.shift or first.a is None:
        return 0
    return first.a[1]


def _as_laid(work_a: tuple[int, int], work_b: tuple[int, int]) -> Alignment:
    """The images as they lie, top-left corners together: the shorter one's rows matched, the
    taller one's rest inserted (B) or removed (A)."""
    common = min(work_a[1], work_b[1])
    bands = [Band("matched", (0, common), (0, common))]
    if work_a[1] > common:
        bands.append(Band("removed", (common, work_a[1]), None))
    elif work_b[1] > common:
        bands.append(Band("inserted", None, (common, work_b[1])))
    return Alignment(0, tuple(bands), work_a, work_b)


def _geometry(
    data_a: bytes, data_b: bytes, size_a: tuple[int, int], size_b: tuple[int, int]
) -> Geometry:
    """Rescaled copy (both compared at the smaller size) or aligned at native sizes."""
    if _rescaled(size_a, size_b):
        work = size_a if size_a[0] * size_a[1] <= size_b[0] * size_b[1] else size_b
        return Geometry(size_a, size_b, work, work, lossless=False)
    lossless = _lossless(data_a) and _lossless(data_b)
    return Geometry(size_a, size_b, size_a, size_b, lossless=lossless)


def _rescaled(size_a: tuple[int, int], size_b: tuple[int, int]) -> bool:
    """Both sides differ, in one proportion: width and height scale alike within
    ASPECT_TOLERANCE, or within a pixel of rounding."""
    (width_a, height_a), (width_b, height_b) = size_a, size_b
    if width_a == width_b or height_a == height_b:
        return False
    scale_x, scale_y = width_b / width_a, height_b / height_a
    if abs(scale_x / scale_y - 1.0) <= ASPECT_TOLERANCE:
        return True
    # A 1001 x 667 picture halved is 500 x 333 or 501 x 334: the same within one pixel.
    return abs(width_b - width_a * scale_y) <= 1.0 or abs(height_b - height_a * scale_x) <= 1.0


def _lossless(data: bytes) -> bool:
    """PNG, GIF, BMP, TIFF and lossless WebP hold every pixel as drawn (no coding noise)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:4] in (b"GIF8",) or data[:2] == b"BM":
        return True
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return b"VP8L" in data[12:64] and b"VP8 " not in data[12:64]
    return False


def _streams(
    sources: _Sources,
    geometry: Geometry,
    max_pixels: int,
    shrunk_sizes: _Wanted,
    keep: bool,
) -> tuple[_Stream, _Stream]:
    """Both inputs at their work sizes: decoding lazily (a resized copy where asked for one of
    an input compared at its own size), or read from the pixels pass 1 kept."""
    made = []
    for which, source, size, work, wanted in (
        ("a", sources[0], geometry.size_a, geometry.work_a, shrunk_sizes[0]),
        ("b", sources[1], geometry.size_b, geometry.work_b, shrunk_sizes[1]),
    ):
        if not isinstance(source, bytes):
            made.append(_Stream(which, source))
            continue
        image, colour = _normalised(source, work, size, max_pixels)
        native = size == work
        made.append(_Stream(which, image, colour, wanted if native else None, keep=keep and native))
    return made[0], made[1]


class _Stream:
    """One input streaming past in strips, resized on the way when a copy was asked for: a
    small input (up to ``KEEP_PIXELS``) from its pixels kept as they pass (a third of the time
    of resizing in the stream), a larger one in the stream itself (bounded memory). Made from
    kept pixels (pass 2 of a small input), it reads them instead of decoding again."""

    def __init__(
        self,
        which: str,
        image: pyvips.Image | NDArray[np.uint8],
        colour: pyvips.Image | None = None,
        wanted: tuple[int, int] | None = None,
        *,
        keep: bool = False,
    ) -> None:
        """``image``: RGB on white + opacity, what is compared (or its pixels, kept before);
        ``colour``: its RGB bands; ``wanted``: the size of the copy to make; ``keep``: hold
        the native pixels for the caller (``pixels``), small inputs only."""
        self.which = which
        self._wanted = wanted
        self._small: pyvips.Region | None = None
        self._strips: list[NDArray[np.uint8]] = []
        self._kept_rows = 0
        self._kept: NDArray[np.uint8] | None = None
        self._region: pyvips.Region | None = None
        if not isinstance(image, pyvips.Image):
            self.height, self.width = image.shape[:2]
            self._kept, self._kept_rows = image, self.height
            self._keep = self._keeping = False
            return
        self.width, self.height = image.width, image.height
        small_input = self.width * self.height <= KEEP_PIXELS
        self._keep = keep and small_input
        # The strips as fetched, each from the first row not kept before (no copies).
        self._keeping = small_input and (keep or wanted is not None)
        # Held: a region does not keep alive the memory of an image made from an array.
        self._image = image
        self._region = pyvips.Region.new(image)
        if (
            wanted is not None
            and colour is not None
            and not small_input
            and self.height / wanted[1] <= _MAX_SHRINK
        ):
            small = _resized(colour, wanted)
            self._small = pyvips.Region.new(small)
            self._small_size = (small.width, small.height)
            self._small_rows: list[NDArray[np.uint8]] = []
            self._small_done = 0
            # Source rows per resized row, and how far past its own rows the kernel reaches.
            self._step = self.height / small.height
            self._reach = 4 * math.ceil(self._step) + 2

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def keeping(self) -> bool:
        """Are its strips kept as they pass (a small input whose pixels are wanted)?"""
        return self._keeping

    @property
    def pixels(self) -> NDArray[np.uint8] | None:
        """The native pixels (RGB on white + opacity), where kept for the caller (``keep``)."""
        return self.kept() if self._keep else None

    def kept(self) -> NDArray[np.uint8] | None:
        """Every row of the native pixels, where they were kept as they passed."""
        if self._kept is None and self._strips and self._kept_rows == self.height:
            self._kept = np.concatenate(self._strips)
            self._strips = []
        return self._kept

    def strip(self, first: int, last: int) -> NDArray[np.uint8]:
        """Rows ``first:last`` (RGB on white + opacity); a decoding failure names the input.
        Rows are asked for top to bottom (a row or two of overlap is fine)."""
        if self._region is None:
            assert self._kept is not None
            return self._kept[first:last]
        try:
            pixels = _fetch(self._region, first, last, self.width)
            self._shrink_above(last, final=False)
        except pyvips.Error as exc:
            raise InvalidImage(
                f"cannot decode the image: {_first_line(exc)}", details={"input": self.which}
            ) from exc
        if self._keeping and last > self._kept_rows:
            if first > self._kept_rows:  # rows skipped: nothing whole to keep after all
                self._keeping, self._strips = False, []
            else:
                self._strips.append(pixels[self._kept_rows - first :])
                self._kept_rows = last
        return pixels

    def shrunk(
        self, *, alike: tuple[NDArray[np.uint8] | None, Image.Image | None] = (None, None)
    ) -> Image.Image | None:
        """The resized copy, once every strip was read (None where none was made).

        ``alike``: the other input's kept pixels and its copy (made the same way, to the same
        size): where the two inputs differ in a few rows only, this copy is that one with
        the rows those reach resized from this input (``handler.splice``), not all of it."""
        kept = self.kept() if self._keeping else None
        if self._wanted is not None and kept is not None:
            native = pyvips.Image.new_from_memory(kept.data, self.width, self.height, 4, "uchar")
            # All four bands (taking three apart would cost a copy); Pillow drops opacity.
            small = _resized(native, self._wanted)
            spliced = _spliced(small, kept, *alike)
            return spliced if spliced is not None else _rgb(small, 0, small.height)
        if self._small is None:
            return None
        self._shrink_above(self.height, final=True)
        return Image.fromarray(np.concatenate(self._small_rows), "RGB")

    def _shrink_above(self, decoded: int, *, final: bool) -> None:
        """Resize the rows whose sources lie above ``decoded`` (still in libvips' cache of
        recent rows), in batches: each fetch costs more than the few rows it makes."""
        if self._small is None:
            return
        width, height = self._small_size
        ready = height if final else min(height, int((decoded - self._reach) / self._step))
        if ready - self._small_done >= max(1, int(_SHRINK_ROWS / self._step)) or (
            final and ready > self._small_done
        ):
            self._small_rows.append(_fetch(self._small, self._small_done, ready, width, bands=3))
            self._small_done = ready


def _rgb(image: pyvips.Image, first: int, last: int) -> Image.Image:
    """Rows ``first:last`` of a 4-band image as RGB (libvips computes only those)."""
    part = image.crop(0, first, image.width, last - first) if last - first < image.height else image
    return Image.frombytes(
        "RGB", (image.width, last - first), part.write_to_memory(), "raw", "RGBX"
    )


def _spliced(
    small: pyvips.Image,
    kept: NDArray[np.uint8],
    other_kept: NDArray[np.uint8] | None,
    other_copy: Image.Image | None,
) -> Image.Image | None:
    """``small`` (``kept`` resized) as ``other_copy`` (``other_kept`` resized the same way)
    with only the rows that ``kept`` changes computed; None where the two differ in too many
    rows to be worth it (or cannot be compared)."""
    size = (small.width, small.height)
    if other_kept is None or other_copy is None or other_copy.size != size:
        return None
    if other_kept.shape != kept.shape:
        return None
    changed = splice.differing_rows(kept, other_kept)
    if changed is None:
        return other_copy.copy()
    span = splice.output_rows(changed, len(kept), small.height)
    if span is None:
        return None
    out = other_copy.copy()
    out.paste(_rgb(small, *span), (0, span[0]))
    return out


def _resized(colour: pyvips.Image, wanted: tuple[int, int]) -> pyvips.Image:
    """``colour`` at ``wanted`` size, as thumbnails shrink: a box filter by an integer factor
    that leaves at least twice the size (libvips' resize ``gap`` 2.0, Pillow's
    ``reducing_gap``), then LANCZOS; a box filter all the way blurs text."""
    if (colour.width, colour.height) == wanted:
        return colour
    across = max(1, colour.width // (2 * wanted[0]))
    down = max(1, colour.height // (2 * wanted[1]))
    boxed = colour.shrink(across, down) if across > 1 or down > 1 else colour
    return boxed.reduce(boxed.width / wanted[0], boxed.height / wanted[1], kernel="lanczos3")


@dataclass(frozen=True)
class _Colour:
    """Per differing pixel: pixelmatch's colour distance, the same on white, the change of
    opacity (0..255)."""

    delta: NDArray[np.float32]
    on_white: NDArray[np.float32]
    #: None where both are opaque everywhere.
    opacity: NDArray[np.int16] | None


@dataclass(frozen=True)
class _Rules:
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
    ) -> _Rules:
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
class _Scanned:
    """What a pass leaves: the change map of A, the content of each one-image band, and (pass
    1) the strips of rows left unclassified because their content moved (``deferred``)."""

    cells: ChangeMap
    contents: list[BandContent]
    deferred: list[tuple[int, int]]
    height: int
    #: Pass 1: strips the same in both images whose signatures wait (``_Scan``), and their
    #: first rows.
    unsigned: list[tuple[int, NDArray[np.uint8]]] = field(default_factory=list)

    def deferred_rows(self) -> int:
        return sum(bottom - top for top, bottom in self.deferred)


def _sign(profiles: tuple[Profiles, Profiles], same: list[tuple[int, NDArray[np.uint8]]]) -> None:
    """Both images' signatures of strips that are pixel for pixel the same in both (each
    given by its first row and A's pixels): in any order, as the profiles only add up."""
    profile_a, profile_b = profiles
    for top, rows in same:
        columns = profile_a.add(rows[..., 1], top)
        profile_b.repeat(profile_a, rows[..., 1], top, columns)


class _Scan:
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
        streams: tuple[_Stream, _Stream],
        alignment: Alignment,
        rules: _Rules,
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

    def run(self) -> _Scanned:
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
        return _Scanned(self.cells, contents, sorted(self.deferred), self.a.height, unsigned)

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

    def _reference(self, step: _Step, stream: _Stream) -> None:
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
            _sign(self.profiles, self._unsigned)
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
    stream: _Stream, span: tuple[int, int], above: int = CONTEXT, below: int | None = None
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
        raise InvalidImage(f"cannot decode the image: {_first_line(exc)}") from exc
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
    image, _ = _normalised(data, size, size, max_pixels)
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
        strip = _fetch(region, top, last, size[0])
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


def check_ignore_regions(ignore: Sequence[IgnoreRegion], size_a: tuple[int, int]) -> None:
    """``InvalidManifest`` naming the field when an ignore box does not lie inside image A."""
    _check_boxes("ignore_regions", ignore, size_a)


def check_match_regions(regions: Sequence[MatchRegion], size_a: tuple[int, int]) -> None:
    """``InvalidManifest`` naming the field when a level box does not lie inside image A."""
    _check_boxes("regions", regions, size_a)


def _check_boxes(name: str, boxes: Sequence[IgnoreRegion], size_a: tuple[int, int]) -> None:
    width, height = size_a
    for index, box in enumerate(boxes):
        if box.x + box.width > width or box.y + box.height > height:
            where = f"config.{name}[{index}]"
            raise InvalidManifest(
                f"{where} (x={box.x}, y={box.y}, {box.width}x{box.height})"
                f" reaches outside image A ({width}x{height})",
                details={"field": where},
            )


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


def _checked_size(data: bytes, max_pixels: int, which: str) -> tuple[int, int]:
    try:
        return image_size(data, max_pixels)
    except InvalidImage as exc:
        exc.details.setdefault("input", which)
        raise


def _open(data: bytes, max_pixels: int) -> pyvips.Image:
    """Header only (no pixels decoded) with the pixel budget checked."""
    if not data:
        raise InvalidImage("the file is empty (0 bytes)")
    image = _header(data, max_pixels)
    width, height = image.width, image.height
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels; not decoded"
        )
    return image


def _header(data: bytes, max_pixels: int) -> pyvips.Image:
    """A lazily decoded image: libvips' own, or the Pillow fallback's."""
    return open_header(data) or _fallback(data, max_pixels)


def _streamed(image: pyvips.Image) -> bool:
    """Did libvips open it itself (rather than the Pillow fallback)?"""
    return bool(image.get_typeof("vips-loader"))


def _fallback(data: bytes, max_pixels: int) -> pyvips.Image:
    """Formats libvips cannot decode here: Pillow decodes them whole, budget checked first.

    That is BMP (uncompressed: decoded, it is no larger than its bytes) and HEIC (pillow-heif;
    phone photos, 12-48 MP): the one case where detection holds a decoded image.
    """
    from handler.images import SUPPORTED_FORMATS, check_pixels

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
                check_pixels(*img.size, max_pixels)
                img.seek(0)
                pixels = np.asarray(img.convert("RGBA"))
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not an image: the bytes match no supported image format") from None
    except Exception as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from exc
    return pyvips.Image.new_from_array(pixels, interpretation="srgb")


def _display_size(image: pyvips.Image) -> tuple[int, int]:
    turned = _orientation(image) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else (image.width, image.height)


def _orientation(image: pyvips.Image) -> int:
    if not image.get_typeof("orientation"):
        return 1
    return int(image.get("orientation"))


def _normalised(
    data: bytes, work: tuple[int, int], size: tuple[int, int], max_pixels: int
) -> tuple[pyvips.Image, pyvips.Image]:
    """8-bit sRGB, EXIF-oriented, at ``work`` size: 3 bands flattened on white + opacity, and
    those 3 bands alone (cheaper to shrink than taken apart again).

    An image already at ``work`` size and upright is decoded as it is (the fast path, pixel for
    pixel); otherwise ``thumbnail_buffer`` does orientation and (for the larger image of a
    rescaled pair) shrink-on-load in one streamed step.
    """
    source = _header(data, max_pixels)
    if (source.width, source.height) == work and _orientation(source) == 1:
        image = source
    elif _streamed(source):
        image = pyvips.Image.thumbnail_buffer(
            data, work[0], height=work[1], size="force", fail_on="error"
        )
    else:  # the Pillow fallback: already decoded
        image = source
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if (image.width, image.height) != work:  # rounding in shrink-on-load, or the fallback
        image = image.resize(work[0] / image.width, vscale=work[1] / image.height)
    if image.format != "uchar":
        image = image.cast("uchar")
    if not image.hasalpha():
        # (extract_band on a 3-band image would cost a copy and, measured, much more memory)
        colour = image if image.bands == 3 else image[0:3]
        return colour.bandjoin(255), colour
    colour = image.flatten(background=[255, 255, 255]).cast("uchar")
    return colour.bandjoin(image[image.bands - 1]), colour


def _fetch(
    region: pyvips.Region, first: int, last: int, width: int, bands: int = 4
) -> NDArray[np.uint8]:
    raw = region.fetch(0, first, width, last - first)
    return np.frombuffer(raw, dtype=np.uint8).reshape(last - first, width, bands)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
