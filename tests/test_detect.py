"""Native-resolution change detection on rendered screenshots and real photos, through the real
decoders and libvips; and the pipeline around it (ignore regions, formats, decode budget, cache)."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pillow_heif
import pytest
import structlog
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from handler import images as images_module
from handler.align import Alignment, Profiles
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, IgnoreRegion
from handler.crops import MAX_CROPS, cut_crops
from handler.detect import Detection, detect
from handler.errors import ImageTooLarge, InvalidImage, InvalidManifest
from handler.pairs import is_image_name
from handler.pipeline import ImageInput, PairOutcome, compare_pair
from handler.regions import REGION_PAD
from handler.result import Region
from tests.support import scenes, screens
from tests.support.logs import captured_logs
from tests.support.waiting import wait_for

COMPARATOR = MetricsComparator()
BUDGET = 50_000_000


def _inside(box: tuple[int, int, int, int], region: Region, slack: int = 0) -> bool:
    x, y, width, height = box
    return (
        region.x - slack <= x
        and region.y - slack <= y
        and x + width <= region.x + region.width + slack
        and y + height <= region.y + region.height + slack
    )


def _run(a: bytes, b: bytes, config: ComparisonConfig | None = None, **kw: object) -> PairOutcome:
    return compare_pair(
        "pair",
        ImageInput("a.png", lambda: a),
        ImageInput("b.png", lambda: b),
        config or ComparisonConfig(),
        COMPARATOR,
        max_input_pixels=BUDGET,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def long_page() -> tuple[screens.Page, screens.Page, int]:
    """A 1400x5000 page of text, and the same page with one word replaced near the bottom."""
    page = screens.text_page((1400, 5000))
    index = len(page.words) * 4 // 5
    return page, screens.text_page((1400, 5000), replace={index: "zephyr"}), index


def test_one_changed_word_in_a_long_page(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    page, edited, index = long_page
    outcome = _run(screens.png(page.image), screens.png(edited.image))
    result = outcome.result
    assert result.status == "ok" and result.is_similar is False
    assert len(result.changed_regions) == 1
    word_box = edited.words[index][1]
    assert _inside(word_box, result.changed_regions[0], slack=2), (word_box, result.changed_regions)
    # Tight: the region is about one word, not a line or the page.
    assert result.changed_regions[0].width < 3 * word_box[2]
    assert result.changed_regions[0].height < 2 * word_box[3]
    assert 0 < result.metrics["changed_pixels"] < 2000
    assert result.metrics["changed_percent"] < 0.05
    assert result.similarity is not None and result.similarity < 0.93
    assert result.differences[-1].region == 0


def test_rescaled_page_maps_the_region_back_to_a(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    """B at half size: compared at B's resolution, the region still comes in A's pixels."""
    page, edited, index = long_page
    small = edited.image.resize((700, 2500), Image.Resampling.LANCZOS)
    detection = detect(screens.png(page.image), screens.png(small), max_pixels=BUDGET)
    assert detection.work_size == (700, 2500)
    word_box = edited.words[index][1]
    assert any(_inside(word_box, region, slack=4) for region in detection.regions)
    for region in detection.regions:
        assert region.x + region.width <= 1400 and region.y + region.height <= 5000


def test_label_moved_by_a_few_pixels() -> None:
    a = screens.label_card("Delivery address: 221B Baker Street")
    b = screens.label_card("Delivery address: 221B Baker Street", offset=(3, 2))
    outcome = _run(screens.png(a), screens.png(b))
    assert outcome.result.is_similar is False
    (region,) = outcome.result.changed_regions
    assert region.y >= 110 and region.y + region.height <= 150  # the label's line, nothing else


def test_anti_aliasing_only_rerender_is_similar() -> None:
    text = "Delivery address: 221B Baker Street"
    a = screens.smoothed_label(text, Image.Resampling.LANCZOS)
    b = screens.smoothed_label(text, Image.Resampling.BOX)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    outcome = _run(screens.png(a), screens.png(b))
    assert outcome.result.changed_regions == []
    assert outcome.result.is_similar is True
    assert outcome.result.metrics["pixel_identical"] == 0.0
    # ...while one changed letter in the same rendering is found.
    changed = _run(
        screens.png(a),
        screens.png(
            screens.smoothed_label("Delivery address: 221B Baker Streat", Image.Resampling.LANCZOS)
        ),
    )
    assert changed.result.is_similar is False and len(changed.result.changed_regions) == 1


def _timestamped(stamp: str) -> Image.Image:
    image = screens.label_card("Order 5521 shipped")
    ImageDraw.Draw(image).text((300, 16), stamp, fill="white", font=screens.font(16))
    return image


def test_an_ignore_region_hides_a_changing_timestamp() -> None:
    a, b = _timestamped("2026-12-01 09:14:03"), _timestamped("2026-12-02 17:55:41")
    plain = _run(screens.png(a), screens.png(b))
    assert plain.result.is_similar is False
    (stamp,) = plain.result.changed_regions
    ignore = IgnoreRegion(x=290, y=8, width=180, height=32)
    assert _inside((stamp.x, stamp.y, stamp.width, stamp.height), Region(**ignore.model_dump()))
    config = ComparisonConfig(ignore_regions=[ignore])
    outcome = _run(screens.png(a), screens.png(b), config, diff_image=True)
    assert outcome.result.is_similar is True and outcome.result.changed_regions == []
    assert outcome.result.similarity == 1.0  # masked in both: nothing else differs
    assert outcome.result.config.ignore_regions == [ignore]
    # Drawn hatched in the diff image.
    assert outcome.diff_png is not None
    with Image.open(io.BytesIO(outcome.diff_png)) as img:
        pixels = np.asarray(img.convert("RGB"))
    from handler.diff_image import HATCH_COLOR

    assert np.all(pixels == HATCH_COLOR, axis=2).sum() > 100
    # A change outside the ignored box is still found.
    moved = _timestamped("2026-12-02 17:55:41")
    ImageDraw.Draw(moved).rectangle((40, 200, 60, 220), fill=(200, 30, 30))
    assert _run(screens.png(a), screens.png(moved), config).result.is_similar is False


def test_ignore_regions_are_validated() -> None:
    with pytest.raises(ValueError, match="ignore_regions"):
        ComparisonConfig.model_validate(
            {"ignore_regions": [{"x": -1, "y": 0, "width": 5, "height": 5}]}
        )
    with pytest.raises(ValueError, match="ignore_regions"):
        ComparisonConfig.model_validate(
            {"ignore_regions": [{"x": 1, "y": 0, "width": 0, "height": 5}]}
        )
    data = screens.png(screens.label_card("x"))
    outside = ComparisonConfig(ignore_regions=[IgnoreRegion(x=400, y=0, width=200, height=10)])
    with pytest.raises(InvalidManifest, match=r"ignore_regions\[0\]"):
        detect(data, data, max_pixels=BUDGET, ignore=outside.ignore_regions)
    result = _run(data, data, outside).result
    assert result.status == "error" and result.error is not None
    assert result.error.type == "invalid_manifest" and "ignore_regions[0]" in result.error.message


def _heic(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pillow_heif.from_pillow(img).save(buffer, quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heic_inputs(fmt: str) -> None:
    photo = scenes.photo("chelsea")
    encoded = _heic(photo) if fmt == "HEIF" else scenes.encode(photo, "AVIF", quality=90)
    same = _run(scenes.encode(photo), encoded).result
    assert same.status == "ok", same.error
    assert same.inputs[1].format == fmt and same.inputs[1].original_size == photo.size
    assert same.is_similar is True and same.changed_regions == []
    edited = Image.open(io.BytesIO(scenes.pasted_object(photo))).convert("RGB")
    changed_bytes = _heic(edited) if fmt == "HEIF" else scenes.encode(edited, "AVIF", quality=90)
    changed = _run(scenes.encode(photo), changed_bytes).result
    assert changed.is_similar is False and changed.changed_regions
    # Over the pixel budget: refused from the header, in preparation and in detection.
    refused = compare_pair(
        "pair",
        ImageInput("a.jpg", lambda: encoded),
        ImageInput("b.jpg", lambda: encoded),
        ComparisonConfig(),
        COMPARATOR,
        max_input_pixels=100_000,
    ).result
    assert refused.error is not None and refused.error.type == "image_too_large"
    with pytest.raises(ImageTooLarge):
        detect(encoded, encoded, max_pixels=100_000)
    assert is_image_name(f"photo.{'heic' if fmt == 'HEIF' else 'avif'}")


def test_transparency_only_difference_is_reported_as_such() -> None:
    a = Image.new("RGBA", (200, 120), (255, 255, 255, 255))
    ImageDraw.Draw(a).text((20, 50), "Logo", fill=(0, 0, 0, 255), font=screens.font(20))
    b = a.copy()
    ImageDraw.Draw(b).rectangle((120, 20, 180, 100), fill=(255, 255, 255, 0))  # white -> clear
    detection = detect(screens.png(a), screens.png(b), max_pixels=BUDGET)
    assert not detection.identical
    assert detection.transparency_only and detection.transparency_pixels == 61 * 81
    (region,) = detection.regions
    pad = REGION_PAD  # tight bounds of the changed pixels, plus the rim margin
    assert (region.x, region.y, region.width, region.height) == (
        120 - pad,
        20 - pad,
        61 + 2 * pad,
        81 + 2 * pad,
    )
    result = _run(screens.png(a), screens.png(b)).result
    assert result.is_similar is False and result.metrics["pixel_identical"] == 0.0
    assert "transparency" in result.summary
    assert result.differences[-1].aspect == "transparency"


def test_identical_pairs_are_exact_and_re_encodes_are_not_identical() -> None:
    data = scenes.encode(scenes.photo("coffee"), "PNG")
    same = detect(data, data, max_pixels=BUDGET)
    assert same.identical and same.differing_pixels == 0 and same.regions == ()
    result = _run(data, data).result
    assert result.similarity == 1.0 and result.metrics["pixel_identical"] == 1.0
    other = detect(data, scenes.reencoded(scenes.photo("coffee")), max_pixels=BUDGET)
    assert not other.identical and other.regions == ()


def test_a_pixel_identical_pair_shares_one_resized_copy() -> None:
    """Other bytes, the same pixels (PNG at another zlib level): one copy is made for both;
    a pair that differs, or whose differing pixels are masked, gets one copy each."""
    page = screens.label_card("Delivery address: 221B Baker Street", size=(1280, 800))
    a, b = screens.png(page), screens.png(page, compress_level=1)
    assert a != b
    sizes = ((1024, 640), (1024, 640))
    same = detect(a, b, max_pixels=BUDGET, shrunk_sizes=sizes)
    assert same.identical and same.shrunk[0] is same.shrunk[1] is not None
    edited = page.copy()
    ImageDraw.Draw(edited).rectangle((40, 200, 60, 220), fill=(200, 30, 30))
    changed = detect(a, screens.png(edited), max_pixels=BUDGET, shrunk_sizes=sizes)
    first, second = changed.shrunk
    assert first is not None and second is not None and first is not second
    assert first.tobytes() != second.tobytes()
    masked = detect(
        a,
        screens.png(edited),
        max_pixels=BUDGET,
        shrunk_sizes=sizes,
        ignore=[IgnoreRegion(x=30, y=190, width=40, height=40)],
    )
    assert masked.identical and masked.shrunk[0] is not masked.shrunk[1]


def test_exif_rotated_input_is_compared_upright() -> None:
    photo = scenes.photo("astronaut")
    edited = Image.open(io.BytesIO(scenes.pasted_object(photo))).convert("RGB")
    rotated = scenes.exif_rotated(edited)
    detection = detect(scenes.encode(photo), rotated, max_pixels=BUDGET)
    assert detection.size_b == photo.size
    x, y, side, _ = scenes.pasted_box(photo)
    (region,) = detection.regions
    assert abs(region.x - x) <= 8 and abs(region.y - y) <= 8 and abs(region.width - side) <= 16


def test_bad_inputs_are_clear_errors_before_decoding() -> None:
    good = scenes.encode(scenes.photo("coffee"))
    with pytest.raises(InvalidImage) as garbage:
        detect(good, b"not an image at all", max_pixels=BUDGET)
    assert garbage.value.details["input"] == "b"
    with pytest.raises(ImageTooLarge):
        detect(good, good, max_pixels=1000)
    truncated = scenes.encode(scenes.photo("coffee"), "PNG")[:5000]
    with pytest.raises(InvalidImage):
        detect(good, truncated, max_pixels=BUDGET)


def test_crops_show_the_region_at_native_resolution(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    page, edited, index = long_page
    a, b = screens.png(page.image), screens.png(edited.image)
    detection = detect(a, b, max_pixels=BUDGET)
    (crop,) = cut_crops(a, b, detection, max_pixels=BUDGET)
    assert crop.a.size == crop.b.size == (448, 448)
    x, y = crop.box_a.x, crop.box_a.y
    expected = page.image.crop((x, y, x + 448, y + 448))
    assert np.array_equal(np.asarray(crop.a), np.asarray(expected))  # native, not resampled
    assert np.array_equal(
        np.asarray(crop.b), np.asarray(edited.image.crop((x, y, x + 448, y + 448)))
    )
    assert _inside(edited.words[index][1], crop.box_a)


def test_crops_are_bounded_for_large_regions() -> None:
    photo = scenes.photo("coffee").resize((2400, 1600))
    a, b = scenes.encode(photo), scenes.mirrored(photo)
    detection = detect(a, b, max_pixels=BUDGET)
    crops = cut_crops(a, b, detection, max_pixels=BUDGET)
    assert 1 <= len(crops) <= MAX_CROPS
    for crop in crops:
        assert max(crop.a.size) <= 448 and max(crop.b.size) <= 448


def _held(logs: list[Any], pair_id: str) -> tuple[float, float]:
    """When ``pair_id`` held the decode budget: its decode_started and decode_finished times."""
    (start,) = [e["at"] for e in logs if e["event"] == "decode_started" and e["pair_id"] == pair_id]
    (end,) = [e["at"] for e in logs if e["event"] == "decode_finished" and e["pair_id"] == pair_id]
    return start, end


def _started(logs: list[Any], *pair_ids: str) -> bool:
    started = {e["pair_id"] for e in list(logs) if e["event"] == "decode_started"}
    return started >= set(pair_ids)


def test_small_pairs_decode_side_by_side_and_a_large_pair_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Budget 6 MP: two pairs of 0.5 MP inputs (1 MP each) decode at the same time; a pair of
    4 MP inputs (8 MP: more than the whole budget) runs alone, whether it comes after them or
    before them."""
    import handler.pipeline as pipeline

    page = screens.text_page((1000, 500))
    small = screens.png(page.image), screens.png(screens.replace_words(page, {3: "zephyr"}).image)
    photo = scenes.photo("astronaut").resize((2000, 2000))
    large = scenes.encode(photo), scenes.pasted_object(photo)
    # The two small pairs of a round must be inside detection at once, or this barrier breaks
    # (after its timeout) and their pairs fail.
    both_small = threading.Barrier(2, timeout=30)

    def detect_meeting(data_a: bytes, *args: Any, **kwargs: Any) -> Detection:
        if data_a == small[0]:
            both_small.wait()
        return detect(data_a, *args, **kwargs)

    monkeypatch.setattr(pipeline, "detect", detect_meeting)
    results: dict[str, bool | None] = {}

    def start(pair_id: str) -> threading.Thread:
        pair = large if pair_id.startswith("large") else small

        def run() -> None:
            outcome = compare_pair(
                pair_id,
                ImageInput("a", lambda: pair[0]),
                ImageInput("b", lambda: pair[1]),
                ComparisonConfig(),
                COMPARATOR,
                max_input_pixels=BUDGET,
                decode_budget_mp=6,
            )
            results[pair_id] = outcome.result.is_similar

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with captured_logs() as logs:
        # After two small pairs decoding side by side...
        threads = [start("small-1"), start("small-2")]
        wait_for(lambda: _started(logs, "small-1", "small-2"), 60)
        threads.append(start("large-1"))
        for thread in threads:
            thread.join(timeout=120)
        # ... and before two others.
        threads = [start("large-2")]
        wait_for(lambda: _started(logs, "large-2"), 60)
        threads += [start("small-3"), start("small-4")]
        for thread in threads:
            thread.join(timeout=120)
    assert results == {name: False for name in ("small-1", "small-2", "small-3", "small-4",
                                                "large-1", "large-2")}  # fmt: skip
    for first, second, large in (
        ("small-1", "small-2", "large-1"),
        ("small-3", "small-4", "large-2"),
    ):
        one, other, alone = _held(logs, first), _held(logs, second), _held(logs, large)
        assert max(one[0], other[0]) < min(one[1], other[1]), "the small pairs did not overlap"
        for held in (one, other):
            assert alone[1] <= held[0] or held[1] <= alone[0], "the large pair did not run alone"
    waited = {e["pair_id"]: e for e in logs if e["event"] == "decode_started"}
    assert waited["large-1"]["megapixels"] == 8.0 and waited["large-1"]["budget_in_use_mp"] == 6.0
    assert waited["small-3"]["waited_ms"] > 0 and waited["large-2"]["waited_ms"] < 100


def test_prepared_images_are_cached_and_hits_logged() -> None:
    """A reference at twice B's size is compared at B's size: detection makes no copy of it,
    so it is decoded on its own for its prepared image, and that is what the cache keeps.
    B's prepared image comes from detection's copy (no decode of its own): never kept."""
    photo = scenes.photo("chelsea")
    reference = scenes.encode(photo.resize((photo.width * 2, photo.height * 2)))
    other = scenes.pasted_object(photo)
    with structlog.testing.capture_logs() as logs:
        first = _run(reference, other, cache_mb=8).result
        second = _run(reference, other, cache_mb=8).result
        off = _run(reference, other, cache_mb=0).result
    prepared = [
        (entry["cache"], entry["from_detection"])
        for entry in logs
        if entry["event"] == "image_prepared"
    ]
    assert prepared == [
        ("miss", False),
        ("miss", True),
        ("hit", False),
        ("miss", True),
        ("off", False),
        ("off", True),
    ]
    assert first.similarity == second.similarity == off.similarity
    detected = [entry for entry in logs if entry["event"] == "changes_detected"]
    assert len(detected) == 3 and all(entry["regions"] == 1 for entry in detected)


def test_a_large_screenshot_is_decoded_once(
    long_page: tuple[screens.Page, screens.Page, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large PNG's prepared image comes from the copy detection shrinks on the way: no second
    decode (``prepare`` is never called), the same size as ``prepare`` gives it."""
    from handler import pipeline

    page, edited, _ = long_page
    a, b = screens.png(page.image), screens.png(edited.image)
    config = ComparisonConfig()
    expected = images_module.prepare(a, config.max_image_size, config.image_quality)

    def second_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a streamed input was decoded a second time")

    monkeypatch.setattr(pipeline, "prepare", second_decode)
    with structlog.testing.capture_logs() as logs:
        result = _run(a, b, config, diff_image=True).result
    assert result.status == "ok" and len(result.changed_regions) == 1
    prepared = [entry for entry in logs if entry["event"] == "image_prepared"]
    assert [entry["from_detection"] for entry in prepared] == [True, True]
    assert result.inputs[0].processed_size == result.inputs[1].processed_size == expected.size
    assert result.inputs[0].original_size == page.image.size


def test_the_shrunk_copy_looks_like_the_prepared_image(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    page, edited, _ = long_page
    a = screens.png(page.image)
    config = ComparisonConfig()
    decoded = images_module.prepare(a, config.max_image_size, config.image_quality)
    wanted = images_module.fitted_size(page.image.size, config.max_image_size)
    detection = detect(a, screens.png(edited.image), max_pixels=BUDGET, shrunk_sizes=(wanted, None))
    shrunk, none = detection.shrunk
    assert none is None and shrunk is not None and shrunk.size == wanted
    header = images_module.read_header(a, BUDGET)
    finished = images_module.prepare_shrunk(
        header, shrunk, config.max_image_size, config.image_quality
    )
    assert finished.size == decoded.size and finished.original_size == decoded.original_size
    gap = np.abs(np.asarray(finished.image, np.int16) - np.asarray(decoded.image, np.int16))
    assert gap.mean() < 2.0, gap.mean()


def test_a_rescaled_copy_is_prepared_from_its_own_pixels(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    """Detection compares at the smaller size: only that input's copy is shrunk on the way; the
    larger one is decoded for its prepared image, at its own resolution."""
    page, _, _ = long_page
    double = page.image.resize((2800, 10000), Image.Resampling.BICUBIC)
    with structlog.testing.capture_logs() as logs:
        result = _run(screens.png(page.image), screens.png(double)).result
    assert result.status == "ok", result.error
    prepared = [entry for entry in logs if entry["event"] == "image_prepared"]
    assert [entry["from_detection"] for entry in prepared] == [True, False]
    assert result.inputs[1].original_size == (2800, 10000)
    assert result.inputs[1].processed_size == result.inputs[0].processed_size == (287, 1024)


def test_a_truncated_large_png_is_an_error_of_that_input(
    long_page: tuple[screens.Page, screens.Page, int],
) -> None:
    page, _, _ = long_page
    whole = screens.png(page.image)
    result = _run(whole, whole[: len(whole) * 2 // 3]).result
    assert result.status == "error" and result.error is not None
    assert (result.error.type, result.error.input) == ("invalid_image", "b")
    assert "decode" in result.error.message
    assert result.inputs[1].format == "PNG" and result.inputs[1].original_size == (1400, 5000)


def test_detection_result_is_frozen_and_self_describing() -> None:
    data = screens.png(screens.label_card("x"))
    detection = detect(data, data, max_pixels=BUDGET)
    assert isinstance(detection, Detection)
    assert detection.metrics() == {
        "changed_pixels": 0.0,
        "changed_percent": 0.0,
        "moved_pixels": 0.0,
        "transparency_pixels": 0.0,
        "pixel_identical": 1.0,
    }
    with pytest.raises(AttributeError):
        detection.changed_pixels = 3  # type: ignore[misc]


def test_ignore_regions_and_cache_mb_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from handler.config import ConfigFileError, load_settings
    from handler.pairs import Manifest

    box = '[{"x": 10, "y": 20, "width": 30, "height": 40}]'
    monkeypatch.setenv("PAIRWATCH_COMPARISON__IGNORE_REGIONS", box)
    monkeypatch.setenv("PAIRWATCH_CACHE_MB", "0")
    settings = load_settings()
    assert settings.comparison.ignore_regions == [IgnoreRegion(x=10, y=20, width=30, height=40)]
    assert settings.cache_mb == 0
    monkeypatch.setenv("PAIRWATCH_CACHE_MB", "-1")
    with pytest.raises(ConfigFileError, match="cache_mb"):
        load_settings()
    bad = Manifest(
        "a.png", "b.png", {"ignore_regions": [{"x": 0, "y": -5, "width": 1, "height": 1}]}
    )
    with pytest.raises(InvalidManifest, match=r"ignore_regions\.0\.y"):
        bad.config(ComparisonConfig())


def _banner_pair() -> tuple[Image.Image, Image.Image]:
    """A label card, and the same with one word changed below a 60 px band inserted above."""
    tall = (480, 1000)
    card = screens.label_card("Delivery address: 221B Baker Street", (0, 600), size=tall)
    edited = screens.label_card("Delivery address: 10 Downing Street", (0, 600), size=tall)
    return card, _banded(edited, 0)


def _banded(image: Image.Image, at: int) -> Image.Image:
    """``image`` with a 60 px band inserted at row ``at``."""
    banner = Image.new("RGB", (image.width, image.height + 60), (253, 241, 199))
    banner.paste(image.crop((0, 0, image.width, at)), (0, 0))
    banner.paste(image.crop((0, at, image.width, image.height)), (0, at + 60))
    return banner


def test_crops_come_from_each_regions_own_place_in_each_image() -> None:
    """An added band's crop is cut from B alone; a changed region's pair from its place in A
    and its place in B (60 px lower, below the band)."""
    card, banner = _banner_pair()
    a, b = screens.png(card), screens.png(banner)
    detection = detect(a, b, max_pixels=BUDGET)
    crops = cut_crops(a, b, detection, max_pixels=BUDGET)
    by_kind = {detection.regions[crop.region].kind: crop for crop in crops}
    added, changed = by_kind["added"], by_kind["changed"]
    assert added.a is None and added.box_a is None and added.b is not None
    assert np.asarray(added.b)[5, 5].tolist() == [253, 241, 199]  # the band's own colour
    assert changed.a is not None and changed.b is not None
    assert changed.box_a is not None and changed.box_b is not None
    assert changed.box_b.y - changed.box_a.y == 60
    x, y, w, h = changed.box_a.x, changed.box_a.y, changed.box_a.width, changed.box_a.height
    assert np.array_equal(np.asarray(changed.a), np.asarray(card.crop((x, y, x + w, y + h))))
    x, y = changed.box_b.x, changed.box_b.y
    assert np.array_equal(np.asarray(changed.b), np.asarray(banner.crop((x, y, x + w, y + h))))


@pytest.mark.parametrize("at", [0, 480])
def test_an_aligned_pair_of_small_inputs_is_decoded_once(
    monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """A page of text with a band inserted (at the top, or below 480 rows that stayed the
    same: their signatures wait until a strip differs) and a word changed below it: pass 2,
    along the alignment, reads the pixels pass 1 kept (as it made the prepared images'
    copies) instead of decoding both inputs again, and the crops are cut from them; findings
    and crops are those of passes that decode again (and sign every strip as it passes)."""
    import handler.crops as crops_module
    import handler.detect as detect_module

    page = screens.text_page((600, 1000))
    word = next(i for i, (_, box) in enumerate(page.words) if box[1] > 700)
    edited = screens.replace_words(page, {word: "zephyr"})
    a, b = screens.png(page.image), screens.png(_banded(edited.image, at))
    decoded: list[bytes] = []
    signatures: list[list[NDArray[Any]]] = []
    real, real_align = detect_module.normalised, detect_module.align

    def counted(data: bytes, *args: Any) -> Any:
        decoded.append(data)
        return real(data, *args)

    def align(profile_a: Profiles, profile_b: Profiles) -> Alignment | None:
        signatures.append([p.copy() for s in (profile_a, profile_b) for p in (s.rows, s.columns)])
        return real_align(profile_a, profile_b)

    # Where each decode is looked up: the passes (detect) and the crops' own pass (crops).
    monkeypatch.setattr(detect_module, "normalised", counted)
    monkeypatch.setattr(crops_module, "normalised", counted)
    monkeypatch.setattr(detect_module, "align", align)
    again = detect(a, b, max_pixels=BUDGET)
    assert again.alignment is not None and decoded == [a, b, a, b]  # two passes
    assert sorted(region.kind for region in again.regions) == ["added", "changed"]
    decoded.clear()
    kept = detect(a, b, max_pixels=BUDGET, shrunk_sizes=((300, 500), (300, 530)), keep_pixels=True)
    assert decoded == [a, b]  # once each
    assert kept == again and kept.shrunk[0] is not None and kept.shrunk[1] is not None
    eager, waited = signatures  # what the alignment was made from: the same
    assert all(np.array_equal(one, other) for one, other in zip(eager, waited, strict=True))
    crops = cut_crops(a, b, kept, max_pixels=BUDGET)
    assert decoded == [a, b]  # cut from the kept pixels
    for ours, theirs in zip(crops, cut_crops(a, b, again, max_pixels=BUDGET), strict=True):
        assert (ours.box_a, ours.box_b) == (theirs.box_a, theirs.box_b)
        for mine, other in ((ours.a, theirs.a), (ours.b, theirs.b)):
            assert (mine is None) == (other is None)
            if mine is not None and other is not None:
                assert np.array_equal(np.asarray(mine), np.asarray(other))
