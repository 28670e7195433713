"""handler.pipeline.compare_pair: one image at a time, every failure a result, never a raise."""

from __future__ import annotations

import pytest

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.detect import Detection
from handler.errors import ComparisonTimeout, InputNotFound
from handler.images import PreparedImage
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

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
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
