"""The visual-token cap: what the processor is told, whatever image reaches it.

The processor is the tiny checkpoint's, saved and loaded back with ``AutoProcessor`` (offline),
and driven by the worker's own ``encode_pair``; no model or worker process is needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor

from handler.compare.vl.comparator import pixel_budget
from handler.compare.vl.prompt import build_prompt
from handler.compare.vl.worker import count_visual_tokens, encode_pair, pixel_area_sizing
from handler.config import ComparisonConfig
from tests.support import tiny_vlm


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-processor")
    tiny_vlm.build_processor(tiny_vlm.build_tokenizer()).save_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return AutoProcessor.from_pretrained(folder)


def _pair(a: Image.Image, b: Image.Image) -> list[tuple[str, Image.Image]]:
    return [("Image A:", a), ("Image B:", b)]


@pytest.fixture(scope="module")
def huge() -> Image.Image:
    return Image.new("RGB", (8000, 6000), (90, 120, 200))


def test_the_checkpoint_cap_alone_would_allow_16170_tokens_per_image(processor: Any) -> None:
    """Why the explicit cap exists: 8000x6000 under the shipped 12,845,056-pixel setting."""
    patches = processor.image_processor.get_number_of_image_patches(6000, 8000, {})
    assert patches // 4 == 16_170


def test_an_8000x6000_pair_is_capped_by_max_image_size(processor: Any, huge: Image.Image) -> None:
    """Even an image that bypassed ``prepare`` is held to the ``max_image_size`` budget."""
    sizing = pixel_area_sizing(processor.image_processor)
    assert sizing == 28
    budget = pixel_budget((1024, 1024))
    inputs, used = encode_pair(processor, sizing, _pair(huge, huge), "Compare.", budget)
    tokens = count_visual_tokens(processor, inputs["input_ids"])
    # Fitted to 1182x886, then 1176x868 on the 28-pixel grid: 42 x 31 tokens per image.
    assert tokens == 2 * 42 * 31
    assert used == 1176 * 868 <= budget
    assert tokens <= 2 * budget // (28 * 28)
    assert inputs["image_grid_thw"].tolist() == [[1, 62, 84], [1, 62, 84]]


@pytest.mark.parametrize(("box", "per_image"), [((448, 448), 252), ((2048, 2048), 5292)])
def test_the_cap_follows_max_image_size(
    processor: Any, huge: Image.Image, box: tuple[int, int], per_image: int
) -> None:
    budget = pixel_budget(box)
    inputs, _ = encode_pair(processor, 28, _pair(huge, huge), "x", budget)
    assert count_visual_tokens(processor, inputs["input_ids"]) == 2 * per_image
    assert per_image <= budget // (28 * 28)


def test_the_prompt_follows_the_two_images(processor: Any) -> None:
    small = Image.new("RGB", (64, 64))
    prompt = build_prompt(ComparisonConfig())
    inputs, _ = encode_pair(processor, 28, _pair(small, small), prompt, pixel_budget((1024, 1024)))
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    a, b = text.index("Image A:"), text.index("Image B:")
    assert a < text.index("<|vision_start|>", a) < b < text.index("<|vision_start|>", b)
    assert text.index(prompt) > b
    assert text.endswith("<|im_start|>assistant\n")


def test_crops_follow_the_overviews_each_after_its_label(processor: Any) -> None:
    """N pictures: each after its own label, each capped, every token counted."""
    overview, crop = Image.new("RGB", (252, 168)), Image.new("RGB", (224, 112))
    pictures = [
        *_pair(overview, overview),
        ("Region 0 in image A:", crop),
        ("Region 0 in image B:", crop),
    ]
    inputs, used = encode_pair(processor, 28, pictures, "Compare.", 256 * 256)
    assert used == 252 * 168
    assert count_visual_tokens(processor, inputs["input_ids"]) == 2 * 9 * 6 + 2 * 8 * 4
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    starts = [text.index(label) for label, _ in pictures]
    assert starts == sorted(starts) and text.count("<|vision_start|>") == 4
    for (label, _), (following, _) in itertools.pairwise(pictures):
        begin = text.index(label)
        assert begin < text.index("<|vision_start|>", begin) < text.index(following)


def test_an_out_of_memory_retry_halves_every_picture(processor: Any) -> None:
    """``scale=0.5`` (the retry) halves the crops' pixels too, not only the largest picture's."""
    overview, crop = Image.new("RGB", (504, 336)), Image.new("RGB", (224, 224))
    pictures = [*_pair(overview, overview), ("c A:", crop), ("c B:", crop)]
    full, used = encode_pair(processor, 28, pictures, "x", 1024 * 1024)
    half, _ = encode_pair(processor, 28, pictures, "x", used // 2, scale=0.5)
    grid_full, grid_half = full["image_grid_thw"].tolist(), half["image_grid_thw"].tolist()
    assert grid_full == [[1, 24, 36], [1, 24, 36], [1, 16, 16], [1, 16, 16]]
    for before, after in zip(grid_full, grid_half, strict=True):
        assert 0.35 < (after[1] * after[2]) / (before[1] * before[2]) < 0.6  # grid rounding
    assert count_visual_tokens(processor, half["input_ids"]) < 0.6 * count_visual_tokens(
        processor, full["input_ids"]
    )


def test_fixed_size_processors_get_no_pixel_area_cap() -> None:
    """LLaVA-style processors resize to a fixed size; only the downscaling bounds them."""
    assert pixel_area_sizing(CLIPImageProcessor()) is None
