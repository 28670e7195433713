"""Benchmark: VL throughput unbatched vs batched, on the offline random-weight tiny model, CPU.

The same 32 pairs, written as pair folders, go through the real runner twice in one run, as
``pairwatch watch DIR --once`` runs them (the folder source, the runner's pairs in flight, the
job with its hashing and result writing, bounded decode, detection, the metrics pre-gate, the
worker process, schema-constrained generate, answer parsing):

1. yardstick: ``concurrency`` 1, ``vl_batch_size`` 1 — one pair at a time, as before batching;
2. batched: ``concurrency`` 8, ``vl_batch_size`` 8.

Prints pairs/s of each (from the model being ready to the last result written), the ratio
(target >= 3x) and the share of answers that are complete, schema-valid JSON (target 100 %).

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
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from handler.compare.vl.prompt import ModelAnswer
from handler.config import ComparisonConfig, Settings
from handler.logs import configure_logging
from handler.result import ComparisonResult
from tests.support import tiny_vlm
from watcher.runner import runner_for
from watcher.shutdown import StopFlag
from watcher.sources.folder import FolderSource

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
    """``watch DIR --once`` over the pairs with ``concurrency = vl_batch_size = batch``."""
    settings = Settings(
        model=str(model),
        device="cpu",
        vl_batch_size=batch,
        concurrency=batch,
        comparison=CONFIG,
        diff_image=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for index, (a, b) in enumerate(work):
            (root / f"pair-{index:02d}").mkdir()
            (root / f"pair-{index:02d}" / "a.jpg").write_bytes(a)
            (root / f"pair-{index:02d}" / "b.jpg").write_bytes(b)
        with runner_for(settings) as runner:
            runner.comparator.wait_ready()  # the model's load is not what is measured
            started = time.perf_counter()
            FolderSource(root, settings, runner, once=True).run(StopFlag())
            rate = len(work) / (time.perf_counter() - started)
        results = [
            ComparisonResult.model_validate_json(path.read_bytes())
            for path in sorted(root.glob("pair-*/result.json"))
        ]
    return rate, results


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
            assert len(results) == len(work), f"{len(results)} results for {len(work)} pairs"
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
