"""Benchmark: pairs/s through ``transformers serve`` (``vl_backend=openai``) vs the local worker.

Same offline tiny model (wired to a fixed valid answer), same prepared pairs, same number of
threads calling ``VLComparator.compare`` (the runner's ``concurrency``), in the same run. The
local backend is the yardstick. Prints pairs/s of each and the ratio; no target.

    .venv/bin/python -m tests.bench.bench_engine [--pairs 24] [--threads 1 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from handler.compare.vl import VLComparator
from handler.config import ComparisonConfig, Settings
from handler.images import PreparedImage, prepare
from handler.logs import configure_logging
from tests.support import scenes, tiny_vlm
from tests.support.engine_server import TransformersServe

ANSWER = json.dumps(
    {"similarity": 0.5, "differences": [], "summary": "The two images differ slightly."}
)
CONFIG = ComparisonConfig(max_image_size=(448, 448))


def pairs(count: int) -> list[tuple[PreparedImage, PreparedImage]]:
    """Distinct pairs (a pasted patch of a different size each), so no cache can answer."""
    cat = scenes.photo("chelsea")
    a = prepare(scenes.encode(cat), CONFIG.max_image_size, CONFIG.image_quality)
    return [
        (a, prepare(scenes.pasted_object(cat, 0.02 + 0.005 * i), CONFIG.max_image_size, 85))
        for i in range(count)
    ]


def throughput(
    comparator: VLComparator, work: list[tuple[PreparedImage, PreparedImage]], threads: int
) -> tuple[float, bool]:
    """Pairs/s, and whether the answers were schema-constrained."""
    comparator.wait_ready()
    comparator.compare(*work[0], CONFIG)  # warm-up: first-call costs are not throughput
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(lambda pair: comparator.compare(*pair, CONFIG), work))
    elapsed = time.perf_counter() - started
    assert all(outcome.vl and outcome.vl.raw_text == ANSWER for outcome in outcomes)
    return len(work) / elapsed, all(outcome.vl and outcome.vl.constrained for outcome in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs; best is kept")
    args = parser.parse_args()
    configure_logging("console", "WARNING")  # one line per pair would drown the numbers
    work = pairs(args.pairs)
    rates: dict[tuple[str, int], float] = {}
    constrained: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_vlm.build(Path(tmp) / "model", answer=ANSWER)
        base = {"model": str(model), "device": "cpu", "vl_max_new_tokens": 64}
        server = TransformersServe(model, Path(tmp) / "serve.log")
        server.start()
        comparators = {
            "local": VLComparator(Settings(**base)),
            "openai": VLComparator(Settings(**base, vl_backend="openai", vl_endpoint=server.url)),
        }
        try:
            # Alternating rounds, best kept: the machine is shared, and a burst of someone
            # else's load should not decide the ratio.
            for threads in args.threads:
                for _ in range(args.rounds):
                    for name, comparator in comparators.items():
                        rate, constrained[name] = throughput(comparator, work, threads)
                        rates[name, threads] = max(rates.get((name, threads), 0.0), rate)
        finally:
            for comparator in comparators.values():
                comparator.close()
            server.stop()
    print(f"{args.pairs} pairs, tiny offline Qwen2-VL on CPU, images <= {CONFIG.max_image_size}")
    print(f"answers constrained to the schema: {constrained}")
    print(f"{'threads':>8} {'local pairs/s':>14} {'openai pairs/s':>15} {'openai/local':>13}")
    for t in args.threads:
        local, remote = rates["local", t], rates["openai", t]
        print(f"{t:>8} {local:>14.2f} {remote:>15.2f} {remote / local:>12.2f}x")


if __name__ == "__main__":
    main()
