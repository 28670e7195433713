"""Benchmark: VL throughput unbatched vs batched, on the offline random-weight tiny model, CPU.

The same 32 pairs go through the real pipeline (``compare_pair``: bounded decode, metrics
pre-gate, the worker process, schema-constrained generate, answer parsing) twice, in one run:

1. yardstick: concurrency 1, ``vl_batch_size`` 1 — one pair at a time, as before batching;
2. batched: concurrency 8 (threads calling ``compare_pair``, as the runner's are),
   ``vl_batch_size`` 8.

Prints pairs/s of each (from the worker's Ready to the last result), the ratio (target >= 3x)
and the share of answers that are complete, schema-valid JSON (target 100 %).

    .venv/bin/python -m tests.bench.bench_vl [--pairs 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from handler.compare.vl import VLComparator
from handler.compare.vl.prompt import ModelAnswer
from handler.config import ComparisonConfig, Settings
from handler.logs import configure_logging
from handler.result import ComparisonResult
from tests.gpu.check import run_pair
from tests.support import tiny_vlm

#: Small prepared images: the tiny model's prompt stays short, as the tests keep it.
CONFIG = ComparisonConfig(max_image_size=(128, 128))


def pairs(count: int) -> list[tuple[bytes, bytes]]:
    """Distinct pairs (B = A with a moved square), so none is skipped and answers differ."""
    made = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
        a = Image.fromarray(base)
        b = a.copy()
        x, y = int(rng.integers(0, 200)), int(rng.integers(0, 140))
        ImageDraw.Draw(b).rectangle((x, y, x + 48, y + 48), fill=(0, 0, 0))
        made.append((_jpeg(a), _jpeg(b)))
    return made


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def run(
    model: Path, work: list[tuple[bytes, bytes]], batch: int
) -> tuple[float, list[ComparisonResult]]:
    comparator = VLComparator(Settings(model=str(model), device="cpu", vl_batch_size=batch))
    try:
        comparator.wait_ready()

        def one(index: int) -> ComparisonResult:
            return run_pair(comparator, *work[index], CONFIG, pair_id=f"pair-{index}")

        started = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            results = list(pool.map(one, range(len(work))))
        return len(work) / (time.perf_counter() - started), results
    finally:
        comparator.close()


def schema_valid(result: ComparisonResult) -> bool:
    """``ok``, and the raw answer is complete JSON that validates — not repaired text."""
    if result.status != "ok" or result.vl is None or not result.vl.raw_text:
        return False
    try:
        ModelAnswer.model_validate(json.loads(result.vl.raw_text, strict=False))
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="concurrency and vl_batch_size")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    configure_logging("json", "WARNING")
    work = pairs(args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_vlm.build(Path(folder) / "random-vlm")
        rows = {}
        for label, batch in (("unbatched", 1), ("batched", args.batch)):
            rate, results = run(model, work, batch)
            valid = sum(schema_valid(r) for r in results)
            sizes = [r.vl.batch_size or 0 for r in results if r.vl is not None]
            rows[label] = {
                "concurrency": batch,
                "vl_batch_size": batch,
                "pairs_per_s": round(rate, 3),
                "schema_valid": f"{valid}/{len(results)}",
                "mean_batch": round(sum(sizes) / max(1, len(sizes)), 2),
                "constrained": all(r.vl is not None and r.vl.constrained for r in results),
            }
            print(
                f"{label:>9}: {rate:.2f} pairs/s, schema-valid {valid}/{len(results)}, "
                f"mean batch {rows[label]['mean_batch']}"
            )
    ratio = rows["batched"]["pairs_per_s"] / rows["unbatched"]["pairs_per_s"]
    print(f"ratio batched/unbatched: {ratio:.2f}x (target >= 3x)")
    print(json.dumps({"rows": rows, "ratio": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
