"""GPU check: VL throughput of a random-weight model with Qwen2.5-VL-3B-Instruct's real
architecture and size, batched, through the real pipeline. Nothing is downloaded.

Built on the machine itself: ``Qwen2_5_VLConfig`` with the checkpoint's published numbers
(36 text layers of width 2048, 16 heads / 2 KV heads, MLP 11008, vocabulary 151,936, M-RoPE
sections [16, 24, 24]; a 32-layer, 1280-wide vision tower with window attention), random bf16
weights, the offline tokenizer and Qwen image processor of ``tests/support/tiny_vlm``. For each
batch size (1, 4, 8, 16) ``concurrency = vl_batch_size`` threads push pairs of two 1024x1024
JPEGs through ``compare_pair`` (metrics pre-gate, the worker process, schema-constrained
generate); prints pairs/s, mean batch, tokens per answer, peak GPU memory (the worker's
allocator) and GPU busy time (``nvidia-smi`` utilisation sampled every 100 ms x wall time), from
the comparator's ``vl_generated`` log events.
Target: >= 10 pairs/s at batch 16 on one H200.

    tests/gpu/throughput.sh [--batches 1,4,8,16] [--pairs-per-batch 3]
    tests/gpu/throughput.sh --device cpu --tiny --batches 1,2 --pairs-per-batch 1   # no GPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from handler.compare.vl import VLComparator
from handler.config import ComparisonConfig, Settings
from handler.logs import configure_logging
from handler.result import ComparisonResult
from tests.gpu.check import run_pair
from tests.support import tiny_vlm
from tests.support.logs import captured_logs

#: Qwen2.5-VL-3B-Instruct's config.json (text and vision), as published.
TEXT_3B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
    "max_position_embeddings": 128_000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [16, 24, 24],
    },
}
VISION_3B: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
#: A small model of the same classes, to check the script without a GPU.
TEXT_TINY = {
    **TEXT_3B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "rope_parameters": {**TEXT_3B["rope_parameters"], "mrope_section": [2, 3, 3]},
}
VISION_TINY = {
    **VISION_3B,
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
}


def square_pair(size: int, seed: int) -> tuple[bytes, bytes]:
    """Two ``size`` x ``size`` JPEGs: noise over a gradient; B has a black square added."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 55, (size, size, 3)).astype(np.float32)
    image = Image.fromarray((ramp + noise).astype(np.uint8), "RGB")
    first = _jpeg(image)
    x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
    ImageDraw.Draw(image).rectangle((x, y, x + size // 6, y + size // 6), fill=(0, 0, 0))
    return first, _jpeg(image)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_model(directory: Path, tiny: bool, device: str) -> Path:
    """Write a random-weight checkpoint with the offline tokenizer and processor."""
    tokenizer = tiny_vlm.build_tokenizer()
    processor = tiny_vlm.build_processor(tokenizer)

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    text = dict(TEXT_TINY if tiny else TEXT_3B)
    text.update(
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=VISION_TINY if tiny else VISION_3B,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f} B parameters ({'tiny' if tiny else 'Qwen2.5-VL-3B size'})")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


class GpuBusy:
    """Mean ``utilization.gpu`` from ``nvidia-smi`` sampled every 100 ms while running."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                    "-i",
                    "0",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=5)

    def busy_share(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def run_batch_size(
    model: Path,
    device: str,
    batch: int,
    count: int,
    pairs: list[tuple[bytes, bytes]],
    config: ComparisonConfig,
    logs: list[MutableMapping[str, Any]],
) -> dict[str, Any]:
    comparator = VLComparator(Settings(model=str(model), device=device, vl_batch_size=batch))
    try:
        comparator.wait_ready()
        _one(comparator, pairs[0], config)  # warm-up: kernels, allocator, grammar compile

        first = len(logs)
        with GpuBusy() as busy:
            started = time.perf_counter()
            with ThreadPoolExecutor(batch) as pool:
                results = list(
                    pool.map(
                        lambda i: _one(comparator, pairs[i % len(pairs)], config), range(count)
                    )
                )
            wall = time.perf_counter() - started
        ok = [r for r in results if r.status == "ok" and r.vl is not None]
        share = busy.busy_share()
        peaks = [r.vl.peak_memory_mb for r in ok if r.vl.peak_memory_mb is not None]
        answers = [e for e in logs[first:] if e["event"] == "vl_generated"]
        tokens = sum(e["new_tokens"] for e in answers) / max(1, len(answers))
        generate_s = sum(e["generate_ms"] for e in answers) / max(1, len(answers)) / 1e3
        return {
            "batch": batch,
            "pairs": count,
            "ok": len(ok),
            "pairs_per_s": round(count / wall, 2),
            "mean_batch": round(sum(r.vl.batch_size or 0 for r in ok) / max(1, len(ok)), 2),
            "visual_tokens": ok[0].vl.visual_tokens if ok else None,
            "tokens_per_answer": round(tokens, 1),
            # A row's generate time (its batch's prefill and its own decoding), per new token.
            "ms_per_token": round(generate_s * 1e3 / max(tokens, 1.0), 1),
            "peak_gpu_mb": max(peaks) if peaks else None,
            "gpu_busy_s": round(share * wall, 2) if share is not None else None,
            "gpu_busy_share": round(share, 3) if share is not None else None,
            "constrained": all(r.vl.constrained for r in ok) if ok else False,
            "errors": sorted({r.error.type for r in results if r.error is not None}),
        }
    finally:
        comparator.close()


def _one(
    comparator: VLComparator, pair: tuple[bytes, bytes], config: ComparisonConfig
) -> ComparisonResult:
    return run_pair(comparator, *pair, config, pair_id="gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same classes")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--pairs-per-batch", type=int, default=3, help="timed pairs = this x batch")
    parser.add_argument("--image-size", type=int, default=1024)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging("json", "INFO")
    size = args.image_size
    config = ComparisonConfig(max_image_size=(size, size), processing_timeout=600)
    # Square 1024x1024 JPEGs (1 MP), distinct per pair so no pair is skipped as identical.
    pairs = [square_pair(size, seed) for seed in range(16)]
    rows = []
    # Log events are read (vl_generated), not printed; warnings and errors are shown at the end.
    with tempfile.TemporaryDirectory() as folder, captured_logs() as logs:
        model = build_model(Path(folder) / "qwen2.5-vl-3b-random", args.tiny, args.device)
        for batch in [int(b) for b in args.batches.split(",")]:
            row = run_batch_size(
                model, args.device, batch, batch * args.pairs_per_batch, pairs, config, logs
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    for event in logs:
        if event.get("log_level") in ("warning", "error", "critical"):
            print(json.dumps(event, default=str), file=sys.stderr)
    print(
        f"{'batch':>5} {'pairs/s':>8} {'mean batch':>10} {'tokens':>7} {'ms/token':>8} "
        f"{'peak MB':>9} {'GPU busy s':>10}"
    )
    for row in rows:
        print(
            f"{row['batch']:>5} {row['pairs_per_s']:>8} {row['mean_batch']:>10} "
            f"{row['tokens_per_answer']:>7} {row['ms_per_token']:>8} "
            f"{row['peak_gpu_mb']!s:>9} {row['gpu_busy_s']!s:>10}"
        )
    best = max(rows, key=lambda r: r["batch"])
    verdict = "PASS" if best["pairs_per_s"] >= 10 else "BELOW TARGET"
    print(f"{verdict}: {best['pairs_per_s']} pairs/s at batch {best['batch']} (target >= 10 at 16)")
    return 0 if all(r["ok"] == r["pairs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
