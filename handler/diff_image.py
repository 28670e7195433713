"""Diff image: A and B side by side, each region boxed where it is in each image, native-resolution
crops of the largest regions (A | B) under them, a legend at the bottom.

Colours say what happened: changed regions are magenta (on both panels, each at its own place),
added ones green (on B only: they are not in A), removed ones red (on A only), and moved content
is outlined in blue at its place in A and in B, its offset written beside it on B.

People judge a comparison faster by looking than by reading JSON. The overview is drawn from the
already-prepared (downsized) images, so it costs a resize and a PNG encode, never a second decode
of the inputs, and its size is bounded by what the comparator saw: the longest edge is at most
the prepared images' longest edge (or ``MIN_WIDTH``, so that a tiny pair still gets a legible
legend). A one-word change is invisible in an overview, hence the crops: at most
``handler.crops.MAX_CROPS`` pairs of at most ``CROP_SIDE`` pixels, so the PNG stays bounded.
Ignored boxes are hatched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from handler import splice
from handler.config import IgnoreRegion
from handler.crops import RegionCrop
from handler.images import PreparedImage
from handler.result import Box, ComparisonResult, Region

#: Region outlines by kind. Pure colours survive PNG exactly, which lets tests find the boxes.
CHANGED_COLOR = (255, 0, 255)
ADDED_COLOR = (0, 200, 0)
REMOVED_COLOR = (255, 0, 0)
MOVED_COLOR = (0, 120, 255)
KIND_COLORS = {
    "changed": CHANGED_COLOR,
    "added": ADDED_COLOR,
    "removed": REMOVED_COLOR,
    "moved": MOVED_COLOR,
}
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
#: Legend swatch per verdict: similar, different, failed (error/timeout).
SIMILAR_COLOR = (34, 139, 34)
DIFFERENT_COLOR = (230, 120, 0)
FAILED_COLOR = (150, 0, 90)
#: Hatching over ignored boxes.
HATCH_COLOR = (70, 70, 200)
MIN_WIDTH = 256
#: zlib level of the PNG: 3 encodes in less than half the time of 6, ~10 % larger.
PNG_LEVEL = 3
_GAP = 6
_PAD = 6
#: Drawing colours get fixed palette slots after the photo colours (see ``_to_palette``).
_INKS = (
    CHANGED_COLOR,
    ADDED_COLOR,
    REMOVED_COLOR,
    MOVED_COLOR,
    BACKGROUND,
    TEXT_COLOR,
    SIMILAR_COLOR,
    DIFFERENT_COLOR,
    FAILED_COLOR,
    HATCH_COLOR,
)
_HATCH_STEP = 6
_PHOTO_COLORS = 256 - len(_INKS)
_INK = {color: _PHOTO_COLORS + index for index, color in enumerate(_INKS)}


@dataclass(frozen=True, slots=True)
class _Panel:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class _Layout:
    width: int
    height: int
    a: _Panel
    b: _Panel


def render_diff(
    a: PreparedImage,
    b: PreparedImage,
    result: ComparisonResult,
    crops: list[RegionCrop] | tuple[RegionCrop, ...] = (),
) -> bytes:
    """A PNG of A | B (or A over B for wide images) with ``result.changed_regions`` boxed,
    ``crops`` (A | B per row) under the overview, and the legend.

    Regions are in A's original pixel coordinates; they are mapped proportionally onto both
    panels (B is shown at its own aspect ratio, so for a B of another shape the box on B marks
    the same relative area).
    """
    bound = max(*a.size, *b.size)
    font_size = max(11, min(16, bound // 64))
    font = _font(font_size)
    line_height = font_size + 4
    rows = [_pair(crop) for crop in crops]
    crops_width = max((_GAP + left.width + right.width for left, right in rows), default=0)
    crops_height = sum(_GAP + max(left.height, right.height) for left, right in rows)
    verdict = _verdict(result)[1]
    legend_height = 2 * line_height + 2 * _PAD
    for _ in range(2):  # a narrower layout may need one more legend line: fit it once more
        overview = _layout(a.size, b.size, bound, legend_height)
        width = max(overview.width, crops_width)
        verdict_lines = _wrap(verdict, font, width - 3 * _PAD - line_height)
        needed = (len(verdict_lines) + 1) * line_height + 2 * _PAD
        if needed == legend_height:
            break
        legend_height = needed
    height = overview.height + crops_height
    shift = (width - overview.width) // 2
    layout = _Layout(width, height, _moved(overview.a, shift), _moved(overview.b, shift))
    photos = Image.new("RGB", (width, height), BACKGROUND)
    fitted = _fit(a.image, layout.a)
    photos.paste(fitted, (layout.a.x, layout.a.y))
    if b.image is not a.image or fitted.size != (layout.b.width, layout.b.height):
        # (a pixel-identical pair shares one prepared image; a changed line, most of A's)
        fitted = _fit_like(a.image, fitted, b.image, layout.b)
    photos.paste(fitted, (layout.b.x, layout.b.y))
    top = overview.height - legend_height
    for left, right in rows:
        top += _GAP
        x = (width - left.width - _GAP - right.width) // 2
        photos.paste(left, (x, top))
        photos.paste(right, (x + left.width + _GAP, top))
        top += max(left.height, right.height)
    canvas = _to_palette(photos)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # anti-aliasing would blend palette indices, not colours
    draw.rectangle((0, height - legend_height, width, height), fill=_INK[BACKGROUND])
    line = max(2, round(min(layout.a.width, layout.a.height) / 200))
    for panel in (layout.a, layout.b):
        for box in result.config.ignore_regions:
            _hatch(draw, _box(_as_region(box), a.original_size, panel))
    for region in result.changed_regions:
        _outline(draw, region, (a.original_size, b.original_size), layout, line, font)
    _draw_legend(draw, result, layout, font, line_height, legend_height, verdict_lines)
    out = io.BytesIO()
    canvas.save(out, "PNG", compress_level=PNG_LEVEL)
    return out.getvalue()


def _pair(crop: RegionCrop) -> tuple[Image.Image, Image.Image]:
    """A crop row: A's and B's views of a region, a blank of the same size where one image
    does not have it (added, removed)."""
    shown = crop.a or crop.b
    size = shown.size if shown is not None else (1, 1)
    return (
        crop.a or Image.new("RGB", size, BACKGROUND),
        crop.b or Image.new("RGB", size, BACKGROUND),
    )


def _outline(
    draw: ImageDraw.ImageDraw,
    region: Region,
    sizes: tuple[tuple[int, int], tuple[int, int]],
    layout: _Layout,
    line: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """``region`` in its kind's colour at its place in each image that has it. (A region
    without boxes per image, from an older result, is drawn at the same relative place on
    both.)"""
    ink = _INK[KIND_COLORS.get(region.kind, CHANGED_COLOR)]
    boxes: list[tuple[Box, tuple[int, int], _Panel]]
    if region.a is None and region.b is None:
        boxes = [(region, sizes[0], layout.a), (region, sizes[0], layout.b)]
    else:
        boxes = [
            (box, size, panel)
            for box, size, panel in (
                (region.a, sizes[0], layout.a),
                (region.b, sizes[1], layout.b),
            )
            if box is not None
        ]
    for box, size, panel in boxes:
        draw.rectangle(_box(box, size, panel), outline=ink, width=line)
    if region.kind == "moved" and region.shift is not None and region.b is not None:
        x0, y0, _, _ = _box(region.b, sizes[1], layout.b)
        label = f"{region.shift[0]:+d},{region.shift[1]:+d}"
        height = font.getbbox(label)[3]
        draw.text((x0, max(layout.b.y, y0 - height - 2)), label, fill=ink, font=font)


def _moved(panel: _Panel, shift: int) -> _Panel:
    return _Panel(panel.x + shift, panel.y, panel.width, panel.height)


def _as_region(box: IgnoreRegion) -> Region:
    return Region(x=box.x, y=box.y, width=box.width, height=box.height)


def _hatch(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """Diagonal lines across ``box``, clipped to it, and its outline."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    for k in range(-height, width + 1, _HATCH_STEP):
        start, stop = max(0, -k), min(height, width - k)
        if start <= stop:
            draw.line(
                (x0 + k + start, y0 + start, x0 + k + stop, y0 + stop), fill=_INK[HATCH_COLOR]
            )
    draw.rectangle(box, outline=_INK[HATCH_COLOR])


def _to_palette(photos: Image.Image) -> Image.Image:
    """250 photo colours plus exact slots for the boxes and legend.

    A photographic PNG in RGB costs ~1 MB and ~250 ms to encode at 1024 px; as a 256-colour
    palette image it is ~4x smaller and several times faster, and still plainly shows what
    changed. The inks keep exact colours, so boxes stay pure red whatever the photo holds.

    The photo colours are chosen from every other pixel of every other row (the octree costs
    as much as the mapping, and a quarter of the pixels holds the same colours), then every
    pixel takes the nearest of them or of the inks: ~2.5x faster than the octree over all.
    """
    sample = photos.resize(
        (max(1, photos.width // 2), max(1, photos.height // 2)), Image.Resampling.NEAREST
    )
    chosen = sample.quantize(_PHOTO_COLORS, method=Image.Quantize.FASTOCTREE)
    colours = (chosen.getpalette() or [])[: 3 * _PHOTO_COLORS] or list(BACKGROUND)
    # (Unused slots repeat the first colour: the nearest search never lands on them alone.)
    colours += colours[:3] * (_PHOTO_COLORS - len(colours) // 3)
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours + [channel for ink in _INKS for channel in ink])
    return photos.quantize(palette=palette, dither=Image.Dither.NONE)


def _layout(
    size_a: tuple[int, int], size_b: tuple[int, int], bound: int, legend_height: int
) -> _Layout:
    """Side by side (same height) or stacked (same width), whichever shows the images larger,
    with ``legend_height`` kept free under the panels within ``bound``."""
    ratio_a, ratio_b = size_a[0] / size_a[1], size_b[0] / size_b[1]
    room = max(bound - legend_height - _GAP, 8)
    # Side by side: height h, widths h*ratio; total width h*(ra+rb)+gap <= bound, h <= room.
    side_height = max(1, min(room, int((bound - _GAP) / (ratio_a + ratio_b))))
    # Stacked: width w, heights w/ratio; total height w*(1/ra+1/rb)+gap+legend <= bound.
    stack_width = max(1, min(bound, int((room - _GAP) / (1 / ratio_a + 1 / ratio_b))))
    side_area = side_height * side_height * (ratio_a + ratio_b)
    stack_area = stack_width * stack_width * (1 / ratio_a + 1 / ratio_b)
    if side_area >= stack_area:
        width_a = max(1, round(side_height * ratio_a))
        width_b = max(1, round(side_height * ratio_b))
        panel_a = _Panel(0, 0, width_a, side_height)
        panel_b = _Panel(width_a + _GAP, 0, width_b, side_height)
        body_width, body_height = width_a + _GAP + width_b, side_height
    else:
        height_a = max(1, round(stack_width / ratio_a))
        height_b = max(1, round(stack_width / ratio_b))
        panel_a = _Panel(0, 0, stack_width, height_a)
        panel_b = _Panel(0, height_a + _GAP, stack_width, height_b)
        body_width, body_height = stack_width, height_a + _GAP + height_b
    width = max(body_width, MIN_WIDTH)
    # Centre the panels when the legend's minimum width is wider than they are.
    shift = (width - body_width) // 2
    if shift:
        panel_a = _Panel(panel_a.x + shift, panel_a.y, panel_a.width, panel_a.height)
        panel_b = _Panel(panel_b.x + shift, panel_b.y, panel_b.width, panel_b.height)
    return _Layout(width, body_height + legend_height, panel_a, panel_b)


def _fit(image: Image.Image, panel: _Panel) -> Image.Image:
    if image.size == (panel.width, panel.height):
        return image
    # An overview: a box filter down to the nearest integer factor, then bilinear (a third of
    # the time of bilinear all the way, the same to the eye).
    return image.resize((panel.width, panel.height), Image.Resampling.BILINEAR, reducing_gap=1.0)


def _fit_like(a: Image.Image, a_fitted: Image.Image, b: Image.Image, panel: _Panel) -> Image.Image:
    """``_fit(b, panel)``, from A's panel where B differs from A in a few rows only (and the
    panels are alike, without the box filter's integer step): those rows resized from B."""
    size = (panel.width, panel.height)
    if b.size == size:
        return b
    if a_fitted.size != size or b.width >= 2 * panel.width or b.height >= 2 * panel.height:
        return _fit(b, panel)
    return splice.resized_like(a, a_fitted, b, Image.Resampling.BILINEAR, exact=False)


def _box(region: Box, original: tuple[int, int], panel: _Panel) -> tuple[int, int, int, int]:
    """``region`` (an image's ``original`` pixels) as a rectangle on ``panel``, clamped inside
    it."""
    fx, fy = panel.width / original[0], panel.height / original[1]
    x0 = min(max(0, int(region.x * fx)), panel.width - 1)
    y0 = min(max(0, int(region.y * fy)), panel.height - 1)
    x1 = min(max(x0, round((region.x + region.width) * fx) - 1), panel.width - 1)
    y1 = min(max(y0, round((region.y + region.height) * fy) - 1), panel.height - 1)
    return panel.x + x0, panel.y + y0, panel.x + x1, panel.y + y1


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    result: ComparisonResult,
    layout: _Layout,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    line_height: int,
    legend_height: int,
    verdict_lines: list[str],
) -> None:
    """The verdict wraps onto as many lines as it needs; the names line is clipped."""
    top = layout.height - legend_height + _PAD
    swatch = line_height - 4
    color, _ = _verdict(result)
    draw.rectangle((_PAD, top + 2, _PAD + swatch, top + 2 + swatch), fill=_INK[color])
    room = layout.width - 2 * _PAD
    text_x = _PAD + swatch + _PAD
    ink = _INK[TEXT_COLOR]
    for number, text in enumerate(verdict_lines):
        draw.text((text_x, top + number * line_height), text, fill=ink, font=font)
    names = f"A: {_name(result, 0)}   B: {_name(result, 1)}"
    names_top = top + len(verdict_lines) * line_height
    draw.text((_PAD, names_top), _clip(names, font, room), fill=ink, font=font)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: int) -> list[str]:
    """Greedy word wrap to ``room`` pixels (a word longer than a line is clipped)."""
    if font.getlength(text) <= room:  # the usual case: one measurement, not one a word
        return [text]
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= room:
            lines[-1] = candidate
        else:
            lines.append(_clip(word, font, room))
    return lines or [""]


def _verdict(result: ComparisonResult) -> tuple[tuple[int, int, int], str]:
    if result.status != "ok":
        kind = result.error.type if result.error else result.status
        return FAILED_COLOR, f"{result.status}: {kind}"
    similar = "similar" if result.is_similar else "different"
    similarity = "n/a" if result.similarity is None else f"{result.similarity:.3f}"
    count = len(result.changed_regions)
    regions = f"{count} changed region{'s' if count != 1 else ''}"
    threshold = result.config.similarity_threshold
    color = SIMILAR_COLOR if result.is_similar else DIFFERENT_COLOR
    return color, f"{similar} - similarity {similarity} (threshold {threshold:.2f}) - {regions}"


def _name(result: ComparisonResult, index: int) -> str:
    # Control characters (a newline in a file name) would break the one-line legend.
    return "".join(ch if ch.isprintable() else "?" for ch in result.inputs[index].name)


def _clip(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: int) -> str:
    text = text[:400]  # no legend line holds more; keeps the trimming loop short
    if font.getlength(text) <= room:
        return text
    while text and font.getlength(text + "...") > room:
        text = text[:-1]
    return text + "..."


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_legend(result: ComparisonResult) -> bytes:
    """The legend alone, for byte-identical inputs: nothing was decoded to show, and a
    legend-only PNG of a few hundred bytes replaces whatever diff image an earlier comparison
    of the pair left beside the result."""
    font_size = 13
    font = _font(font_size)
    line_height = font_size + 4
    width = 3 * MIN_WIDTH  # the verdict and the note on one line
    text = f"{_verdict(result)[1]} - byte-identical files (not decoded)"
    verdict_lines = _wrap(text, font, width - 3 * _PAD - line_height)
    height = (len(verdict_lines) + 1) * line_height + 2 * _PAD
    nowhere = _Panel(0, 0, 0, 0)
    # No photo to quantise: the inks' palette alone.
    canvas = Image.new("P", (width, height), _INK[BACKGROUND])
    canvas.putpalette([0, 0, 0] * _PHOTO_COLORS + [channel for ink in _INKS for channel in ink])
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"
    layout = _Layout(width, height, nowhere, nowhere)
    _draw_legend(draw, result, layout, font, line_height, height, verdict_lines)
    out = io.BytesIO()
    canvas.save(out, "PNG", compress_level=PNG_LEVEL)
    return out.getvalue()
