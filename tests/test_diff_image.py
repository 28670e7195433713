"""The diff image: boxes where the changes are, a legend, a bounded size — checked on its pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from scipy import ndimage

from handler import diff_image
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.errors import ComparisonTimeout
from handler.images import prepare
from handler.pipeline import ImageInput, PairOutcome, compare_pair
from handler.result import ComparisonResult, Region, failure_result
from tests.support import scenes, screens

COMPARATOR = MetricsComparator()
BLUE = (0, 0, 255)


def _run(a: bytes, b: bytes, config: ComparisonConfig | None = None) -> PairOutcome:
    return compare_pair(
        "pair",
        ImageInput("a.jpg", lambda: a),
        ImageInput("b.jpg", lambda: b),
        config or ComparisonConfig(),
        COMPARATOR,
        max_input_pixels=50_000_000,
        diff_image=True,
    )


def _pixels(png: bytes) -> NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _boxes(pixels: NDArray[np.uint8]) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1) of the drawn box outlines, i.e. of pure CHANGED_COLOR."""
    mask = np.all(pixels == diff_image.CHANGED_COLOR, axis=2)
    labels, _ = ndimage.label(mask)
    found = []
    for rows, cols in ndimage.find_objects(labels):
        if rows.stop - rows.start > 4 and cols.stop - cols.start > 4:
            found.append((cols.start, rows.start, cols.stop - 1, rows.stop - 1))
    return found


def _blue_box(pixels: NDArray[np.uint8]) -> tuple[int, int, int, int]:
    """Bounding box of the (JPEG-softened) pure-blue marker: the centre of each blue run."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    mask = (b > 180) & (r < 80) & (g < 80)
    mask = ndimage.binary_opening(mask, iterations=2)
    ys, xs = np.nonzero(mask)
    assert xs.size, "the blue marker is not in the diff image"
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _encloses(
    outer: tuple[int, int, int, int], inner: tuple[int, int, int, int], slack: int
) -> bool:
    """``outer`` contains ``inner`` and no edge is more than ``slack`` pixels away from it."""
    return all(0 <= d <= slack for d in _margins(outer, inner))


def _margins(
    outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    return (inner[0] - outer[0], inner[1] - outer[1], outer[2] - inner[2], outer[3] - inner[3])


def _with_blue_square(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    edited = img.copy()
    ImageDraw.Draw(edited).rectangle(box, fill=BLUE)
    return edited


def test_boxes_mark_the_change_found_by_the_real_pipeline() -> None:
    # A 1200x800 original prepared to 450x300: regions (in original pixels) must be scaled down.
    original = scenes.photo("coffee").resize((1200, 800))
    edited = _with_blue_square(original, (700, 250, 899, 449))
    outcome = _run(
        scenes.encode(original),
        scenes.encode(edited),
        ComparisonConfig(max_image_size=(450, 450)),
    )
    result = outcome.result
    assert result.status == "ok" and not result.is_similar
    assert len(result.changed_regions) == 1
    assert outcome.diff_png is not None
    pixels = _pixels(outcome.diff_png)

    boxes = _boxes(pixels)
    assert len(boxes) == 2, boxes  # the region, drawn on A and on B
    # (below the overview, the crops of the region show the blue square again)
    blue = _blue_box(pixels[: max(box[3] for box in boxes) + 1])
    enclosing = [box for box in boxes if _encloses(box, blue, slack=12)]
    assert len(enclosing) == 1, (boxes, blue)
    on_b = enclosing[0]
    on_a = next(box for box in boxes if box != on_b)
    assert (on_a[2] - on_a[0], on_a[3] - on_a[1]) == (on_b[2] - on_b[0], on_b[3] - on_b[1])
    # Inside A's box is A's unedited picture: no blue there.
    x0, y0, x1, y1 = on_a
    inside_a = pixels[y0 + 3 : y1 - 2, x0 + 3 : x1 - 2].astype(int)
    assert not ((inside_a[..., 2] > 180) & (inside_a[..., 0] < 80)).any()


@pytest.mark.parametrize("size", [(1200, 800), (600, 1500), (3000, 400)])
def test_region_is_drawn_at_its_original_coordinates(size: tuple[int, int]) -> None:
    """A region given in original pixels lands on the same spot of both downsized panels."""
    width, height = size
    marker = (width // 2, height // 3, width // 2 + width // 5, height // 3 + height // 4)
    img = _with_blue_square(scenes.photo("astronaut").resize(size), marker)
    data = scenes.encode(img)
    outcome = _run(data, data, ComparisonConfig(max_image_size=(400, 400)))
    assert outcome.result.changed_regions == []  # identical inputs: the region comes from us
    region = Region(
        x=marker[0], y=marker[1], width=marker[2] - marker[0] + 1, height=marker[3] - marker[1] + 1
    )
    result = outcome.result.model_copy(update={"changed_regions": [region]})
    a = prepare(data, (400, 400), 85)
    pixels = _pixels(diff_image.render_diff(a, a, result))

    boxes = sorted(_boxes(pixels))
    assert len(boxes) == 2, boxes
    # Two blue markers (A and B are the same image); each box hugs one of them.
    labels, count = ndimage.label(
        ndimage.binary_opening(
            (pixels[..., 2] > 180) & (pixels[..., 0] < 80) & (pixels[..., 1] < 80), iterations=2
        )
    )
    assert count == 2
    markers = sorted(
        (cols.start, rows.start, cols.stop - 1, rows.stop - 1)
        for rows, cols in ndimage.find_objects(labels)
    )
    for box, blue in zip(boxes, markers, strict=True):
        assert _encloses(box, blue, slack=3), (box, blue, _margins(box, blue))


@pytest.mark.parametrize(
    ("size_a", "size_b", "max_size"),
    [
        ((1600, 1200), (1600, 1200), (1024, 1024)),
        ((4000, 300), (4000, 300), (1024, 1024)),
        ((300, 4000), (600, 600), (800, 800)),
        ((1024, 768), (200, 150), (1024, 1024)),
        ((40, 30), (40, 30), (1024, 1024)),
    ],
)
def test_size_is_bounded_by_the_prepared_images(
    size_a: tuple[int, int], size_b: tuple[int, int], max_size: tuple[int, int]
) -> None:
    photo = scenes.photo("chelsea")
    a = prepare(scenes.encode(photo.resize(size_a)), max_size, 85)
    b = prepare(scenes.encode(photo.resize(size_b)), max_size, 85)
    result = _run(scenes.encode(photo.resize(size_a)), scenes.encode(photo.resize(size_b))).result
    with Image.open(io.BytesIO(diff_image.render_diff(a, b, result))) as img:
        longest = max(*a.size, *b.size)
        assert max(img.size) <= max(longest, diff_image.MIN_WIDTH)
        # ...and the panels use the room: not a thumbnail lost in white space.
        assert max(img.size) >= min(longest, diff_image.MIN_WIDTH)


def _legend(png: bytes) -> NDArray[np.uint8]:
    """The bottom strip under the panels: everything below the last row of photo pixels."""
    pixels = _pixels(png)
    return pixels[-30:]


def _has_color(pixels: NDArray[np.uint8], color: tuple[int, int, int]) -> bool:
    return bool(np.all(pixels == color, axis=2).sum() > 20)


def test_legend_shows_the_verdict_and_text() -> None:
    photo = scenes.photo("rocket")
    same = _run(scenes.encode(photo), scenes.reencoded(photo))
    changed = _run(scenes.encode(photo), scenes.pasted_object(photo))
    assert same.result.is_similar and not changed.result.is_similar
    assert same.diff_png and changed.diff_png

    similar_legend, different_legend = _legend(same.diff_png), _legend(changed.diff_png)
    assert _has_color(similar_legend, diff_image.SIMILAR_COLOR)
    assert not _has_color(similar_legend, diff_image.DIFFERENT_COLOR)
    assert _has_color(different_legend, diff_image.DIFFERENT_COLOR)
    # Text: plenty of dark pixels on the white strip, and different words for different results.
    for legend in (similar_legend, different_legend):
        assert (legend.max(axis=2) < 100).sum() > 200
    assert not np.array_equal(similar_legend, different_legend)


def test_failed_comparison_gets_a_diff_with_the_failure_in_the_legend() -> None:
    data = scenes.encode(scenes.photo("astronaut"))
    a = prepare(data, (512, 512), 85)
    ok = _run(data, data).result
    failed = failure_result(
        "pair",
        ComparisonTimeout("comparison took longer than 1 s"),
        ok.inputs,
        ok.config,
        ok.comparator,
    )
    assert failed.status == "timeout"
    png = diff_image.render_diff(a, a, failed)
    legend = _legend(png)
    assert _has_color(legend, diff_image.FAILED_COLOR)
    assert not _boxes(_pixels(png))


def test_legend_survives_hostile_names() -> None:
    """Names are drawn, not interpreted: control characters and huge names cannot break it."""
    data = scenes.encode(scenes.photo("chelsea"))
    result = _run(data, data).result
    result.inputs[0].name = "evil\nname\x00" + "x" * 5000 + ".png"
    a = prepare(data, (300, 300), 85)
    with Image.open(io.BytesIO(diff_image.render_diff(a, a, result))) as img:
        assert max(img.size) <= max(300, diff_image.MIN_WIDTH)


def test_pipeline_draws_only_when_asked_and_both_images_were_read() -> None:
    data = scenes.encode(scenes.photo("coffee"))
    config = ComparisonConfig()
    plain = compare_pair(
        "p", ImageInput("a", lambda: data), ImageInput("b", lambda: data), config, COMPARATOR,
        max_input_pixels=50_000_000,
    )  # fmt: skip
    assert plain.diff_png is None
    broken = _run(data, b"not an image")
    assert broken.result.status == "error" and broken.diff_png is None


def test_regions_outside_the_image_are_clamped() -> None:
    data = scenes.encode(scenes.photo("chelsea"))
    a = prepare(data, (300, 300), 85)
    result: ComparisonResult = _run(data, data).result.model_copy(
        update={"changed_regions": [Region(x=10_000, y=10_000, width=50, height=50)]}
    )
    pixels = _pixels(diff_image.render_diff(a, a, result))
    assert max(pixels.shape[:2]) <= max(300, diff_image.MIN_WIDTH)


def _outlines(pixels: NDArray[np.uint8], color: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """Boxes drawn in ``color`` in the overview (above the crops and the legend)."""
    mask = np.all(pixels == color, axis=2)
    labels, _ = ndimage.label(mask)
    return [
        (cols.start, rows.start, cols.stop - 1, rows.stop - 1)
        for rows, cols in ndimage.find_objects(labels)
        if rows.stop - rows.start > 4 and cols.stop - cols.start > 4
    ]


def _card_pair() -> tuple[bytes, bytes]:
    """A card, and the card with a band inserted at the top and its address changed."""
    card = screens.label_card("Delivery address: 221B Baker Street")
    edited = screens.label_card("Delivery address: 10 Downing Street")
    banner = Image.new("RGB", (card.width, card.height + 60), (253, 241, 199))
    ImageDraw.Draw(banner).text((16, 20), "Cookies!", fill=(20, 20, 20), font=screens.font(16))
    banner.paste(edited, (0, 60))
    return scenes.encode(card, "PNG"), scenes.encode(banner, "PNG")


def test_each_kind_has_its_colour_and_is_drawn_where_it_is() -> None:
    """Added (green) on B only, removed (red) on A only, changed (magenta) on both, each at
    its own place in its image (here A above B: both are wider than tall)."""
    a, b = _card_pair()
    outcome = _run(a, b)
    kinds = sorted(r.kind for r in outcome.result.changed_regions)
    assert kinds == ["added", "changed"]
    assert outcome.diff_png is not None
    pixels = _pixels(outcome.diff_png)
    (added,) = _outlines(pixels, diff_image.ADDED_COLOR)
    changed = sorted(_outlines(pixels, diff_image.CHANGED_COLOR), key=lambda box: box[1])
    assert len(changed) == 2
    on_a, on_b = changed
    assert on_a[1] < added[1] < on_b[1]  # the band is drawn on B, above B's changed address
    assert on_b[1] - added[3] < on_b[1] - on_a[1]
    assert _outlines(pixels, diff_image.REMOVED_COLOR) == []
    # The other way round the band was removed: red, drawn on A (above B's panel).
    swapped = _pixels(_run(b, a).diff_png or b"")
    (removed,) = _outlines(swapped, diff_image.REMOVED_COLOR)
    assert removed[1] < min(box[1] for box in _outlines(swapped, diff_image.CHANGED_COLOR))
    assert _outlines(swapped, diff_image.ADDED_COLOR) == []


def test_moved_content_is_outlined_at_both_places() -> None:
    text = "Delivery address: 221B Baker Street"
    a = scenes.encode(screens.label_card(text), "PNG")
    b = scenes.encode(screens.label_card(text, offset=(3, 2)), "PNG")
    outcome = _run(a, b)
    assert [r.kind for r in outcome.result.changed_regions] == ["moved"]
    pixels = _pixels(outcome.diff_png or b"")
    outlines = [box for box in _outlines(pixels, diff_image.MOVED_COLOR) if box[2] - box[0] > 50]
    assert len(outlines) == 2  # in A and in B (and its offset written beside the one in B)
