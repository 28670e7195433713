"""Change detection at native resolution, streamed: where do A and B really differ?

The comparators work on downsized images, where a changed word on a long page is invisible.
This stage compares the inputs pixel by pixel at their own resolution (the smaller one's when
the sizes differ) without ever holding a decoded image: libvips decodes both in strips
(sequential access, its operation cache off), numpy looks at one strip at a time, and all that
survives a strip is a small map of BLOCK x BLOCK cells (changed-pixel count and tight pixel
bounds per cell, 8 bytes a cell). Clusters are labelled on that map, so memory does not grow
with image size.

Per pixel, the method pixelmatch and odiff document:

1. exactly equal pixels (RGB flattened on white, plus alpha) are skipped in bulk;
2. a perceptual colour distance (YIQ, pixelmatch's weights) above ``COLOR_THRESHOLD``;
3. an anti-aliasing test: a pixel whose value in each image lies within the range of the other
   image's 3x3 neighbourhood (give or take ``AA_TOLERANCE``) is an edge drawn with other
   smoothing, not a change;
4. alpha: a transparency change of more than ``ALPHA_THRESHOLD`` counts as a change too and is
   counted separately, so a transparency-only difference is reported as such.

Changed cells within one cell of each other form one cluster. A cluster is a confident change
when it has at least ``MIN_CLUSTER_PIXELS`` changed pixels of which ``MIN_STRONG_PIXELS`` are
strong (YIQ distance over 0.25), or ``WEAK_CLUSTER_PIXELS`` changed pixels in all; the rest is
noise (re-encoding leaves weak specks). Confident clusters become regions in A's native
(EXIF-oriented) coordinates, largest first, at most ``MAX_REGIONS``.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from handler.config import IgnoreRegion
from handler.errors import ImageTooLarge, InvalidImage, InvalidManifest
from handler.result import Region
from handler.vips import open_header, pyvips, release_freed_memory

#: pixelmatch's default: 0.1 on its 0..1 scale of the YIQ distance (35215 = the largest one).
COLOR_THRESHOLD = 0.1
_MAX_DELTA = 35215.0 * COLOR_THRESHOLD**2
#: A "strong" changed pixel: YIQ distance over 0.25 (re-encoding noise stays below it).
STRONG_DELTA = 35215.0 * 0.25**2
#: Levels (0..255) a pixel may sit outside the other image's 3x3 range and still be smoothing.
AA_TOLERANCE = 12
#: A change in opacity of 10 % counts.
ALPHA_THRESHOLD = 26
#: Cell size of the streamed change map (native pixels).
BLOCK = 16
#: Fewer changed pixels than this in a cluster is noise (a stray JPEG artefact), not a change.
MIN_CLUSTER_PIXELS = 12
#: ... and it needs this many strong pixels, or WEAK_CLUSTER_PIXELS changed pixels in all (a
#: faint change over a larger area).
MIN_STRONG_PIXELS = 4
WEAK_CLUSTER_PIXELS = 256
MAX_REGIONS = 20
#: Regions are the changed pixels' bounds plus this margin: the faint anti-aliased rim of a
#: changed word is under the colour threshold but part of the word.
REGION_PAD = 2
#: Crops of the largest regions: how many, their longest side, and context around a region.
MAX_CROPS = 4
CROP_SIDE = 448
CROP_MARGIN = 24
#: Strips hold about this many pixels per image (4 bytes each).
_STRIP_PIXELS = 1 << 16
#: Differing pixels classified at once (bounds the temporary arrays to a few MB).
_CHUNK = 16384
#: Largest shrink factor of ``Detection.shrunk`` (libvips keeps a few hundred recent rows).
_MAX_SHRINK = 64
#: Source rows shrunk at once: each fetch from libvips costs more than the rows it shrinks.
_SHRINK_ROWS = 128
#: Decoded bytes (A and B) after which libvips' freed strip buffers are handed back.
_TRIM_EVERY_BYTES = 8 << 20
_YIQ = np.array(
    [
        [0.29889531, 0.59597799, 0.21147017],
        [0.58662247, -0.27417610, -0.52261711],
        [0.11448223, -0.32180189, 0.31114694],
    ],
    dtype=np.float32,
)
_YIQ_WEIGHTS = np.array([0.5053, 0.299, 0.1957], dtype=np.float32)
_LUMA = np.array([0.29889531, 0.58662247, 0.11448223], dtype=np.float32)
_CENTRE = 4
_OFFSETS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=np.intp)


@dataclass(frozen=True)
class Detection:
    """What changed between A and B at native resolution; every box is in A's native pixels.

    ``work_size`` is the resolution the pixels were compared at (A's own when the sizes are
    equal, the smaller image's otherwise). ``region_pixels[i]`` is the changed-pixel count of
    ``regions[i]``; ``boxes_b[i]`` is the same region in B's native pixels (for crops).
    """

    size_a: tuple[int, int]
    size_b: tuple[int, int]
    work_size: tuple[int, int]
    regions: tuple[Region, ...] = ()
    region_pixels: tuple[int, ...] = ()
    boxes_b: tuple[Region, ...] = ()
    changed_pixels: int = 0
    #: Pixels whose only difference is their opacity.
    transparency_pixels: int = 0
    #: Pixels that differ at all (even below the colour threshold), outside ignored boxes.
    differing_pixels: int = 0
    #: The inputs shrunk on the way, where ``detect`` was asked for them (``shrunk_sizes``).
    shrunk: tuple[Image.Image | None, Image.Image | None] = field(
        default=(None, None), compare=False, repr=False
    )

    @property
    def changed_percent(self) -> float:
        width, height = self.work_size
        return 100.0 * self.changed_pixels / (width * height)

    @property
    def identical(self) -> bool:
        """Same size and not one pixel different (outside ignored boxes)."""
        return self.size_a == self.size_b and self.differing_pixels == 0

    @property
    def transparency_only(self) -> bool:
        return self.changed_pixels > 0 and self.transparency_pixels >= self.changed_pixels

    def metrics(self) -> dict[str, float]:
        return {
            "changed_pixels": float(self.changed_pixels),
            "changed_percent": round(self.changed_percent, 4),
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
    ignore: tuple[IgnoreRegion, ...] | list[IgnoreRegion] = (),
    shrunk_sizes: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None),
) -> Detection:
    """Compare two encoded images at native resolution (see the module docstring).

    ``shrunk_sizes[i]`` asks for a copy of input i shrunk by an integer factor to no less than
    that size, made while the input streams past (``Detection.shrunk``): the prepared image's
    source, so the input is decoded once. Only an input compared at its own size gets one.

    Raises ``InvalidImage`` (``details["input"]`` = "a"/"b") for undecodable inputs and
    ``InvalidManifest`` for an ignore box outside image A.
    """
    size_a = _checked_size(data_a, max_pixels, "a")
    size_b = _checked_size(data_b, max_pixels, "b")
    check_ignore_regions(ignore, size_a)
    work = size_a if size_a[0] * size_a[1] <= size_b[0] * size_b[1] else size_b
    to_work = (work[0] / size_a[0], work[1] / size_a[1])
    boxes = [_scale_box((r.x, r.y, r.width, r.height), to_work) for r in ignore]
    try:
        images = (
            _normalised(data_a, work, size_a, max_pixels),
            _normalised(data_b, work, size_b, max_pixels),
        )
        streams = [
            _Stream(
                which, *image, _shrink_factor(work, wanted) if wanted and size == work else None
            )
            for which, image, size, wanted in zip(
                "ab", images, (size_a, size_b), shrunk_sizes, strict=True
            )
        ]
        del images
        cells = _scan(streams[0], streams[1], boxes)
        shrunk = (streams[0].shrunk(), streams[1].shrunk())
        del streams
    except pyvips.Error as exc:
        raise InvalidImage(f"cannot decode the image: {_first_line(exc)}") from exc
    finally:
        release_freed_memory()  # the decoders are gone: what comes next starts lower
    return replace(_detection(cells, size_a, size_b, work), shrunk=shrunk)


class _Stream:
    """One input streaming past in strips, shrunk on the way when a copy was asked for."""

    def __init__(
        self, which: str, image: pyvips.Image, colour: pyvips.Image, shrink: int | None
    ) -> None:
        """``image``: RGB on white + opacity, what is compared; ``colour``: its RGB bands."""
        self.which = which
        self.width, self.height = image.width, image.height
        # Held: a region does not keep alive the memory of an image made from an array.
        self._image = image
        self._region = pyvips.Region.new(image)
        self._shrink = shrink
        if shrink is not None:
            small = colour.shrink(shrink, shrink)
            self._small = pyvips.Region.new(small)
            self._small_size = (small.width, small.height)
            self._small_rows: list[NDArray[np.uint8]] = []
            self._small_done = 0

    def strip(self, first: int, last: int) -> NDArray[np.uint8]:
        """Rows ``first:last`` (RGB on white + opacity); a decoding failure names the input.
        Rows are asked for top to bottom (a row or two of overlap is fine)."""
        try:
            pixels = _fetch(self._region, first, last, self.width)
            self._shrink_above(last, final=False)
        except pyvips.Error as exc:
            raise InvalidImage(
                f"cannot decode the image: {_first_line(exc)}", details={"input": self.which}
            ) from exc
        return pixels

    def shrunk(self) -> Image.Image | None:
        """The copy shrunk by an integer factor (box filter), once every strip was read."""
        if self._shrink is None:
            return None
        self._shrink_above(self.height, final=True)
        return Image.fromarray(np.concatenate(self._small_rows), "RGB")

    def _shrink_above(self, decoded: int, *, final: bool) -> None:
        """Shrink the blocks of rows above ``decoded`` (still in libvips' cache of recent rows),
        in batches: each fetch costs more than the few rows it shrinks."""
        if self._shrink is None:
            return
        width, height = self._small_size
        ready = height if final else min(height, decoded // self._shrink)
        if ready - self._small_done >= max(1, _SHRINK_ROWS // self._shrink) or (
            final and ready > self._small_done
        ):
            self._small_rows.append(_fetch(self._small, self._small_done, ready, width, bands=3))
            self._small_done = ready


def _shrink_factor(work: tuple[int, int], wanted: tuple[int, int]) -> int:
    """The integer shrink that leaves at least twice ``wanted`` for the final LANCZOS step, as
    Pillow's and libvips' thumbnails do (a box filter all the way blurs text); capped, as a
    block's rows must still be in libvips' cache of recent rows when it is shrunk."""
    return max(1, min(_MAX_SHRINK, work[0] // (2 * wanted[0]), work[1] // (2 * wanted[1])))


@dataclass(frozen=True)
class RegionCrop:
    """Native-resolution views of one changed region in A and in B (for people and models).

    ``box_a``/``box_b`` are the cut boxes (the region plus some context) in each image's native
    pixels; a box larger than the crop side is scaled down to fit it, so every crop is bounded.
    """

    region: int
    box_a: Region
    box_b: Region
    a: Image.Image
    b: Image.Image


def cut_crops(
    data_a: bytes,
    data_b: bytes,
    detection: Detection,
    *,
    max_pixels: int,
    count: int = MAX_CROPS,
    side: int = CROP_SIDE,
) -> list[RegionCrop]:
    """Crops of the ``count`` largest regions, each at most ``side`` x ``side`` pixels.

    One more streamed pass over each input, stopping below the lowest crop.
    """
    indexes = range(min(count, len(detection.regions)))
    if not indexes:
        return []
    boxes_a = [_context(detection.regions[i], detection.size_a, side) for i in indexes]
    boxes_b = [_context(detection.boxes_b[i], detection.size_b, side) for i in indexes]
    try:
        crops_a = _cut(data_a, detection.size_a, boxes_a, side, max_pixels)
        crops_b = _cut(data_b, detection.size_b, boxes_b, side, max_pixels)
    except pyvips.Error as exc:
        raise InvalidImage(f"cannot decode the image: {_first_line(exc)}") from exc
    return [
        RegionCrop(region=i, box_a=boxes_a[i], box_b=boxes_b[i], a=crops_a[i], b=crops_b[i])
        for i in indexes
    ]


def _context(region: Region, size: tuple[int, int], side: int) -> Region:
    """``region`` grown by CROP_MARGIN, and to at least ``side`` pixels where the image allows."""
    width = min(size[0], max(region.width + 2 * CROP_MARGIN, side))
    height = min(size[1], max(region.height + 2 * CROP_MARGIN, side))
    left = min(max(0, region.x + region.width // 2 - width // 2), size[0] - width)
    top = min(max(0, region.y + region.height // 2 - height // 2), size[1] - height)
    return Region(x=left, y=top, width=width, height=height)


def _cut(
    data: bytes, size: tuple[int, int], boxes: list[Region], side: int, max_pixels: int
) -> list[Image.Image]:
    """Fill every box from one top-to-bottom pass; rows and columns of a box much larger than
    the crop are skipped while reading (to at most 2 x ``side``), then it is resized."""
    image, _ = _normalised(data, size, size, max_pixels)
    steps = [
        max(1, min(box.width, box.height) // (2 * side), max(box.width, box.height) // (4 * side))
        for box in boxes
    ]
    parts: list[list[NDArray[np.uint8]]] = [[] for _ in boxes]
    bottom = max(box.y + box.height for box in boxes)
    region = pyvips.Region.new(image)
    rows = BLOCK
    for top in range(min(box.y for box in boxes), bottom, rows):
        last = min(bottom, top + rows)
        needed = [i for i, box in enumerate(boxes) if box.y < last and top < box.y + box.height]
        if not needed:
            continue
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
    crops = []
    for pieces in parts:
        crop = Image.fromarray(np.concatenate(pieces, axis=0), "RGB")
        if max(crop.size) > side:
            crop.thumbnail((side, side), Image.Resampling.LANCZOS)
        crops.append(crop)
    return crops


def check_ignore_regions(
    ignore: tuple[IgnoreRegion, ...] | list[IgnoreRegion], size_a: tuple[int, int]
) -> None:
    """``InvalidManifest`` naming the field when an ignore box does not lie inside image A."""
    width, height = size_a
    for index, box in enumerate(ignore):
        if box.x + box.width > width or box.y + box.height > height:
            raise InvalidManifest(
                f"config.ignore_regions[{index}] (x={box.x}, y={box.y}, {box.width}x{box.height})"
                f" reaches outside image A ({width}x{height})"
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


@dataclass
class _Cells:
    """The streamed change map: per BLOCK x BLOCK cell, a count and tight pixel bounds.

    Bounds are offsets inside the cell (0..BLOCK-1), valid where ``count`` > 0: 8 bytes a
    cell, so a 100 MP map is 3 MB rather than the 19 MB of absolute 64-bit coordinates.
    """

    count: NDArray[np.uint16]
    strong: NDArray[np.uint16]
    x0: NDArray[np.uint8]
    y0: NDArray[np.uint8]
    x1: NDArray[np.uint8]
    y1: NDArray[np.uint8]
    transparency: int = 0
    differing: int = 0

    @classmethod
    def empty(cls, grid: tuple[int, int]) -> _Cells:
        return cls(
            count=np.zeros(grid, np.uint16),
            strong=np.zeros(grid, np.uint16),
            x0=np.full(grid, BLOCK, np.uint8),
            y0=np.full(grid, BLOCK, np.uint8),
            x1=np.zeros(grid, np.uint8),
            y1=np.zeros(grid, np.uint8),
        )


def _scan(stream_a: _Stream, stream_b: _Stream, ignore: list[tuple[int, ...]]) -> _Cells:
    width, height = stream_a.width, stream_a.height
    rows = max(BLOCK, (_STRIP_PIXELS // width) // BLOCK * BLOCK)
    cells = _Cells.empty((-(-height // BLOCK), -(-width // BLOCK)))
    # Each decoder is single-threaded and libvips releases the GIL: B's strip is decoded on a
    # second thread while A's is decoded here.
    decoded = 0
    with ThreadPoolExecutor(1, thread_name_prefix="detect") as helper:
        for top in range(0, height, rows):
            # One row of context above and below for the 3x3 anti-aliasing test.
            first, last = max(0, top - 1), min(height, top + rows + 1)
            pending_b = helper.submit(stream_b.strip, first, last)
            strip_a = stream_a.strip(first, last)
            strip_b = pending_b.result()
            _scan_strip(strip_a, strip_b, top - first, min(rows, height - top), top, ignore, cells)
            decoded += strip_a.nbytes + strip_b.nbytes
            if decoded >= _TRIM_EVERY_BYTES:
                release_freed_memory()
                decoded = 0
    return cells


def _fetch(
    region: pyvips.Region, first: int, last: int, width: int, bands: int = 4
) -> NDArray[np.uint8]:
    raw = region.fetch(0, first, width, last - first)
    return np.frombuffer(raw, dtype=np.uint8).reshape(last - first, width, bands)


def _scan_strip(
    a: NDArray[np.uint8],
    b: NDArray[np.uint8],
    offset: int,
    rows: int,
    top: int,
    ignore: list[tuple[int, ...]],
    cells: _Cells,
) -> None:
    """Find the changed pixels of rows ``offset:offset+rows`` of the strip (``top`` in the
    image) and add them to ``cells``."""
    core_a = a[offset : offset + rows].view(np.uint32)[..., 0]
    core_b = b[offset : offset + rows].view(np.uint32)[..., 0]
    differs = core_a != core_b
    if not differs.any():  # most strips of a screenshot: cheaper than an empty nonzero()
        return
    ys, xs = np.nonzero(differs)
    if ignore and len(ys):
        keep = ~_inside(xs, ys + top, ignore)
        ys, xs = ys[keep], xs[keep]
    if not len(ys):
        return
    cells.differing += len(ys)
    # In chunks: a photo re-encode differs in almost every pixel, and the 3x3 gathers cost
    # ~100 bytes per candidate.
    for start in range(0, len(ys), _CHUNK):
        chunk = slice(start, start + _CHUNK)
        _classify(a, b, ys[chunk] + offset, xs[chunk], offset, top, cells)


def _classify(
    a: NDArray[np.uint8],
    b: NDArray[np.uint8],
    ys: NDArray[np.intp],
    xs: NDArray[np.intp],
    offset: int,
    top: int,
    cells: _Cells,
) -> None:
    """Changed or not, for differing pixels at strip rows ``ys``; the changed go to ``cells``."""
    pa, pb = a[ys, xs], b[ys, xs]
    diff = pa[:, :3].astype(np.float32) - pb[:, :3].astype(np.float32)
    delta = (np.square(diff @ _YIQ) * _YIQ_WEIGHTS).sum(axis=1)
    colour = delta > _MAX_DELTA
    if colour.any():
        colour[colour] = ~_antialiased(a, b, ys[colour], xs[colour])
    opacity = np.abs(pa[:, 3].astype(np.int16) - pb[:, 3].astype(np.int16)) > ALPHA_THRESHOLD
    changed = colour | opacity
    cells.transparency += int(np.count_nonzero(opacity & ~colour))
    strong = (colour & (delta > STRONG_DELTA)) | opacity
    ys, xs, strong = ys[changed] - offset + top, xs[changed], strong[changed]
    if len(ys):
        _accumulate(cells, xs, ys, strong)


def _antialiased(
    a: NDArray[np.uint8], b: NDArray[np.uint8], ys: NDArray[np.intp], xs: NDArray[np.intp]
) -> NDArray[np.bool_]:
    """Edge pixels drawn with other smoothing: in each image the pixel lies strictly between
    its darkest and brightest neighbour (it is on an edge, as pixelmatch requires), and its
    value lies within the other image's 3x3 range. A stroke added on plain background fails
    the first test where the background was (nothing there is brighter than it)."""
    height, width = a.shape[:2]
    near_y = np.clip(ys[:, None] + _OFFSETS[:, 0], 0, height - 1)
    near_x = np.clip(xs[:, None] + _OFFSETS[:, 1], 0, width - 1)
    result = np.ones(len(ys), dtype=bool)
    for this, other in ((a, b), (b, a)):
        own = this[near_y, near_x, :3].astype(np.int16)
        centre = own[:, _CENTRE]
        brightness = own @ _LUMA
        neighbours = np.delete(brightness, _CENTRE, axis=1)
        mid = brightness[:, _CENTRE]
        result &= (neighbours.min(axis=1) < mid) & (mid < neighbours.max(axis=1))
        around = other[near_y, near_x, :3].astype(np.int16)
        low = around.min(axis=1) - AA_TOLERANCE
        high = around.max(axis=1) + AA_TOLERANCE
        result &= ((centre >= low) & (centre <= high)).all(axis=1)
    return result


def _inside(
    xs: NDArray[np.intp], ys: NDArray[np.intp], boxes: list[tuple[int, ...]]
) -> NDArray[np.bool_]:
    hit = np.zeros(len(xs), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        hit |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return hit


def _accumulate(
    cells: _Cells, xs: NDArray[np.intp], ys: NDArray[np.intp], strong: NDArray[np.bool_]
) -> None:
    index = (ys // BLOCK, xs // BLOCK)
    dx, dy = (xs % BLOCK).astype(np.uint8), (ys % BLOCK).astype(np.uint8)
    np.add.at(cells.count, index, 1)
    np.add.at(cells.strong, index, strong.astype(np.uint16))
    np.minimum.at(cells.x0, index, dx)
    np.minimum.at(cells.y0, index, dy)
    np.maximum.at(cells.x1, index, dx)
    np.maximum.at(cells.y1, index, dy)


def _clusters(occupied: NDArray[np.bool_]) -> tuple[NDArray[np.intp], int]:
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


def _detection(
    cells: _Cells, size_a: tuple[int, int], size_b: tuple[int, int], work: tuple[int, int]
) -> Detection:
    occupied = cells.count > 0
    clusters = []
    if occupied.any():
        label, count = _clusters(occupied)
        rows, cols = np.nonzero(occupied)
        pixels = np.bincount(label, weights=cells.count[occupied], minlength=count)
        strong = np.bincount(label, weights=cells.strong[occupied], minlength=count)
        x0 = _smallest(label, count, cols * BLOCK + cells.x0[occupied])
        y0 = _smallest(label, count, rows * BLOCK + cells.y0[occupied])
        x1 = -_smallest(label, count, -(cols * BLOCK + cells.x1[occupied]))
        y1 = -_smallest(label, count, -(rows * BLOCK + cells.y1[occupied]))
        for i in range(count):
            if _confident(int(pixels[i]), int(strong[i])):
                box = _padded((int(x0[i]), int(y0[i]), int(x1[i]) + 1, int(y1[i]) + 1), work)
                clusters.append((int(pixels[i]), box))
    clusters.sort(key=lambda item: -item[0])
    kept = clusters[:MAX_REGIONS]
    to_a = (size_a[0] / work[0], size_a[1] / work[1])
    to_b = (size_b[0] / work[0], size_b[1] / work[1])
    return Detection(
        size_a=size_a,
        size_b=size_b,
        work_size=work,
        regions=tuple(_region(box, to_a, size_a) for _, box in kept),
        region_pixels=tuple(pixels for pixels, _ in kept),
        boxes_b=tuple(_region(box, to_b, size_b) for _, box in kept),
        changed_pixels=sum(pixels for pixels, _ in clusters),
        transparency_pixels=min(cells.transparency, sum(p for p, _ in clusters)),
        differing_pixels=cells.differing,
    )


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


def _confident(pixels: int, strong: int) -> bool:
    """A real change, not re-encoding noise: JPEG q70 leaves clusters of up to ~60 weak pixels
    (measured on the scikit-image photos) but never a strong one."""
    if pixels < MIN_CLUSTER_PIXELS:
        return False
    return strong >= MIN_STRONG_PIXELS or pixels >= WEAK_CLUSTER_PIXELS


def _scale_box(box: tuple[int, int, int, int], factor: tuple[float, float]) -> tuple[int, ...]:
    """(x, y, width, height) -> (x0, y0, x1, y1) scaled, rounded outwards."""
    x, y, width, height = box
    return (
        int(x * factor[0]),
        int(y * factor[1]),
        int(np.ceil((x + width) * factor[0])),
        int(np.ceil((y + height) * factor[1])),
    )


def _region(
    box: tuple[int, int, int, int], factor: tuple[float, float], limit: tuple[int, int]
) -> Region:
    x0, y0, x1, y1 = box
    left, top = int(x0 * factor[0]), int(y0 * factor[1])
    right = min(limit[0], max(left + 1, int(np.ceil(x1 * factor[0]))))
    bottom = min(limit[1], max(top + 1, int(np.ceil(y1 * factor[1]))))
    return Region(x=left, y=top, width=right - left, height=bottom - top)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
