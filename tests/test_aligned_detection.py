"""Content that moved told from content that changed, through the whole pipeline: full-page
screenshots rendered by headless Chromium (a banner inserted, a paragraph removed, a paragraph
that wraps, a wider margin, a word changed below an insertion), photographs from scikit-image
taken again with the camera moved a few pixels and an object added, and JPEG-recompressed
versions of each; their region kinds, boxes in both images, offsets and the verdict under each
match level. Also the size semantics: a size change is a difference, never a silent rescale."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, MatchLevel
from handler.pipeline import ImageInput, compare_pair
from handler.result import Box, ComparisonResult, Region
from tests.support import scenes
from tests.support.rendered import Rendered

LEVELS: tuple[MatchLevel, ...] = ("strict", "ignore_moves", "exact", "ignore_colors")
BUDGET = 50_000_000


def _compare(a: bytes, b: bytes, level: MatchLevel = "strict") -> ComparisonResult:
    return compare_pair(
        "pair",
        ImageInput("a", lambda: a),
        ImageInput("b", lambda: b),
        ComparisonConfig(match_level=level),
        MetricsComparator(),
        max_input_pixels=BUDGET,
    ).result


def _jpeg(data: bytes, quality: int = 90) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return scenes.encode(image.convert("RGB"), "JPEG", quality=quality)


def _pair(pages: dict[str, Rendered], name: str, encoding: str) -> tuple[bytes, bytes]:
    a, b = pages["base"].png, pages[name].png
    return (a, b) if encoding == "png" else (_jpeg(a), _jpeg(b))


def _xywh(box: Box | None) -> tuple[int, int, int, int]:
    assert box is not None
    return (box.x, box.y, box.width, box.height)


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int], slack: int) -> bool:
    x, y, w, h = inner
    ox, oy, ow, oh = outer
    return (
        ox - slack <= x
        and oy - slack <= y
        and x + w <= ox + ow + slack
        and y + h <= oy + oh + slack
    )


def _kinds(result: ComparisonResult) -> list[str]:
    return sorted(region.kind for region in result.changed_regions)


def _one(result: ComparisonResult, kind: str) -> Region:
    (region,) = [region for region in result.changed_regions if region.kind == kind]
    return region


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_banner_inserted_at_the_top_is_one_added_band(
    pages: dict[str, Rendered], encoding: str
) -> None:
    result = _compare(*_pair(pages, "banner", encoding))
    assert result.status == "ok" and result.is_similar is False
    assert _kinds(result) == ["added"]
    added = result.changed_regions[0]
    height = pages["banner"].boxes["banner"][3]
    width = pages["banner"].size[0]
    assert added.a is None and _xywh(added.b) == (0, 0, width, height)
    assert (added.x, added.y, added.width, added.height) == _xywh(added.b)
    assert result.alignment is not None and result.alignment.offset == (0, height)
    assert [(band.kind, band.a, band.b) for band in result.alignment.bands] == [
        ("inserted", None, (0, height)),
        ("matched", (0, pages["base"].size[1]), (height, pages["banner"].size[1])),
    ]
    assert f"a band {height} px high was added at the top of B" in result.summary
    assert f"everything below moved down by {height} px" in result.summary
    # The page below it is the same page: the metrics compare B laid out as A.
    assert result.metrics["ssim"] > 0.99 and result.metrics["hash_similarity"] > 0.95


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_removed_paragraph_is_one_removed_band(pages: dict[str, Rendered], encoding: str) -> None:
    result = _compare(*_pair(pages, "removed", encoding))
    assert result.is_similar is False and _kinds(result) == ["removed"]
    removed = result.changed_regions[0]
    paragraph = pages["base"].boxes["p2"]
    assert removed.b is None and _inside(_xywh(removed.a), paragraph, slack=4)
    assert removed.height >= paragraph[3] - 16  # its two lines of text
    gap = pages["base"].boxes["p3"][1] - paragraph[1]  # the paragraph and its margin
    assert result.alignment is not None and result.alignment.offset == (0, -gap)
    assert f"everything below moved up by {gap} px" in result.summary


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_paragraph_that_wraps_adds_a_line_and_changes_one(
    pages: dict[str, Rendered], encoding: str
) -> None:
    result = _compare(*_pair(pages, "wrapped", encoding))
    assert result.is_similar is False and _kinds(result) == ["added", "changed"]
    before, after = pages["base"].boxes["p1"], pages["wrapped"].boxes["p1"]
    line = after[3] - before[3]
    assert result.alignment is not None and result.alignment.offset == (0, line)
    # The new third line exists in B only; the second line gained a word.
    assert _inside(_xywh(_one(result, "added").b), after, slack=2)
    changed = _one(result, "changed")
    assert _inside(_xywh(changed.a), before, slack=2) and _inside(_xywh(changed.b), after, slack=2)
    assert changed.a is not None and changed.a.y > before[1] + before[3] // 2  # the 2nd line


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_wider_margin_is_a_move_not_a_change(pages: dict[str, Rendered], encoding: str) -> None:
    a, b = _pair(pages, "margin", encoding)
    result = _compare(a, b)
    shift = pages["margin"].boxes["p1"][0] - pages["base"].boxes["p1"][0]
    assert result.changed_regions == []
    assert result.alignment is not None and result.alignment.offset == (shift, 0)
    assert f"everything moved right by {shift} px" in result.summary
    assert result.is_similar is False  # strict: a move is a difference
    moves_ignored = _compare(a, b, "ignore_moves")
    assert moves_ignored.is_similar is True and moves_ignored.changed_regions == []
    assert moves_ignored.similarity is not None and moves_ignored.similarity > 0.99


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_a_word_changed_below_an_insertion_is_found_where_it_is_in_each_image(
    pages: dict[str, Rendered], encoding: str
) -> None:
    result = _compare(*_pair(pages, "banner_word", encoding))
    assert _kinds(result) == ["added", "changed"]
    changed = _one(result, "changed")
    word = pages["banner_word"].boxes["word"]
    height = pages["banner_word"].boxes["banner"][3]
    assert changed.shift == (0, height)
    assert _inside(word, _xywh(changed.b), slack=2)  # around the new word in B
    assert changed.a is not None and changed.b is not None
    assert (changed.b.x, changed.b.y) == (changed.a.x, changed.a.y + height)
    assert changed.width < 5 * word[2] and changed.height < 2 * word[3]  # the word, not a page
    assert "1 region changed" in result.summary


@pytest.mark.parametrize("level", LEVELS)
def test_the_verdict_under_each_match_level(pages: dict[str, Rendered], level: MatchLevel) -> None:
    a, b = _pair(pages, "banner_word", "png")
    assert _compare(a, b, level).is_similar is False  # added and changed content counts always
    a, b = _pair(pages, "margin", "png")
    assert _compare(a, b, level).is_similar is (level == "ignore_moves")
    base = pages["base"].png
    assert _compare(base, base, level).is_similar is True


def _moved_photo(name: str, with_object: bool) -> tuple[Image.Image, Image.Image, tuple[int, ...]]:
    """The photo, and the same scene with the camera moved (content 6 px left, 4 px up) and,
    optionally, an object added; the object's box in B."""
    photo = scenes.photo(name)
    width, height = photo.size
    a = photo.crop((0, 0, width - 16, height - 16))
    b = photo.crop((6, 4, width - 10, height - 12))
    box = (width // 2, height // 3, 60, 60)
    if with_object:
        patch = scenes.photo("coffee" if name != "coffee" else "astronaut").resize(box[2:])
        b.paste(patch, box[:2])
    return a, b, box


@pytest.mark.parametrize("name", scenes.PHOTOS)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_photo_taken_again_from_a_moved_camera_with_an_object_added(name: str, fmt: str) -> None:
    a, b, box = _moved_photo(name, with_object=True)
    result = _compare(scenes.encode(a, fmt), scenes.encode(b, fmt))
    assert result.alignment is not None and result.alignment.offset == (-6, -4)
    assert _kinds(result) == ["changed"]  # the object, not the whole picture
    (region,) = result.changed_regions
    assert _inside(box, _xywh(region.b), slack=2) and region.width <= box[2] + 12
    assert region.a is not None and region.b is not None
    assert (region.b.x - region.a.x, region.b.y - region.a.y) == (-6, -4) == region.shift
    assert result.is_similar is False


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_only_a_moved_camera_is_a_move(name: str) -> None:
    a, b, _ = _moved_photo(name, with_object=False)
    data_a, data_b = scenes.encode(a), scenes.encode(b)
    strict = _compare(data_a, data_b)
    assert strict.changed_regions == [] and strict.is_similar is False
    # The strips the move uncovered at the edges are the alignment's, not regions.
    assert strict.alignment is not None
    assert {band.region for band in strict.alignment.bands} == {None}
    assert "everything moved left by 6 px and up by 4 px" in strict.summary
    assert _compare(data_a, data_b, "ignore_moves").is_similar is True


def test_a_size_change_is_a_difference_not_a_rescale() -> None:
    """The same blank image at 4 x 4 and 8 x 4 (different shapes): B's extra columns are
    added; a copy at half the size (same shape) is still the same picture."""
    blank = scenes.encode(Image.new("RGB", (4, 4), "white"), "PNG")
    wider = scenes.encode(Image.new("RGB", (8, 4), "white"), "PNG")
    result = _compare(blank, wider)
    assert result.is_similar is False
    (region,) = result.changed_regions
    assert (region.kind, region.a, _xywh(region.b)) == ("added", None, (4, 0, 4, 4))
    photo = scenes.photo("chelsea")
    half = photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.LANCZOS)
    rescaled = _compare(scenes.encode(photo, "PNG"), scenes.encode(half, "PNG"))
    assert rescaled.is_similar is True and rescaled.alignment is None


def test_a_taller_screenshot_has_its_extra_rows_added(pages: dict[str, Rendered]) -> None:
    base = pages["base"].png
    with Image.open(io.BytesIO(base)) as image:
        taller = Image.new("RGB", (image.width, image.height + 40), (200, 220, 240))
        taller.paste(image.convert("RGB"), (0, 0))
    result = _compare(base, scenes.encode(taller, "PNG"))
    assert _kinds(result) == ["added"] and result.is_similar is False
    height = pages["base"].size[1]
    assert _xywh(result.changed_regions[0].b) == (0, height, pages["base"].size[0], 40)
    assert result.alignment is not None and result.alignment.offset == (0, 0)
