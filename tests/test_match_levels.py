"""Match levels (``match_level`` per deployment and per pair, ``regions`` per box) and the
sensitivity that follows the inputs: one strongly changed pixel between lossless inputs, anti-
aliasing in either image (edges against transparency included) never a change; invalid values
a configuration or ``invalid_manifest`` error naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, ConfigFileError, MatchRegion, load_settings
from handler.detect import detect
from handler.errors import InvalidManifest
from handler.pairs import Manifest
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import scenes, screens

BUDGET = 50_000_000
LABEL = "Delivery address: 221B Baker Street"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _run(a: bytes, b: bytes, config: ComparisonConfig | None = None) -> ComparisonResult:
    return compare_pair(
        "pair",
        ImageInput("a.png", lambda: a),
        ImageInput("b.png", lambda: b),
        config or ComparisonConfig(),
        MetricsComparator(),
        max_input_pixels=BUDGET,
    ).result


# -- levels ------------------------------------------------------------------------------


def test_a_moved_label_is_moved_and_ignore_moves_ignores_it() -> None:
    a = _png(screens.label_card(LABEL))
    b = _png(screens.label_card(LABEL, offset=(3, 2)))
    strict = _run(a, b)
    (region,) = strict.changed_regions
    assert (region.kind, region.shift) == ("moved", (3, 2))
    assert region.a is not None and region.b is not None
    assert (region.b.x - region.a.x, region.b.y - region.a.y) == (3, 2)
    assert region.a.y >= 110 and region.a.y + region.a.height <= 150  # the label's line
    assert strict.is_similar is False and "1 region moved" in strict.summary
    moves_ignored = _run(a, b, ComparisonConfig(match_level="ignore_moves"))
    assert moves_ignored.is_similar is True
    assert [r.kind for r in moves_ignored.changed_regions] == ["moved"]  # still reported
    # Per region: a carousel-like box at ignore_moves, the rest strict.
    box = MatchRegion(x=20, y=100, width=400, height=60, match_level="ignore_moves")
    assert _run(a, b, ComparisonConfig(regions=[box])).is_similar is True
    # ... and a box elsewhere changes nothing.
    elsewhere = MatchRegion(x=0, y=200, width=100, height=60, match_level="ignore_moves")
    assert _run(a, b, ComparisonConfig(regions=[elsewhere])).is_similar is False


def test_a_changed_word_next_to_a_move_still_counts_under_ignore_moves() -> None:
    a = _png(screens.label_card(LABEL))
    b = screens.label_card(LABEL, offset=(3, 2))
    ImageDraw.Draw(b).text((330, 252), "Sent", fill="white", font=screens.font(20))
    result = _run(a, _png(b), ComparisonConfig(match_level="ignore_moves"))
    assert sorted(r.kind for r in result.changed_regions) == ["changed", "moved"]
    assert result.is_similar is False


def _stamped(stamp: str) -> Image.Image:
    image = screens.label_card("Order 5521 shipped")
    ImageDraw.Draw(image).text((300, 16), stamp, fill="white", font=screens.font(16))
    return image


def test_an_ignore_box_hides_a_clock() -> None:
    a, b = _png(_stamped("09:14:03")), _png(_stamped("17:55:41"))
    assert _run(a, b).is_similar is False
    clock = MatchRegion(x=290, y=8, width=180, height=32, match_level="ignore")
    result = _run(a, b, ComparisonConfig(regions=[clock]))
    assert result.is_similar is True and result.changed_regions == []


def test_exact_counts_every_pixel_over_the_threshold() -> None:
    """The same text with other smoothing: no change, except to ``exact``, which has no
    anti-aliasing or noise filter; in a box, only inside it."""
    a, b = (
        _png(screens.smoothed_label(LABEL, Image.Resampling.LANCZOS)),
        _png(screens.smoothed_label(LABEL, Image.Resampling.BOX)),
    )
    assert _run(a, b).is_similar is True
    exact = _run(a, b, ComparisonConfig(match_level="exact"))
    assert exact.is_similar is False and exact.changed_regions
    inside = MatchRegion(x=40, y=100, width=420, height=60, match_level="exact")
    assert _run(a, b, ComparisonConfig(regions=[inside])).is_similar is False
    away = MatchRegion(x=0, y=250, width=100, height=60, match_level="exact")
    assert _run(a, b, ComparisonConfig(regions=[away])).is_similar is True


def _themed(bar: tuple[int, int, int], button: tuple[int, int, int], text: str = "Save") -> bytes:
    image = Image.new("RGB", (480, 320), (245, 246, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 480, 48), fill=bar)
    draw.text((16, 12), "Settings", fill="white", font=screens.font(22))
    draw.rounded_rectangle((300, 240, 440, 290), radius=8, fill=button)
    draw.text((330, 252), text, fill="white", font=screens.font(20))
    draw.text((40, 120), LABEL, fill=(30, 30, 30), font=screens.font(16))
    return _png(image)


def test_ignore_colors_sees_a_theme_recolour_as_the_same_page() -> None:
    a = _themed((40, 80, 160), (30, 140, 70))
    recoloured = _themed((150, 40, 90), (200, 120, 20))
    assert _run(a, recoloured).is_similar is False
    colours = ComparisonConfig(match_level="ignore_colors")
    assert _run(a, recoloured, colours).is_similar is True
    # A changed word is structure: still a change.
    reworded = _themed((150, 40, 90), (200, 120, 20), text="Sent")
    result = _run(a, reworded, colours)
    assert result.is_similar is False and len(result.changed_regions) == 1
    assert result.changed_regions[0].y >= 240


# -- configuration ---------------------------------------------------------------------------


def test_invalid_levels_are_errors_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="match_level"):
        ComparisonConfig.model_validate({"match_level": "loose"})
    with pytest.raises(ValueError, match=r"regions\.0\.match_level"):
        ComparisonConfig.model_validate(
            {"regions": [{"x": 0, "y": 0, "width": 5, "height": 5, "match_level": "sometimes"}]}
        )
    monkeypatch.setenv("PAIRWATCH_COMPARISON__MATCH_LEVEL", "loose")
    with pytest.raises(ConfigFileError, match=r"comparison\.match_level"):
        load_settings()
    monkeypatch.setenv("PAIRWATCH_COMPARISON__MATCH_LEVEL", "ignore_moves")
    monkeypatch.setenv(
        "PAIRWATCH_COMPARISON__REGIONS",
        '[{"x": 1, "y": 2, "width": 3, "height": 4, "match_level": "ignore"}]',
    )
    settings = load_settings()
    assert settings.comparison.match_level == "ignore_moves"
    assert settings.comparison.regions == [
        MatchRegion(x=1, y=2, width=3, height=4, match_level="ignore")
    ]
    with pytest.raises(InvalidManifest, match="match_level"):
        Manifest("a.png", "b.png", {"match_level": "loose"}).config(ComparisonConfig())
    good = Manifest("a.png", "b.png", {"match_level": "exact"}).config(ComparisonConfig())
    assert good.match_level == "exact"


def test_a_level_box_outside_image_a_is_an_invalid_manifest() -> None:
    data = _png(screens.label_card("x"))
    outside = ComparisonConfig(
        regions=[MatchRegion(x=400, y=0, width=200, height=10, match_level="exact")]
    )
    with pytest.raises(InvalidManifest, match=r"regions\[0\]"):
        detect(data, data, max_pixels=BUDGET, regions=outside.regions)
    result = _run(data, data, outside)
    assert result.error is not None and result.error.type == "invalid_manifest"
    assert "regions[0]" in result.error.message


# -- sensitivity -----------------------------------------------------------------------------


def test_one_strongly_changed_pixel_between_lossless_inputs_is_a_change() -> None:
    """BackstopJS's fixture in spirit: one pixel of a flat page; PNG, lossless WebP, BMP."""
    page = Image.new("RGB", (200, 120), (250, 250, 250))
    ImageDraw.Draw(page).text((20, 50), "Logo", fill=(20, 20, 20), font=screens.font(20))
    dotted = page.copy()
    dotted.putpixel((150, 30), (200, 30, 30))
    for fmt, params in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {})):
        result = _run(scenes.encode(page, fmt, **params), scenes.encode(dotted, fmt, **params))
        assert result.is_similar is False, fmt
        (region,) = result.changed_regions
        assert region.x <= 150 < region.x + region.width and region.width <= 5, fmt
    # A weak one (under the strong threshold) is not, and neither is re-encoding noise.
    faint = page.copy()
    faint.putpixel((150, 30), (236, 236, 236))
    assert _run(_png(page), _png(faint)).is_similar is True
    photo = scenes.photo("coffee")
    assert _run(scenes.encode(photo, "JPEG", quality=92), scenes.reencoded(photo)).is_similar


def _circle(smooth: bool, background: tuple[int, ...]) -> Image.Image:
    """A black disc: drawn at 4x and averaged down (coverage anti-aliasing) or drawn aliased;
    on white, or on a transparent background."""
    mode = "RGBA" if len(background) == 4 else "RGB"
    ink = (0, 0, 0, 255) if mode == "RGBA" else (0, 0, 0)
    if smooth:
        big = Image.new(mode, (400, 400), background)
        ImageDraw.Draw(big).ellipse((40, 40, 360, 360), fill=ink)
        return big.resize((100, 100), Image.Resampling.BOX)
    image = Image.new(mode, (100, 100), background)
    ImageDraw.Draw(image).ellipse((10, 10, 90, 90), fill=ink)
    return image


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0, 0)], ids=["white", "clear"])
def test_anti_aliasing_in_either_image_is_not_a_change(background: tuple[int, ...]) -> None:
    """odiff's fixture in spirit: a circle with anti-aliasing on and off. Only the few edge
    pixels no smoothing explains stay (odiff and pixelmatch keep 38 of theirs); against a
    transparent background too."""
    a, b = _png(_circle(True, background)), _png(_circle(False, background))
    detection = detect(a, b, max_pixels=BUDGET)
    assert detection.differing_pixels > 200
    assert detection.changed_pixels < detection.differing_pixels // 5
    exact = detect(a, b, max_pixels=BUDGET, match_level="exact")
    assert exact.changed_pixels > 3 * detection.changed_pixels


def test_a_shape_smoothed_two_ways_on_a_transparent_background_is_the_same() -> None:
    """pixelmatch's 5a/5b in spirit: anti-aliasing only, on transparency."""

    def shape(resample: Image.Resampling) -> bytes:
        big = Image.new("RGBA", (480, 320), (0, 0, 0, 0))
        draw = ImageDraw.Draw(big)
        draw.polygon([(40, 40), (440, 80), (240, 300)], fill=(30, 60, 200, 255))
        draw.line((20, 300, 460, 20), fill=(200, 30, 30, 255), width=12)
        return _png(big.resize((120, 80), resample))

    a, b = shape(Image.Resampling.BILINEAR), shape(Image.Resampling.BOX)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(a))), Image.open(io.BytesIO(b)))
    result = _run(a, b)
    assert result.is_similar is True and result.changed_regions == []
