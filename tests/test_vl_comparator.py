"""The VL comparator end to end on a tiny Qwen2-VL built offline (tests/support/tiny_vlm.py).

The model is loaded through the production path (AutoProcessor + AutoModelForImageTextToText in
the spawned worker, ``HF_HUB_OFFLINE=1``). Faults are injected inside the worker with the
test-only ``VLComparator.fault`` hook: a real impossible allocation for out-of-memory, a real
null-pointer read for a crash, a sleep for a prefill that overruns the timeout. One comparator
(one worker) is shared by the tests to keep worker starts, ~4 s each, few.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from handler.compare.vl import VLComparator
from handler.compare.vl.comparator import KILL_GRACE_S, pixel_budget
from handler.compare.vl.protocol import Fault
from handler.config import ComparisonConfig, Settings
from handler.errors import ModelUnavailable
from handler.images import prepare
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import scenes, tiny_vlm

#: In the answer schema's order and separators, so the schema constraint lets it through as is.
ANSWER = {
    "similarity": 0.75,
    "summary": "The same cat; a cup appears in image B.",
    "differences": [
        {"aspect": "presence", "element": "cup", "description": "A cup was added.", "region": None}
    ],
}
#: Small prepared images keep the tiny model's prompt short (and the tests fast).
CONFIG = ComparisonConfig(max_image_size=(256, 256), processing_timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.build(tmp_path_factory.mktemp("tiny-vlm"), answer=json.dumps(ANSWER))


@pytest.fixture(scope="module")
def comparator(model_dir: Path, offline: None) -> Iterator[VLComparator]:
    vl = VLComparator(Settings(model=str(model_dir), device="cpu"))
    yield vl
    vl.close()


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
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    result = _run(comparator, *edited_pair)
    _assert_answered(result)
    assert result.is_similar is False  # 0.75 < the 0.93 default threshold
    assert result.summary == ANSWER["summary"]
    assert [d.model_dump() for d in result.differences] == ANSWER["differences"]
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
    # 256x170 prepared -> 252x168 after the 28-pixel grid: 9 x 6 tokens per image.
    assert result.vl.visual_tokens == 2 * 9 * 6
    # A threshold below the model's score flips is_similar, nothing else.
    lenient = CONFIG.model_copy(update={"similarity_threshold": 0.7})
    assert _run(comparator, *edited_pair, config=lenient).is_similar is True


def test_identical_and_near_identical_pairs_skip_the_model(comparator: VLComparator) -> None:
    """A crash fault is armed: had the model been asked, the pair would fail."""
    comparator.fault = Fault(crash=True)
    pid = comparator.worker_pid
    cat = scenes.photo("chelsea")
    same = _run(comparator, scenes.as_png(cat), scenes.as_png(cat))
    assert same.status == "ok" and same.similarity == 1.0 and same.is_similar
    assert same.vl is not None and same.vl.skipped and same.vl.skip_reason == "pixel-identical"
    assert same.metrics["pixel_identical"] == 1.0

    pixels = np.asarray(cat, dtype=np.int16)
    nudged = np.clip(pixels + np.random.default_rng(0).integers(-1, 2, pixels.shape), 0, 255)
    near = _run(
        comparator,
        scenes.as_png(cat),
        scenes.as_png(Image.fromarray(nudged.astype(np.uint8))),
        CONFIG.model_copy(update={"max_image_size": (1024, 1024)}),  # no resampling
    )
    assert near.status == "ok" and near.vl is not None and near.vl.skipped
    assert near.vl.skip_reason is not None and near.vl.skip_reason.startswith("near-identical")
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


def test_an_8000x6000_pair_is_capped_in_visual_tokens(comparator: VLComparator) -> None:
    big_a = Image.new("RGB", (8000, 6000), (200, 40, 40))
    big_b = Image.new("RGB", (8000, 6000), (40, 40, 200))
    config = CONFIG.model_copy(update={"max_image_size": (1024, 1024)})
    result = _run(comparator, scenes.encode(big_a), scenes.encode(big_b), config)
    _assert_answered(result)
    assert result.inputs[0].original_size == (8000, 6000)
    assert result.vl is not None and result.vl.max_pixels == pixel_budget((1024, 1024))
    # Prepared at 1024x768 -> 1036x756 on the 28-pixel grid -> 37 x 27 tokens per image,
    # where the checkpoint's own cap would allow 16,170 per image (test_vl_tokens.py).
    assert result.vl.visual_tokens == 2 * 37 * 27


def test_out_of_memory_is_retried_at_half_the_pixels(
    comparator: VLComparator, edited_pair: tuple[bytes, bytes]
) -> None:
    """The allocator fails while an image has more than 200x200 pixels: the retry fits."""
    pid = comparator.worker_pid
    comparator.fault = Fault(oom_above_pixels=200 * 200)
    result = _run(comparator, *edited_pair)
    _assert_answered(result)
    assert result.vl is not None and result.vl.attempts == 2
    # First attempt: 252x168 = 42,336 pixels per image; the retry's budget is half of that.
    assert result.vl.max_pixels == 252 * 168 // 2
    assert result.vl.visual_tokens is not None and result.vl.visual_tokens < 2 * 9 * 6
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
        _run(vl, *edited_pair, config=config)  # the first pair also waits for the load
        pid = vl.worker_pid
        started = time.monotonic()
        result = _run(vl, *edited_pair, config=config)
        assert time.monotonic() - started < 0.3 + KILL_GRACE_S
        assert result.status == "timeout" and result.error is not None
        assert "did not finish its answer within 0.3 s" in result.error.message
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
