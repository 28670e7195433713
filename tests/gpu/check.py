"""Device check: the tiny VL model on a GPU, pairs/second and peak GPU memory from 1 to 100 MP.

Run it as ``tests/gpu/check.sh`` on a machine with a CUDA GPU. It builds the tiny Qwen2-VL
(tests/support/tiny_vlm.py, wired to answer valid JSON), then pushes pairs of synthetic JPEGs of
growing size through the real pipeline (``compare_pair``: bounded decode, metrics, the model
worker on ``cuda``). Peak GPU memory is what the worker's allocator reports per pair
(``result.vl.peak_memory_mb``). Inputs are downsized before the model sees them, so the peak
must stay flat however large the input: the check fails (exit 1) when the largest input's peak
exceeds the smallest's by more than ``TOLERANCE_MB``. ``--device cpu`` runs the same steps
without a GPU (no memory verdict), to check the script itself.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from handler.compare.vl import VLComparator
from handler.config import ComparisonConfig, Settings
from handler.logs import configure_logging
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import tiny_vlm

ANSWER = '{"similarity": 0.8, "summary": "check", "differences": []}'
#: Allocator rounding and cache blocks; a growing peak is hundreds of MB at 100 MP.
TOLERANCE_MB = 16.0


def synthetic_pair(megapixels: float, seed: int) -> tuple[bytes, bytes]:
    """Two 4:3 JPEGs with a gradient and shapes; B moves one shape so the pair is not skipped."""
    height = int(math.sqrt(megapixels * 1e6 * 3 / 4))
    width = int(height * 4 / 3)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)) * rng.uniform(0.3, 1.0, size=3)
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width * 0.9)), int(rng.integers(0, height * 0.9))
        size = int(min(width, height) * rng.uniform(0.03, 0.1))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x, y, x + size, y + size), fill=color)
    first = _jpeg(image)
    side = min(width, height) // 6
    draw.rectangle((width // 3, height // 3, width // 3 + side, height // 3 + side), fill=(0, 0, 0))
    return first, _jpeg(image)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--sizes", default="1,4,12,25,50,100", help="megapixels, comma-separated")
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs per size")
    parser.add_argument("--max-image-size", type=int, default=1024, help="prepared box edge")
    args = parser.parse_args(argv)
    configure_logging("json", "WARNING")
    sizes = [float(s) for s in args.sizes.split(",")]
    config = ComparisonConfig(max_image_size=(args.max_image_size, args.max_image_size))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_vlm.build(Path(folder) / "tiny-vlm", answer=ANSWER)
        comparator = VLComparator(Settings(model=str(model), device=args.device))
        try:
            warm_a, warm_b = synthetic_pair(0.3, seed=99)
            warm = run_pair(comparator, warm_a, warm_b, config)
            if warm.status != "ok":
                print(f"warm-up failed: {warm.error}", file=sys.stderr)
                return 2
            print(f"device: {warm.comparator.device}")
            print(f"{'MP':>6} {'input':>11} {'pairs/s':>8} {'tokens':>7} {'peak MB':>8}")
            for index, megapixels in enumerate(sizes):
                a, b = synthetic_pair(megapixels, seed=index)
                peaks: list[float] = []
                started = time.perf_counter()
                for _ in range(args.pairs):
                    result = run_pair(comparator, a, b, config)
                    if result.status != "ok" or result.vl is None:
                        print(f"{megapixels} MP: {result.status} {result.error}", file=sys.stderr)
                        return 2
                    if result.vl.peak_memory_mb is not None:
                        peaks.append(result.vl.peak_memory_mb)
                rate = args.pairs / (time.perf_counter() - started)
                size = result.inputs[0].original_size
                row = {
                    "megapixels": megapixels,
                    "input": f"{size[0]}x{size[1]}" if size else "?",
                    "pairs_per_s": round(rate, 2),
                    "visual_tokens": result.vl.visual_tokens,
                    "peak_gpu_mb": max(peaks) if peaks else None,
                }
                rows.append(row)
                peak = f"{row['peak_gpu_mb']:.1f}" if peaks else "n/a"
                print(
                    f"{megapixels:>6g} {row['input']:>11} {rate:>8.2f} "
                    f"{row['visual_tokens']!s:>7} {peak:>8}"
                )
        finally:
            comparator.close()
    print(json.dumps({"device": args.device, "rows": rows}))
    peaks_by_size = [r["peak_gpu_mb"] for r in rows if r["peak_gpu_mb"] is not None]
    if len(peaks_by_size) < 2:
        print("no GPU memory figures (CPU run): no memory verdict")
        return 0
    growth = float(peaks_by_size[-1]) - float(peaks_by_size[0])
    verdict = "PASS" if growth <= TOLERANCE_MB else "FAIL"
    print(f"{verdict}: peak GPU memory changed {growth:+.1f} MB from the smallest to the largest")
    return 0 if verdict == "PASS" else 1


def run_pair(
    comparator: VLComparator, a: bytes, b: bytes, config: ComparisonConfig, pair_id: str = "check"
) -> ComparisonResult:
    """One pair of JPEG bytes through the real pipeline (also used by the throughput checks)."""
    return compare_pair(
        pair_id,
        ImageInput("a.jpg", lambda: a),
        ImageInput("b.jpg", lambda: b),
        config,
        comparator,
        max_input_pixels=200_000_000,
    ).result


if __name__ == "__main__":
    sys.exit(main())
