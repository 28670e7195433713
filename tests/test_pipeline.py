"""handler.pipeline.compare_pair: one image at a time, every failure a result, never a raise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image, ImageDraw

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, IgnoreRegion
from handler.deadline import Deadline
from handler.detect import Detection, RegionCrop
from handler.errors import ComparisonTimeout, InputNotFound
from handler.images import NEUTRAL, PreparedImage
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparatorInfo, ComparisonResult
from tests.support import scenes

CONFIG = ComparisonConfig()


def _input(name: str, data: bytes, calls: list[str]) -> ImageInput:
    def load() -> bytes:
        calls.append(name)
        return data

    return ImageInput(name=name, load=load)


def test_ok_result_is_schema_valid_and_complete() -> None:
    img = scenes.photo("rocket")
    calls: list[str] = []
    outcome = compare_pair(
        "p1",
        _input("a.jpg", scenes.encode(img), calls),
        _input("b.jpg", scenes.pasted_object(img), calls),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
        diff_image=True,
    )
    result = ComparisonResult.model_validate_json(outcome.result.to_json())
    assert calls == ["a.jpg", "b.jpg"]
    assert result.status == "ok" and result.is_similar is False
    assert result.changed_regions and result.metrics["changed_fraction"] > 0
    assert outcome.diff_png is not None and outcome.diff_png.startswith(b"\x89PNG")


def test_a_failing_first_input_stops_before_the_second_is_loaded() -> None:
    calls: list[str] = []
    outcome = compare_pair(
        "p2",
        _input("a.jpg", b"not an image at all", calls),
        _input("b.jpg", scenes.encode(scenes.photo("rocket")), calls),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
        diff_image=True,
    )
    assert calls == ["a.jpg"]
    result = outcome.result
    assert result.status == "error" and result.error is not None
    assert (result.error.type, result.error.input) == ("invalid_image", "a")
    assert result.inputs[0].sha256 is not None and result.inputs[1].sha256 is None
    assert outcome.diff_png is None


def test_a_vanished_input() -> None:
    def vanished() -> bytes:
        raise InputNotFound("b.jpg does not exist (vanished?)")

    outcome = compare_pair(
        "p3",
        _input("a.jpg", scenes.encode(scenes.photo("rocket")), []),
        ImageInput("b.jpg", vanished),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
    )
    assert outcome.result.error is not None
    assert (outcome.result.error.type, outcome.result.error.input) == ("input_not_found", "b")


class _SlowComparator:
    """A comparator that gives up like the VL comparator does when its worker is killed."""

    info = ComparatorInfo(name="slow")
    wants_crops = False

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict:
        raise ComparisonTimeout(f"no answer within {config.processing_timeout} s")

    def close(self) -> None:
        pass


def test_a_comparator_timeout_becomes_a_timeout_result() -> None:
    data = scenes.encode(scenes.photo("coffee"))
    outcome = compare_pair(
        "p4",
        _input("a.jpg", data, []),
        _input("b.jpg", data, []),
        CONFIG,
        _SlowComparator(),
        max_input_pixels=10**8,
    )
    result = outcome.result
    assert result.status == "timeout" and result.error is not None
    assert result.error.type == "timeout" and result.error.input is None
    assert result.similarity is None and "compare" in result.timings_ms


def test_a_diff_image_that_cannot_be_drawn_does_not_cost_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object) -> bytes:
        raise MemoryError("no room for the drawing")

    monkeypatch.setattr("handler.diff_image.render_diff", broken)
    data = scenes.encode(scenes.photo("coffee"))
    outcome = compare_pair(
        "p5",
        _input("a.jpg", data, []),
        _input("b.jpg", data, []),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
        diff_image=True,
    )
    assert outcome.result.status == "ok" and outcome.diff_png is None


class _CropsWanted(MetricsComparator):
    """The metrics comparator, asking for crops as the VL comparator does, and keeping them."""

    wants_crops = True

    def __init__(self) -> None:
        super().__init__()
        self.crops: list[RegionCrop] = []

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict:
        self.crops = list(crops)
        return super().compare(a, b, config, detection=detection)


def _page(text: str, size: tuple[int, int] = (800, 600)) -> Image.Image:
    page = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(page)
    for row in range(0, size[1], 40):
        draw.line((0, row, size[0], row), fill=(90, 110, 200), width=3)
    draw.text((380, 300), text, fill=(20, 20, 20))
    return page


def test_crops_are_cut_for_a_comparator_that_wants_them_and_only_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = scenes.as_png(_page("total 42")), scenes.as_png(_page("total 47"))
    wanting = _CropsWanted()
    outcome = compare_pair(
        "p6",
        _input("a.png", a, []),
        _input("b.png", b, []),
        CONFIG,
        wanting,
        max_input_pixels=10**8,
    )
    assert outcome.result.status == "ok" and outcome.diff_png is None
    (crop,) = wanting.crops
    assert crop.region == 0 and crop.a.size == crop.b.size == (448, 448)

    def no_crops(*_: object, **__: object) -> list[RegionCrop]:
        raise AssertionError("crops cut for a comparator that does not want them")

    monkeypatch.setattr("handler.pipeline.cut_crops", no_crops)
    plain = compare_pair(
        "p7",
        _input("a.png", a, []),
        _input("b.png", b, []),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
    )
    assert plain.result.status == "ok" and plain.result.changed_regions


def test_crops_are_masked_like_the_prepared_images_in_a_and_in_a_rescaled_b() -> None:
    """The ignore box is in A's native pixels; B is the same page at 1.5x: its crop gets the
    box mapped proportionally, as the prepared images do."""
    ignore = IgnoreRegion(x=300, y=200, width=120, height=50)  # above the changed word
    a = scenes.as_png(_page("total 42"))
    b = scenes.as_png(_page("total 47").resize((1200, 900), Image.Resampling.LANCZOS))
    wanting = _CropsWanted()
    config = ComparisonConfig(ignore_regions=[ignore])
    outcome = compare_pair(
        "p8",
        _input("a.png", a, []),
        _input("b.png", b, []),
        config,
        wanting,
        max_input_pixels=10**8,
    )
    assert outcome.result.status == "ok", outcome.result.error
    (crop,) = wanting.crops
    for image, cut, scale in ((crop.a, crop.box_a, 1.0), (crop.b, crop.box_b, 1.5)):
        factor = image.width / cut.width
        x0 = (ignore.x * scale - cut.x) * factor
        y0 = (ignore.y * scale - cut.y) * factor
        x1 = ((ignore.x + ignore.width) * scale - cut.x) * factor
        y1 = ((ignore.y + ignore.height) * scale - cut.y) * factor
        pixels = np.asarray(image)
        inside = pixels[int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)]
        assert inside.size and (inside == NEUTRAL).all()
        # Only the box: the rows right below it are the page (its blue lines included).
        below = pixels[int(y1) + 2 : int(y1) + 40, int(np.ceil(x0)) : int(x1)]
        assert (below != NEUTRAL).any(axis=2).all()
