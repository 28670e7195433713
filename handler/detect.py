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

Here: ``detect`` and its ``Detection``, the sizes compared (``_geometry``), which passes run
and the checks of the boxes a pair's config names. Beside it: streamed decoding of an input
(``handler.decode``), one pass of the scan and its pixel rules (``handler.scan``), and the
crops of the largest regions (``handler.crops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from handler.align import Alignment, Profiles, align, translated
from handler.config import IgnoreRegion, MatchLevel, MatchRegion
from handler.deadline import Deadline
from handler.decode import Stream, checked_size, first_line, normalised
from handler.errors import InvalidImage, InvalidManifest
from handler.regions import Findings, Geometry, findings
from handler.scan import Rules, Scan, Scanned, sign_rows
from handler.vips import pyvips, release_after, release_freed_memory

__all__ = ["Detection", "detect"]

#: Two sizes are one picture rescaled when width and height scale alike within this share.
ASPECT_TOLERANCE = 0.01


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
    size_a = checked_size(data_a, max_pixels, "a")
    size_b = checked_size(data_b, max_pixels, "b")
    check_ignore_regions(ignore, size_a)
    check_match_regions(regions, size_a)
    geometry = _geometry(data_a, data_b, size_a, size_b)
    rules = Rules.of(ignore, regions, match_level, geometry)
    (width_a, height_a), (width_b, height_b) = geometry.work_a, geometry.work_b
    try:
        result = _detected(
            (data_a, data_b), geometry, rules, max_pixels, shrunk_sizes, keep_pixels, deadline
        )
    except pyvips.Error as exc:
        raise InvalidImage(f"cannot decode the image: {first_line(exc)}") from exc
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
    rules: Rules,
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
    first = Scan(streams, as_laid, rules, profiles, deadline=deadline).run()
    shrunk = _copies(streams, first, rules, geometry, shrunk_sizes)
    kept = (streams[0].kept(), streams[1].kept())
    del streams
    result = findings(first.cells, first.contents, as_laid, geometry, rules.levels)
    if not result.regions and not first.deferred and geometry.work_a == geometry.work_b:
        return result, shrunk, kept
    sign_rows(profiles, first.unsigned)
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
    streams: tuple[Stream, Stream],
    first: Scanned,
    rules: Rules,
    geometry: Geometry,
    shrunk_sizes: _Wanted,
) -> _Pair:
    """The resized copies pass 1 made. Not one pixel differs (and none was left out): the same
    pixels resize the same, so one copy serves both (a re-encoded screenshot's pair). Where
    they differ in a few rows (one changed line), B's copy is A's with those rows resized
    again (``Stream.shrunk``)."""
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
    rules: Rules,
    max_pixels: int,
    alignment: Alignment,
    first: Scanned,
    deadline: Deadline | None,
) -> Findings:
    """Another pass along ``alignment``, pass 1's cells kept above where it departs from the
    identity (and from the first strip pass 1 left)."""
    if any(isinstance(source, bytes) for source in sources):
        release_freed_memory()
    start = min(_departure(alignment), *(top for top, _ in first.deferred), first.height)
    streams = _streams(sources, geometry, max_pixels, (None, None), False)
    scanned = Scan(
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
    return Alignment(0, tuple(translated(0, work_a[1], work_b[1])), work_a, work_b)


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
) -> tuple[Stream, Stream]:
    """Both inputs at their work sizes: decoding lazily (a resized copy where asked for one of
    an input compared at its own size), or read from the pixels pass 1 kept."""
    made = []
    for which, source, size, work, wanted in (
        ("a", sources[0], geometry.size_a, geometry.work_a, shrunk_sizes[0]),
        ("b", sources[1], geometry.size_b, geometry.work_b, shrunk_sizes[1]),
    ):
        if not isinstance(source, bytes):
            made.append(Stream(which, source))
            continue
        image, colour = normalised(source, work, size, max_pixels)
        native = size == work
        made.append(Stream(which, image, colour, wanted if native else None, keep=keep and native))
    return made[0], made[1]


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
