"""handler.pipeline.compare_pair: identical bytes answered without decoding, every input decoded
once, every failure a result, never a raise."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import numpy as np
import pytest
import structlog
from PIL import Image, ImageDraw

from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, IgnoreRegion, MatchLevel, MatchRegion
from handler.crops import RegionCrop
from handler.deadline import Deadline
from handler.detect import Detection
from handler.errors import ComparisonTimeout, InputNotFound
from handler.images import NEUTRAL, PreparedImage
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparatorInfo, ComparisonResult
from tests.support import scenes, screens

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
    photo = scenes.photo("coffee")
    outcome = compare_pair(
        "p4",
        _input("a.jpg", scenes.encode(photo), []),
        _input("b.jpg", scenes.reencoded(photo), []),
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
    photo = scenes.photo("coffee")
    outcome = compare_pair(
        "p5",
        _input("a.jpg", scenes.encode(photo), []),
        _input("b.jpg", scenes.reencoded(photo), []),
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
        diff_image=True,
    )
    assert outcome.result.status == "ok" and outcome.diff_png is None


class _CropsWanted(MetricsComparator):
    """The metrics comparator, asking for crops as the VL comparator does, and keeping them
    (and the prepared images it was given)."""

    wants_crops = True

    def __init__(self) -> None:
        super().__init__()
        self.crops: list[RegionCrop] = []
        self.prepared: list[PreparedImage] = []

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
        self.prepared = [a, b]
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


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoder the pipeline reaches fails: libvips' native-resolution detection (and its
    crops), ``prepare`` (Pillow, libvips thumbnails) and Pillow's pixel loading."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("an input was decoded")

    monkeypatch.setattr("handler.pipeline.detect", refuse)
    monkeypatch.setattr("handler.pipeline.cut_crops", refuse)
    monkeypatch.setattr("handler.pipeline.prepare", refuse)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)


def _screen(text: str) -> Image.Image:
    return _page(text, (1280, 800))


@pytest.mark.parametrize("comparator", [MetricsComparator(), _CropsWanted()])
def test_byte_identical_inputs_are_not_decoded_and_keep_every_field(
    monkeypatch: pytest.MonkeyPatch, comparator: MetricsComparator
) -> None:
    """The same file twice: answered from the header and the hashes alone (a failing decoder
    stub proves it), with every field the decoded path gives the same pixels (B re-encoded:
    other bytes, same pixels), apart from what says how it was done."""
    image = _screen("total 42")
    data, other_bytes = scenes.as_png(image), screens.png(image, compress_level=1)
    assert data != other_bytes
    decoded = compare_pair(
        "p9", _input("a.png", data, []), _input("b.png", other_bytes, []), CONFIG, comparator,
        max_input_pixels=10**8, diff_image=True,
    )  # fmt: skip
    _no_decoding(monkeypatch)
    with structlog.testing.capture_logs() as logs:
        outcome = compare_pair(
            "p9", _input("a.png", data, []), _input("b.png", data, []), CONFIG, comparator,
            max_input_pixels=10**8, diff_image=True,
        )  # fmt: skip
    result, before = outcome.result, decoded.result
    assert result.status == "ok" and result.metrics["pixel_identical"] == 1.0
    assert result.metrics == before.metrics and set(result.metrics) >= {
        "ssim", "changed_fraction", "local_similarity", "phash_distance", "hash_similarity",
        "color_similarity", "mean_delta_e", "changed_pixels", "changed_percent",
        "transparency_pixels", "detection_similarity",
    }  # fmt: skip
    for field in ("similarity", "is_similar", "summary", "differences", "changed_regions", "vl"):
        assert getattr(result, field) == getattr(before, field), field
    for now, then in zip(result.inputs, before.inputs, strict=True):
        assert (now.format, now.original_size, now.processed_size) == (
            then.format, then.original_size, then.processed_size,
        ) == ("PNG", (1280, 800), (1024, 640))  # fmt: skip
    assert result.inputs[0].sha256 == result.inputs[1].sha256 == before.inputs[0].sha256
    assert "detect" not in result.timings_ms and result.timings_ms["total"] > 0
    (compared,) = [e for e in logs if e["event"] == "pair_compared"]
    assert compared["identical_bytes"] is True
    assert not [e for e in logs if e["event"] in ("image_prepared", "decode_started")]
    # The diff image is the legend alone: small, and it says why.
    assert outcome.diff_png is not None and len(outcome.diff_png) < 5000
    with Image.open(io.BytesIO(outcome.diff_png)) as legend:
        assert legend.width == 768 and legend.height < 80


@pytest.mark.parametrize("level", ["strict", "ignore_moves", "exact", "ignore_colors"])
def test_byte_identical_inputs_answer_as_the_same_pixels_do_under_every_match_level(
    monkeypatch: pytest.MonkeyPatch, level: MatchLevel
) -> None:
    """Not decoded, under any level (and with a box at another level): no region, nothing
    moved, no alignment, and the verdict, scores and words the decoded path gives the same
    pixels in other bytes."""
    image = _screen("total 42")
    data, other_bytes = scenes.as_png(image), screens.png(image, compress_level=1)
    config = ComparisonConfig(
        match_level=level,
        regions=[MatchRegion(x=0, y=0, width=400, height=200, match_level="ignore_moves")],
    )
    decoded = compare_pair(
        "p11", _input("a.png", data, []), _input("b.png", other_bytes, []), config,
        MetricsComparator(), max_input_pixels=10**8,
    ).result  # fmt: skip
    _no_decoding(monkeypatch)
    result = compare_pair(
        "p11", _input("a.png", data, []), _input("b.png", data, []), config,
        MetricsComparator(), max_input_pixels=10**8,
    ).result  # fmt: skip
    assert result.status == decoded.status == "ok"
    assert result.alignment is None and result.changed_regions == []
    assert result.metrics["moved_pixels"] == result.metrics["changed_pixels"] == 0.0
    assert result.metrics["pixel_identical"] == 1.0 and result.is_similar is True
    for field in ("similarity", "is_similar", "summary", "differences", "changed_regions"):
        assert getattr(result, field) == getattr(decoded, field), field
    assert result.metrics == decoded.metrics and result.alignment == decoded.alignment


def test_byte_identical_inputs_still_meet_the_input_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No decoding, but the same refusals: over the pixel budget, a broken PNG (its chunks are
    verified), an ignore box or a level box outside the image, not an image at all."""
    data = scenes.as_png(_screen("total 42"))
    _no_decoding(monkeypatch)

    def error(a: bytes, config: ComparisonConfig = CONFIG, pixels: int = 10**8) -> tuple[str, str]:
        result = compare_pair(
            "p10", _input("a.png", a, []), _input("b.png", a, []), config, MetricsComparator(),
            max_input_pixels=pixels,
        ).result  # fmt: skip
        assert result.status == "error" and result.error is not None
        return result.error.type, result.error.message

    assert error(data, pixels=1_000_000)[0] == "image_too_large"
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF
    assert error(bytes(broken)) == ("invalid_image", "the image file is broken: broken PNG "
                                    "file (bad header checksum in b'IDAT')")  # fmt: skip
    assert error(data[: len(data) // 2])[0] == "invalid_image"
    outside = ComparisonConfig(ignore_regions=[IgnoreRegion(x=1200, y=0, width=100, height=10)])
    assert error(data, outside)[0] == "invalid_manifest"
    level_box = MatchRegion(x=0, y=700, width=100, height=200, match_level="exact")
    kind, message = error(data, ComparisonConfig(regions=[level_box]))
    assert kind == "invalid_manifest" and "config.regions[0]" in message
    assert error(b"not an image at all")[0] == "invalid_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_1mp_pair_is_decoded_once(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Each input's pixels are decoded once: detection decodes both (libvips, streamed) and
    its copies are the prepared images (``prepare``, the separate decode, is never called) and
    the crops (no second pass); the prepared images are as close to ``prepare``'s own as a
    re-encode would be."""
    import handler.crops as crops_module
    import handler.detect as detect_module
    from handler import images

    a, b = (scenes.encode(_screen(text), fmt) for text in ("total 42", "TOTAL 4711 EUR"))
    expected = [
        images.prepare(data, CONFIG.max_image_size, CONFIG.image_quality) for data in (a, b)
    ]
    decoded: list[bytes] = []
    real_normalised = detect_module.normalised

    def counted(data: bytes, *args: object) -> object:
        decoded.append(data)
        return real_normalised(data, *args)  # type: ignore[arg-type]

    def second_decode(*_: object, **__: object) -> None:
        raise AssertionError("an input was decoded a second time for its prepared image")

    # Where each decode is looked up: the passes (detect) and the crops' own pass (crops).
    monkeypatch.setattr(detect_module, "normalised", counted)
    monkeypatch.setattr(crops_module, "normalised", counted)
    monkeypatch.setattr("handler.pipeline.prepare", second_decode)
    wanting = _CropsWanted()
    with structlog.testing.capture_logs() as logs:
        outcome = compare_pair(
            "p11", _input("a", a, []), _input("b", b, []), CONFIG, wanting,
            max_input_pixels=10**8, diff_image=True,
        )  # fmt: skip
    result = outcome.result
    assert result.status == "ok" and result.is_similar is False and len(wanting.crops) == 1
    assert decoded == [a, b]
    prepared = [e for e in logs if e["event"] == "image_prepared"]
    assert [e["from_detection"] for e in prepared] == [True, True]
    for image, reference in zip(wanting.prepared, expected, strict=True):
        assert image.size == reference.size == (1024, 640)
        gap = np.abs(np.asarray(image.image, np.int16) - np.asarray(reference.image, np.int16))
        # (LANCZOS as libvips and as Pillow round it: a level or two, more on a few text edges)
        assert gap.mean() < 0.5 and np.percentile(gap, 99.9) <= 4, (gap.mean(), gap.max())


def test_a_digest_taken_while_reading_is_used() -> None:
    """A source that hashed the bytes as they streamed in (a bucket, an upload) hands its
    digest over: the pipeline records it instead of hashing again."""
    photo = scenes.photo("coffee")
    a, b = scenes.encode(photo), scenes.reencoded(photo)
    streamed = "ab" * 32
    result = compare_pair(
        "p12",
        ImageInput("a.jpg", lambda: a, digest=lambda: streamed),
        ImageInput("b.jpg", lambda: b, digest=lambda: None),  # none taken: hashed here
        CONFIG,
        MetricsComparator(),
        max_input_pixels=10**8,
    ).result
    assert result.status == "ok"
    assert [i.sha256 for i in result.inputs] == [streamed, hashlib.sha256(b).hexdigest()]
