"""``pairwatch compare A B --comparator vl`` with a random-weight tiny Qwen2-VL, in a subprocess.

Random weights answer gibberish, so this is the ``model_output_invalid`` path, end to end: the
console command, settings from the environment, the spawned worker, the error result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema

from handler.result import ComparisonResult, result_json_schema
from tests.support import scenes, tiny_vlm
from tests.support.logs import json_events


def test_compare_with_a_random_model_gives_a_valid_constrained_answer(tmp_path: Path) -> None:
    """Random weights say gibberish; decoding constrained to the answer schema makes it a
    valid answer all the same (before the constraint this was ``model_output_invalid``)."""
    model = tiny_vlm.build(tmp_path / "model")
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    cat = scenes.photo("chelsea")
    a.write_bytes(scenes.encode(cat))
    b.write_bytes(scenes.pasted_object(cat))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PAIRWATCH_MODEL": str(model),
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_COMPARISON__MAX_IMAGE_SIZE": "[256, 256]",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "compare", str(a), str(b), "--comparator", "vl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)  # stdout holds the result JSON and nothing else
    jsonschema.validate(document, result_json_schema())
    result = ComparisonResult.model_validate(document)
    assert result.comparator.name == "vl" and result.comparator.model == str(model)
    assert result.comparator.device == "cpu"
    assert result.status == "ok", result.error
    assert result.vl is not None and result.vl.raw_text and not result.vl.skipped
    assert result.vl.constrained and result.comparator.backend == "local"
    assert json.loads(result.vl.raw_text, strict=False)["similarity"] == result.similarity
    # Two 256x170 overviews (9 x 6 tokens each) and the pasted patch's region cut at native
    # resolution, fitted to the pair's budget: 181x121 -> 168x112 on the grid, 6 x 4 tokens.
    assert result.vl.visual_tokens == 2 * 9 * 6 + 2 * 6 * 4 and result.vl.attempts == 1
    assert result.metrics["ssim"] < 1.0
    events = json_events(proc.stderr)
    names = [event["event"] for event in events]
    assert {"vl_worker_started", "vl_worker_ready", "vl_generated", "pair_compared"} <= set(names)
    generated = next(event for event in events if event["event"] == "vl_generated")
    assert generated["constrained"] is True and 0 < generated["new_tokens"] < 512
    assert generated["pictures"] == 4
