"""The metrics comparator on real photographs: what must count as similar, and what must not.

Each pair goes through the real native-resolution detection first, as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, ImageDraw

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, MatchLevel, MatchRegion
from handler.detect import detect
from handler.images import PreparedImage, prepare
from handler.result import Region
from tests.support import scenes, screens

CONFIG = ComparisonConfig()
COMPARATOR = MetricsComparator()


def _prepared(data: bytes) -> PreparedImage:
    return prepare(data, CONFIG.max_image_size, CONFIG.image_quality)


def _compare(a: bytes, b: bytes, config: ComparisonConfig = CONFIG) -> Verdict:
    detection = detect(
        a,
        b,
        max_pixels=50_000_000,
        ignore=config.ignore_regions,
        match_level=config.match_level,
        regions=config.regions,
    )
    return COMPARATOR.compare(_prepared(a), _prepared(b), config, detection=detection)


def _overlaps(region: Region, box: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    return (
        region.x < x + w
        and x < region.x + region.width
        and region.y < y + h
        and y < (region.y + region.height)
    )


@pytest.mark.parametrize("photo", scenes.PHOTOS)
@pytest.mark.parametrize("edit", sorted(scenes.SIMILAR_EDITS))
def test_same_picture_is_similar(photo: str, edit: str) -> None:
    img = scenes.photo(photo)
    outcome = _compare(scenes.encode(img), scenes.SIMILAR_EDITS[edit](img))
    assert outcome.is_similar, outcome.metrics
    assert outcome.similarity >= CONFIG.similarity_threshold
    assert outcome.changed_regions == []


@pytest.mark.parametrize("photo", scenes.PHOTOS)
@pytest.mark.parametrize("edit", sorted(scenes.DIFFERENT_EDITS))
def test_edited_picture_is_not_similar(photo: str, edit: str) -> None:
    img = scenes.photo(photo)
    outcome = _compare(scenes.encode(img), scenes.DIFFERENT_EDITS[edit](img))
    assert not outcome.is_similar, outcome.metrics
    assert outcome.changed_regions, "an edit must produce at least one changed region"
    assert "different" in outcome.summary


LOCAL_EDITS: dict[str, tuple[Callable[[Image.Image], bytes], Callable[..., tuple[int, ...]]]] = {
    "pasted_object": (scenes.pasted_object, scenes.pasted_box),
    "blurred_region": (scenes.blurred_region, scenes.blurred_box),
}


@pytest.mark.parametrize("photo", scenes.PHOTOS)
@pytest.mark.parametrize("edit", sorted(LOCAL_EDITS))
def test_changed_region_overlaps_the_edit(photo: str, edit: str) -> None:
    make, box_of = LOCAL_EDITS[edit]
    img = scenes.photo(photo).resize((1600, 1200))  # originals larger than the prepared size
    outcome = _compare(scenes.encode(img), make(img))
    box = box_of(img)
    assert any(_overlaps(region, box) for region in outcome.changed_regions), (
        box,
        outcome.changed_regions,
    )
    for region in outcome.changed_regions:  # original pixel coordinates of A
        assert region.x + region.width <= 1600 and region.y + region.height <= 1200


def test_different_scenes() -> None:
    outcome = _compare(scenes.encode(scenes.photo("coffee")), scenes.encode(scenes.photo("rocket")))
    assert not outcome.is_similar
    assert outcome.similarity < 0.5
    assert any(d.aspect == "structure" for d in outcome.differences)


def test_identical_images() -> None:
    data = scenes.encode(scenes.photo("astronaut"))
    outcome = _compare(data, data)
    assert outcome.similarity == pytest.approx(1.0)
    assert outcome.metrics["pixel_identical"] == 1.0
    assert outcome.differences == []


def test_threshold_decides_is_similar() -> None:
    img = scenes.photo("chelsea")
    a, b = _prepared(scenes.encode(img)), _prepared(scenes.reencoded(img))
    strict = COMPARATOR.compare(a, b, CONFIG.model_copy(update={"similarity_threshold": 0.9999}))
    lenient = COMPARATOR.compare(a, b, CONFIG)
    assert strict.similarity == lenient.similarity
    assert not strict.is_similar and lenient.is_similar


def test_a_confident_region_makes_the_pair_different_and_lowers_similarity() -> None:
    img = scenes.photo("chelsea")
    a, b = scenes.encode(img), scenes.pasted_object(img)
    outcome = _compare(a, b, CONFIG.model_copy(update={"similarity_threshold": 0.1}))
    assert outcome.changed_regions and not outcome.is_similar
    changed = outcome.metrics["changed_percent"] / 100
    assert outcome.metrics["detection_similarity"] == pytest.approx(0.9 - 4 * changed, abs=1e-3)
    assert outcome.similarity <= outcome.metrics["detection_similarity"]


def test_recolouring_is_reported_as_colour() -> None:
    img = scenes.photo("coffee")
    outcome = _compare(scenes.encode(img), scenes.recoloured(img))
    assert any(d.aspect == "color" for d in outcome.differences)


@pytest.mark.parametrize("size", [(2560, 100), (3000, 1), (1, 900)])
def test_banners_and_lines_are_compared(size: tuple[int, int]) -> None:
    """Thinner than the SSIM window once downsized: stretched, never an exception."""
    img = scenes.photo("coffee").resize(size)
    a = _prepared(scenes.encode(img, "PNG"))
    assert COMPARATOR.compare(a, a, CONFIG).is_similar
    flipped = _prepared(scenes.mirrored(img))
    assert 0.0 <= COMPARATOR.compare(a, flipped, CONFIG).similarity <= 1.0


def _pages() -> dict[str, tuple[bytes, bytes]]:
    """Pairs the cheap path meets: the same pixels in other bytes; a label moved by a few
    pixels; a changing timestamp (to be left out by a box); an object pasted on a photo."""
    card = screens.label_card("Delivery address: 221B Baker Street")
    moved = screens.label_card("Delivery address: 221B Baker Street", offset=(3, 2))
    stamped = [screens.label_card("Order 5521 shipped") for _ in range(2)]
    for image, stamp in zip(stamped, ("2026-12-01 09:14:03", "2026-12-02 17:55:41"), strict=True):
        ImageDraw.Draw(image).text((300, 16), stamp, fill="white", font=screens.font(16))
    photo = scenes.photo("coffee")
    return {
        "re-encoded": (screens.png(card), screens.png(card, compress_level=1)),
        "moved": (screens.png(card), screens.png(moved)),
        "timestamp": (screens.png(stamped[0]), screens.png(stamped[1])),
        "pasted": (scenes.encode(photo), scenes.pasted_object(photo)),
    }


LEVELS: tuple[MatchLevel, ...] = ("strict", "ignore_moves", "exact", "ignore_colors")
#: Leaves the timestamp out (and, as a level box, makes every level lenient).
STAMP_BOX = MatchRegion(x=290, y=8, width=180, height=32, match_level="ignore")


@pytest.mark.parametrize("level", LEVELS)
def test_the_cheap_path_gives_the_scores_the_aligned_comparison_gives(
    level: MatchLevel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the detection found nothing that counts and nothing moved, the scores of
    identical images are set instead of computed: under every level, with and without a box
    left out, the verdict is the one computing every score on A and B laid out as A gives,
    and the scores are computed wherever anything moved or counts."""
    from handler.compare import metrics

    computed: list[int] = []
    real_scores = metrics._scores

    def scores(*args: Any) -> dict[str, float]:
        computed.append(1)
        return real_scores(*args)

    monkeypatch.setattr(metrics, "_scores", scores)
    cheap_pairs = set()
    for name, (a, b) in _pages().items():
        for boxes in ([], [STAMP_BOX]):
            config = ComparisonConfig(match_level=level, regions=boxes)
            computed.clear()
            verdict = _compare(a, b, config)
            if not computed:
                cheap_pairs.add((name, bool(boxes)))
            with monkeypatch.context() as always:
                always.setattr(metrics, "_quiet", lambda detection: False)
                reference = _compare(a, b, config)
            assert verdict == reference, (name, boxes)
            detection = detect(a, b, max_pixels=50_000_000, match_level=level, regions=boxes)
            if detection.moved_pixels or detection.differs or detection.alignment:
                assert computed, (name, boxes)
    # Cheap: the same pixels, and the timestamp once its box is left out.
    assert {("re-encoded", False), ("re-encoded", True), ("timestamp", True)} <= cheap_pairs
    assert ("moved", False) not in cheap_pairs and ("pasted", False) not in cheap_pairs
