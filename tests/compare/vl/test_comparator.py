"""The VL comparator end to end on a tiny Qwen2-VL built offline (tests/support/tiny_vlm.py).

The model is loaded through the production path (AutoProcessor + AutoModelForImageTextToText in
the spawned worker, ``HF_HUB_OFFLINE=1``). Faults are injected inside the worker with the
test-only ``VLComparator.fault`` hook: a real impossible allocation for out-of-memory, a real
null-pointer read for a crash, a sleep for a prefill that overruns the timeout. One comparator
(one worker) is shared by the tests to keep worker starts, ~4 s each, few; its backend is the
real local one, which also keeps the requests it was given (``RecordingBackend``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from handler.compare.vl import VLComparator
from handler.compare.vl.comparator import KILL_GRACE_S, NO_CHANGE, pixel_budget
from handler.compare.vl.local_backend import LocalBackend
from handler.compare.vl.protocol import Fault, Reply, Request
from handler.config import ComparisonConfig, IgnoreRegion, Settings
from handler.deadline import Deadline
from handler.errors import ModelUnavailable
from handler.images import NEUTRAL, prepare
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import scenes, tiny_vlm

#: In the answer schema's order and separators, so the schema constraint lets it through as is.
#: The second difference names a region no pair here has (they have one): it reads null.
ANSWER = {
    "similarity": 0.75,
    "summary": "The same cat; a cup appears in image B.",
    "differences": [
        {"aspect": "presence", "element": "cup", "description": "A cup was added.", "region": 0},
        {"aspect": "color", "element": "fur", "description": "The fur is darker.", "region": 7},
    ],
}
#: ANSWER as the result keeps it: region 0 exists, region 7 does not.
DIFFERENCES = [ANSWER["differences"][0], {**ANSWER["differences"][1], "region": None}]
#: Small prepared images keep the tiny model's prompt short (and the tests fast).
CONFIG = ComparisonConfig(max_image_size=(256, 256), processing_timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.build(tmp_path_factory.mktemp("tiny-vlm"), answer=json.dumps(ANSWER))


class RecordingBackend(LocalBackend):
    """The real local backend (worker process, batching, faults) that keeps every request."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.requests: list[Request] = []

    def generate(self, request: Request) -> Reply:
        self.requests.append(request)
        return super().generate(request)


@pytest.fixture(scope="module")
def backend(model_dir: Path, offline: None) -> RecordingBackend:
    return RecordingBackend(Settings(model=str(model_dir), device="cpu"))


@pytest.fixture(scope="module")
def comparator(model_dir: Path, backend: RecordingBackend) -> Iterator[VLComparator]:
    vl = VLComparator(Settings(model=str(model_dir), device="cpu"), backend=backend)
    yield vl
    vl.close()


def _tokens(request: Request) -> int:
    """Visual tokens the worker's encoding gives ``request``'s pictures: each held to the
    request's cap, then put on Qwen2-VL's 28-pixel grid."""
    total = 0
    cap = request.max_pixels
    for picture in request.images:
        width, height = Image.open(io.BytesIO(picture.jpeg)).size
        if width * height > cap:
            factor = (cap / (width * height)) ** 0.5
            width, height = max(1, int(width * factor)), max(1, int(height * factor))
        grid_h, grid_w = smart_resize(
            height, width, factor=28, min_pixels=tiny_vlm.CHECKPOINT_MIN_PIXELS, max_pixels=cap
        )
        total += grid_h * grid_w // (28 * 28)
    return total


@pytest.fixture(autouse=True)
def _no_fault_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "comparator" in request.fixturenames:
        request.getfixturevalue("comparator").fault = None


def _input(name: str, data: bytes) -> ImageInput:
    return ImageInput(name=name, load=lambda: data)


def _run(
    vl: VLComparator, a: bytes, b: bytes, config: ComparisonConfig = CONFIG
) -> ComparisonResult:
    return compare_pair(
        "a~b", _input("a.jpg", a), _input("b.jpg", b), config, vl, max_input_pixels=200_000_000
    ).result


@pytest.fixture(scope="module")
def edited_pair() -> tuple[bytes, bytes]:
    cat = scenes.photo("chelsea")
    return scenes.encode(cat), scenes.pasted_object(cat)


def _assert_answered(result: ComparisonResult) -> None:
    assert result.status == "ok", result.error
    assert result.similarity == 0.75
    assert result.vl is not None and result.vl.raw_text == json.dumps(ANSWER)


def test_the_models_answer_fills_the_result(
    comparator: VLComparator, backend: RecordingBackend, edited_pair: tuple[bytes, bytes]
) -> None:
    result = _run(comparator, *edited_pair)
    _assert_answered(result)
    assert result.is_similar is False  # 0.75 < the 0.93 default threshold
    assert result.summary == ANSWER["summary"]
    # Region 0 is the pasted patch; the pair has no region 7, so that difference names none.
    assert len(result.changed_regions) == 1
    assert [d.model_dump() for d in result.differences] == DIFFERENCES
    assert result.vl is not None and result.vl.constrained and result.vl.batch_size == 1
    assert result.comparator.model_dump() == {
        "name": "vl",
        "model": comparator.info.model,
        "device": "cpu",
        "backend": "local",
        "endpoint": None,
    }
    # The metrics' numbers and regions stay beside the model's answer.
    assert {"ssim", "changed_fraction", "pixel_identical"} <= set(result.metrics)
    assert result.changed_regions
    assert result.vl is not None and not result.vl.skipped and result.vl.attempts == 1
    assert result.vl.max_pixels == 256 * 256
    # 256x170 prepared -> 252x168 after the 28-pixel grid: 9 x 6 tokens per overview; the
    # crop of region 0 in A and in B adds its own (see the next test).
    request = backend.requests[-1]
    assert len(request.images) == 4
    assert result.vl.visual_tokens == _tokens(request) > 2 * 9 * 6
    # A threshold below the model's score flips is_similar, nothing else.
    lenient = CONFIG.model_copy(update={"similarity_threshold": 0.7})
    assert _run(comparator, *edited_pair, config=lenient).is_similar is True


def _page(text: str) -> bytes:
    """A tall, plain page with one short line of text: a change in it is a few pixels in the
    overview, and the crop around it shows it several times larger."""
    page = Image.new("RGB", (400, 2000), (250, 250, 245))
    draw = ImageDraw.Draw(page)
    for row in range(0, 2000, 60):
        draw.line((0, row, 400, row), fill=(200, 210, 230), width=2)
    draw.text((150, 1200), text, fill=(20, 20, 20))
    return scenes.as_png(page)


@pytest.fixture(scope="module")
def page_pair() -> tuple[bytes, bytes]:
    return _page("total 42 EUR"), _page("total 47 EUR")


def _picture(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg))


def test_a_small_change_sends_crops_of_its_region_and_says_which_box_they_show(
    comparator: VLComparator, backend: RecordingBackend, page_pair: tuple[bytes, bytes]
) -> None:
    result = _run(comparator, *page_pair)
    _assert_answered(result)
    (region,) = result.changed_regions  # the digit 2 -> 7
    assert [d.region for d in result.differences] == [0, None]
    request = backend.requests[-1]
    labels = [picture.label for picture in request.images]
    assert labels == ["Image A:", "Image B:", "Region 0 in image A:", "Region 0 in image B:"]
    box = f"x={region.x} y={region.y} {region.width}x{region.height}"
    assert (
        f"pictures 3 and 4: region 0, changed, in A {box}; in B {box}; "
        "close-up of A x=0 y=982 400x448 and of B x=0 y=982 400x448" in request.prompt
    )
    assert 'Set "region" of a difference to the number of the region' in request.prompt
    # The overviews are the prepared 51 x 256 images (1/8 of the page's resolution); the
    # crops show the 400 x 448 cut around the change at over half of it, shrunk only as far
    # as the pair's pixel budget needs.
    overview, _, crop_a, crop_b = (_picture(p.jpeg) for p in request.images)
    assert overview.size == (51, 256) and crop_a.size == crop_b.size
    assert crop_a.width / 400 > 4 * overview.width / 400
    pixels = sum(_picture(p.jpeg).width * _picture(p.jpeg).height for p in request.images)
    assert pixels <= 2 * pixel_budget(CONFIG.max_image_size)
    # What the worker really encoded: the overviews' tokens (2 x 9 x 2) and the crops' own.
    assert result.vl is not None and result.vl.visual_tokens == _tokens(request) > 2 * 9 * 2


def test_crops_are_masked_by_ignore_regions(
    comparator: VLComparator, backend: RecordingBackend, page_pair: tuple[bytes, bytes]
) -> None:
    ignore = IgnoreRegion(x=20, y=1000, width=100, height=60)  # inside the crop, not the change
    result = _run(comparator, *page_pair, CONFIG.model_copy(update={"ignore_regions": [ignore]}))
    _assert_answered(result)
    request = backend.requests[-1]
    assert len(request.images) == 4
    for picture in request.images[2:]:
        crop = _picture(picture.jpeg)
        scale = crop.width / 400  # the crop shows x=0 y=982 400x448
        inside = (
            int((ignore.x + 4) * scale),
            int((ignore.y - 982 + 4) * scale),
            int((ignore.x + ignore.width - 4) * scale),
            int((ignore.y + ignore.height - 982 - 4) * scale),
        )
        grey = np.asarray(crop.crop(inside), dtype=np.float64) - np.array(NEUTRAL)
        assert np.abs(grey).mean() < 3, picture.label  # JPEG noise on the neutral fill only
        below = np.asarray(crop.crop((inside[0], inside[3] + 10, inside[2], inside[3] + 20)))
        assert below.mean() > 200  # the page itself around it


def test_identical_and_unchanged_pairs_skip_the_model(comparator: VLComparator) -> None:
    """A crash fault is armed: had the model been asked, the pair would fail."""
    comparator.fault = Fault(crash=True)
    pid = comparator.worker_pid
    cat = scenes.photo("chelsea")
    same = _run(comparator, scenes.as_png(cat), scenes.as_png(cat))
    assert same.status == "ok" and same.similarity == 1.0 and same.is_similar
    assert same.vl is not None and same.vl.skipped and same.vl.skip_reason == "pixel-identical"
    assert same.metrics["pixel_identical"] == 1.0

    # No pixel moved by more than 1/255: no change at native resolution (this was the
    # "near-identical" case of the prepared images before detection gated the model).
    pixels = np.asarray(cat, dtype=np.int16)
    nudged = np.clip(pixels + np.random.default_rng(0).integers(-1, 2, pixels.shape), 0, 255)
    near = _run(
        comparator,
        scenes.as_png(cat),
        scenes.as_png(Image.fromarray(nudged.astype(np.uint8))),
        CONFIG.model_copy(update={"max_image_size": (1024, 1024)}),  # no resampling
    )
    assert near.status == "ok" and near.vl is not None and near.vl.skipped
    assert near.vl.skip_reason == NO_CHANGE and near.changed_regions == []

    # A JPEG re-encode differs in nearly every pixel and its prepared images by more than the
    # near-identical bound, yet detection finds no confident change: skipped, exactly.
    reencoded = _run(comparator, scenes.encode(cat), scenes.reencoded(cat))
    assert reencoded.status == "ok" and reencoded.vl is not None and reencoded.vl.skipped
    assert reencoded.vl.skip_reason == NO_CHANGE and reencoded.is_similar
    assert reencoded.metrics["pixel_identical"] == 0.0 and reencoded.changed_regions == []
    assert reencoded.summary.startswith("No change at native resolution")

    # Without a detection (a caller of compare() alone) near-identical prepared images still
    # skip the model.
    prepared = prepare(scenes.as_png(cat), (1024, 1024), 95)
    nudged_prepared = prepare(
        scenes.as_png(Image.fromarray(nudged.astype(np.uint8))), (1024, 1024), 95
    )
    alone = comparator.compare(prepared, nudged_prepared, CONFIG)
    assert alone.vl is not None and alone.vl.skipped
    assert alone.vl.skip_reason is not None and alone.vl.skip_reason.startswith("near-identical")
    assert comparator.worker_pid == pid


def test_a_small_edit_the_metrics_miss_still_reaches_the_model(
    comparator: VLComparator,
) -> None:
    """ "42" drawn on the photo: SSIM 0.9999, yet it is exactly what the model is there for."""
    cat = scenes.photo("chelsea")
    edited = cat.copy()
    ImageDraw.Draw(edited).text((200, 150), "42", fill=(255, 0, 0))
    result = _run(comparator, scenes.as_png(cat), scenes.as_png(edited))
    assert result.metrics["ssim"] > 0.99
    _assert_answered(result)
    assert result.vl is not None and not result.vl.skipped


def test_an_8000x6000_pair_is_capped_in_visual_tokens(
    comparator: VLComparator, backend: RecordingBackend
) -> None:
    big_a = Image.new("RGB", (8000, 6000), (200, 40, 40))
    big_b = big_a.copy()
    ImageDraw.Draw(big_b).rectangle((3000, 2000, 3399, 2299), fill=(40, 40, 200))
    config = CONFIG.model_copy(update={"max_image_size": (1024, 1024)})
    result = _run(comparator, scenes.encode(big_a), scenes.encode(big_b), config)
    _assert_answered(result)
    assert result.inputs[0].original_size == (8000, 6000)
    assert result.vl is not None and result.vl.max_pixels == pixel_budget((1024, 1024))
    # Prepared at 1024x768 -> 1036x756 on the 28-pixel grid -> 37 x 27 tokens per overview,
    # where the checkpoint's own cap would allow 16,170 per image (test_tokens.py); the
    # changed rectangle adds a crop of A and of B at native resolution (a 454 x 448 cut,
    # fitted to 448 x 442 -> 448 x 448 on the grid: 16 x 16 tokens each).
    request = backend.requests[-1]
    assert [_picture(p.jpeg).size for p in request.images[2:]] == [(448, 442)] * 2
    assert result.vl.visual_tokens == _tokens(request) == 2 * 37 * 27 + 2 * 16 * 16
    assert result.vl.visual_tokens <= 2 * pixel_budget((1024, 1024)) // (28 * 28)


def test_out_of_memory_is_retried_at_half_the_pixels(
    comparator: VLComparator, backend: RecordingBackend, edited_pair: tuple[bytes, bytes]
) -> None:
    """The allocator fails while an image has more than 200x200 pixels: the retry fits."""
    pid = comparator.worker_pid
    comparator.fault = Fault(oom_above_pixels=200 * 200)
    result = _run(comparator, *edited_pair)
    _assert_answered(result)
    assert result.vl is not None and result.vl.attempts == 2
    # First attempt: 252x168 = 42,336 pixels per overview; the retry's budget is half of that,
    # and every picture, the crops too, gets half its pixels.
    assert result.vl.max_pixels == 252 * 168 // 2
    full = _tokens(backend.requests[-1])
    assert result.vl.visual_tokens is not None and result.vl.visual_tokens < 0.6 * full
    assert comparator.worker_pid == pid


def test_out_of_memory_twice_gives_a_clean_error_and_the_worker_lives_on(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    pid = comparator.worker_pid
    comparator.fault = Fault(oom_above_pixels=1)
    result = _run(comparator, *edited_pair)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "out_of_memory"
    assert "can't allocate memory" in result.error.message
    assert result.vl is not None and result.vl.attempts == 2
    assert result.vl.max_pixels == 252 * 168 // 2
    assert "ssim" in result.metrics
    comparator.fault = None
    _assert_answered(_run(comparator, *edited_pair))
    assert comparator.worker_pid == pid


def test_a_hung_model_is_killed_at_the_timeout_and_replaced(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    _assert_answered(_run(comparator, *edited_pair))  # the worker is loaded and serving
    pid = comparator.worker_pid
    assert pid is not None
    comparator.fault = Fault(delay_s=120)
    config = CONFIG.model_copy(update={"processing_timeout": 1.0})
    started = time.monotonic()
    result = _run(comparator, *edited_pair, config=config)
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.error is not None
    assert result.error.type == "timeout"
    assert 1.0 <= elapsed < 1.0 + KILL_GRACE_S + 1.0
    assert "ssim" in result.metrics
    assert not _alive(pid)
    comparator.fault = None
    _assert_answered(_run(comparator, *edited_pair))
    assert comparator.worker_pid not in (None, pid)


def test_the_model_has_what_is_left_of_the_pair_s_deadline_not_a_fresh_timeout(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    """The pair was taken 1.5 s before it reached the comparator (fetch, a queue): of its 2 s
    the model gets the 0.5 s left, and a hung model is given up on then (plus the grace), not
    2 s after its batch went to the worker."""
    _assert_answered(_run(comparator, *edited_pair))
    comparator.fault = Fault(delay_s=120)
    taken = Deadline(2.0, started=time.monotonic() - 1.5)
    started = time.monotonic()
    try:
        result = compare_pair(
            "late", _input("a.jpg", edited_pair[0]), _input("b.jpg", edited_pair[1]), CONFIG,
            comparator, max_input_pixels=200_000_000, deadline=taken,
        ).result  # fmt: skip
    finally:
        comparator.fault = None
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.error is not None
    assert result.error.stage == "compare"
    assert elapsed < 0.5 + KILL_GRACE_S + 0.8, f"given up after {elapsed:.2f} s"
    _assert_answered(_run(comparator, *edited_pair))


def test_a_crashing_model_gives_model_crashed_and_the_next_pair_runs(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    pid = comparator.worker_pid
    comparator.fault = Fault(crash=True)
    result = _run(comparator, *edited_pair)
    assert result.status == "error" and result.error is not None
    assert result.error.type == "model_crashed"
    assert f"signal {signal.SIGSEGV.value}" in result.error.message
    comparator.fault = None
    _assert_answered(_run(comparator, *edited_pair))
    assert comparator.worker_pid != pid


def test_a_worker_killed_while_idle_is_replaced(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    _assert_answered(_run(comparator, *edited_pair))
    pid = comparator.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _assert_answered(_run(comparator, *edited_pair))
    assert comparator.worker_pid != pid


def test_an_answer_running_past_the_timeout_stops_without_killing_the_worker(
    tmp_path: Path, offline: None, edited_pair: tuple[bytes, bytes]
) -> None:
    """Random weights fill every string of the answer schema to its bound (about 200 tokens,
    a second or more on CPU): generate() stops the row at the deadline (between tokens), the
    pair times out with what was said so far, and the worker stays."""
    model = tiny_vlm.build(tmp_path / "random")
    vl = VLComparator(Settings(model=str(model), device="cpu"))
    try:
        config = CONFIG.model_copy(update={"processing_timeout": 0.3})
        vl.wait_ready()  # as a runner does: the load is not a pair's time
        _run(vl, *edited_pair, config=config)
        pid = vl.worker_pid
        started = time.monotonic()
        result = _run(vl, *edited_pair, config=config)
        assert time.monotonic() - started < 0.3 + KILL_GRACE_S
        assert result.status == "timeout" and result.error is not None
        assert "did not finish its answer within 0.3 s" in result.error.message
        assert result.error.stage == "compare"
        assert result.vl is not None and result.vl.raw_text
        assert vl.worker_pid == pid and pid is not None and _alive(pid)
    finally:
        vl.close()


def test_a_missing_model_is_model_unavailable(tmp_path: Path, offline: None) -> None:
    vl = VLComparator(Settings(model=str(tmp_path / "no-such-model"), device="cpu"))
    try:
        cat = prepare(scenes.encode(scenes.photo("chelsea")), (128, 128), 85)
        dog = prepare(scenes.encode(scenes.photo("coffee")), (128, 128), 85)
        with pytest.raises(ModelUnavailable, match="cannot load the model") as first:
            vl.compare(cat, dog, CONFIG)
        assert "ssim" in first.value.details["metrics"]
        # Not retried for every pair: the next one fails at once.
        started = time.monotonic()
        with pytest.raises(ModelUnavailable):
            vl.compare(cat, dog, CONFIG)
        assert time.monotonic() - started < 1.0
    finally:
        vl.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
