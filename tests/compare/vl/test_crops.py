"""What the VL model is shown of the changed regions: the pixel budget shared between overviews
and crops, the prompt naming each crop's region, and region indexes held to the result's
regions. Pure functions on real images; the model itself is in test_comparator.py."""

from __future__ import annotations

import pytest
from PIL import Image

from handler.compare.vl.comparator import (
    MIN_CROP_PIXELS,
    known_regions,
    pixel_budget,
    plan_pictures,
)
from handler.compare.vl.prompt import CropView, build_prompt
from handler.config import ComparisonConfig
from handler.crops import CROP_SIDE, RegionCrop
from handler.result import Box, Difference, Region


def _crops(count: int, size: tuple[int, int] = (CROP_SIDE, CROP_SIDE)) -> list[RegionCrop]:
    box = Region(x=0, y=0, width=size[0], height=size[1])
    return [
        RegionCrop(
            region=i, box_a=box, box_b=box, a=Image.new("RGB", size), b=Image.new("RGB", size)
        )
        for i in range(count)
    ]


def _pixels(size_a: tuple[int, int], size_b: tuple[int, int], plan_max: int, crops: int) -> int:
    overviews = sum(min(w * h, plan_max) for w, h in (size_a, size_b))
    return overviews + crops


def test_a_tall_page_leaves_the_crops_most_of_the_budget() -> None:
    """A 3446 x 10728 screenshot is prepared to 329 x 1024: two overviews use a third of the
    pair's budget, and four crop pairs share the rest, barely shrunk."""
    plan = plan_pictures((329, 1024), (329, 1024), _crops(4), (1024, 1024))
    budget = 2 * pixel_budget((1024, 1024))
    assert plan.max_pixels == pixel_budget((1024, 1024))  # the overviews as prepared
    assert len(plan.crops) == 4
    for _, a, b in plan.crops:
        assert a.size == b.size and 400 <= a.width <= CROP_SIDE
    assert 2 * 329 * 1024 + plan.crop_pixels <= budget


def test_square_overviews_make_room_for_the_crops_minimum_share() -> None:
    plan = plan_pictures((1024, 1024), (1024, 1024), _crops(4), (1024, 1024))
    budget = 2 * pixel_budget((1024, 1024))
    assert len(plan.crops) == 4
    # A quarter of the budget for 8 crops: 256 x 256 each; the overviews get the rest.
    assert all(a.size == (256, 256) for _, a, _ in plan.crops)
    assert plan.max_pixels == (budget - plan.crop_pixels) // 2 < pixel_budget((1024, 1024))
    assert _pixels((1024, 1024), (1024, 1024), plan.max_pixels, plan.crop_pixels) <= budget
    assert plan.max_pixels >= 3 * pixel_budget((1024, 1024)) // 4


def test_small_crops_are_not_enlarged_and_leave_the_overviews_alone() -> None:
    plan = plan_pictures((1024, 768), (1024, 768), _crops(2, (120, 80)), (1024, 1024))
    assert [a.size for _, a, _ in plan.crops] == [(120, 80)] * 2
    assert plan.max_pixels == pixel_budget((1024, 1024))


def test_crops_too_small_to_help_are_dropped_smallest_region_first() -> None:
    # 256 x 256 overviews of square inputs: a quarter of 131,072 pixels for the crops.
    share = 2 * pixel_budget((256, 256)) // 4
    fits = share // (2 * MIN_CROP_PIXELS)
    plan = plan_pictures((256, 256), (256, 256), _crops(4), (256, 256))
    assert [crop.region for crop, _, _ in plan.crops] == list(range(fits))
    assert fits < 4
    nothing = plan_pictures((128, 128), (128, 128), _crops(4), (128, 128))
    assert nothing.crops == () and nothing.max_pixels == pixel_budget((128, 128))


def test_no_crops_no_change() -> None:
    plan = plan_pictures((1024, 1024), (1024, 1024), [], (1024, 1024))
    assert plan.crops == () and plan.max_pixels == pixel_budget((1024, 1024))


def test_the_prompt_names_each_regions_kind_and_its_boxes_in_both_images() -> None:
    config = ComparisonConfig()
    changed = Region(
        x=412,
        y=1980,
        width=96,
        height=22,
        kind="changed",
        a=Box(x=412, y=1980, width=96, height=22),
        b=Box(x=412, y=2054, width=96, height=22),
        shift=(0, 74),
    )
    added = Region(
        x=0, y=0, width=785, height=74, kind="added", b=Box(x=0, y=0, width=785, height=74)
    )
    moved = Region(
        x=40,
        y=122,
        width=258,
        height=19,
        kind="moved",
        a=Box(x=40, y=122, width=258, height=19),
        b=Box(x=43, y=124, width=258, height=19),
        shift=(3, 2),
    )
    views = [
        CropView(
            region=0,
            found=changed,
            shown_a=Box(x=236, y=1767, width=448, height=448),
            shown_b=Box(x=236, y=1841, width=448, height=448),
        ),
        CropView(region=1, found=added, shown_a=None, shown_b=Box(x=0, y=0, width=785, height=74)),
        CropView(
            region=2,
            found=moved,
            shown_a=Box(x=0, y=0, width=448, height=300),
            shown_b=Box(x=0, y=0, width=448, height=300),
        ),
    ]
    prompt = build_prompt(config, views, ["a band 74 px high was added at the top of B"])
    assert (
        "- pictures 3 and 4: region 0, changed, in A x=412 y=1980 96x22; in B x=412 y=2054 "
        "96x22; close-up of A x=236 y=1767 448x448 and of B x=236 y=1841 448x448" in prompt
    )
    # An added region exists in B only: one close-up, from B.
    assert "- picture 5: region 1, added (only in B), in B x=0 y=0 785x74; close-up of B" in prompt
    assert "- pictures 6 and 7: region 2, moved by (3, 2) px, in A x=40 y=122" in prompt
    assert "B's content is moved: a band 74 px high was added at the top of B" in prompt
    assert 'Set "region" of a difference to the number of the region it lies in' in prompt
    assert prompt.index("image B") < prompt.index("pictures 3 and 4") < prompt.index("JSON")
    # Without crops the prompt says nothing about regions.
    assert "close-up" not in build_prompt(config) and "pictures 3" not in build_prompt(config)


def test_a_region_in_one_image_only_sends_one_crop() -> None:
    box = Box(x=0, y=0, width=CROP_SIDE, height=CROP_SIDE)
    crops = [
        RegionCrop(region=0, box_a=None, box_b=box, a=None, b=Image.new("RGB", box_size(box))),
        RegionCrop(region=1, box_a=box, box_b=None, a=Image.new("RGB", box_size(box)), b=None),
    ]
    plan = plan_pictures((329, 1024), (329, 1024), crops, (1024, 1024))
    assert [(a is None, b is None) for _, a, b in plan.crops] == [(True, False), (False, True)]
    assert plan.crop_pixels <= 2 * CROP_SIDE * CROP_SIDE


def box_size(box: Box) -> tuple[int, int]:
    return (box.width, box.height)


@pytest.mark.parametrize(("regions", "expected"), [(1, [0, None, None]), (8, [0, 7, None])])
def test_region_indexes_outside_changed_regions_become_null(
    regions: int, expected: list[int | None]
) -> None:
    differences = [
        Difference(aspect="text", element="price", description="42 became 47.", region=0),
        Difference(aspect="color", element="fur", description="Darker.", region=7),
        Difference(aspect="presence", element="cup", description="A cup.", region=None),
    ]
    kept = known_regions(differences, regions)
    assert [d.region for d in kept] == expected
    assert [d.description for d in kept] == [d.description for d in differences]
