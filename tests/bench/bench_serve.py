"""Benchmark: ``POST /v1/compare`` of a real ``pairwatch serve`` against the pipeline called
directly, on the same 1-megapixel JPEG pairs with the metrics comparator.

Target (issue 14): the server adds at most 15 % to the per-pair time.

1. ``direct``: ``handler.pipeline.compare_pair`` on every pair, one after another, in this
   process (what a request does once its upload is in memory).
2. ``serve``: the real CLI (``pairwatch serve``) in a subprocess with its default concurrency
   (1 pair at a time for the metrics comparator) and a queue large enough for every client;
   1, 4 and 16 client threads (one keep-alive ``httpx.Client`` each) post the pairs. Reported:
   requests/s, p50/p95 latency per request, and per-pair time (wall time / pairs) against
   ``direct``'s. With more clients than slots, latency grows with the queue; the per-pair time
   is what the server adds.

Each level runs ``--rounds`` times, the yardstick right before each round (the machine may be
shared); the round with the median ratio is printed.

    .venv/bin/python -m tests.bench.bench_serve [--pairs 32] [--clients 1,4,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.logs import configure_logging
from handler.pipeline import ImageInput, compare_pair
from tests.bench.bench_watch import make_pairs
from tests.support.serve_process import serve_process

TARGET_OVERHEAD = 0.15


def direct(pairs: list[tuple[bytes, bytes]]) -> float:
    """Seconds per pair through the pipeline in this process."""
    comparator = MetricsComparator()
    config = ComparisonConfig()
    started = time.perf_counter()
    for index, (a, b) in enumerate(pairs):
        result = compare_pair(
            f"direct-{index}",
            ImageInput("a.jpg", lambda a=a: a),
            ImageInput("b.jpg", lambda b=b: b),
            config,
            comparator,
            max_input_pixels=200_000_000,
        ).result
        assert result.status == "ok", result.error
    return (time.perf_counter() - started) / len(pairs)


def served(url: str, pairs: list[tuple[bytes, bytes]], clients: int) -> dict[str, float]:
    """Post every pair from ``clients`` threads; requests/s, latency percentiles, s/pair."""
    latencies: list[float] = []
    #: Per request: latency minus the pipeline's own time (``timings_ms.total``).
    added: list[float] = []
    failures: list[str] = []
    next_pair = iter(range(len(pairs)))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    index = next(next_pair, None)
                if index is None:
                    return
                a, b = pairs[index]
                sent = time.perf_counter()
                answer = http.post(
                    "/v1/compare",
                    files={"a": ("a.jpg", a, "image/jpeg"), "b": ("b.jpg", b, "image/jpeg")},
                )
                elapsed = time.perf_counter() - sent
                with lock:
                    latencies.append(elapsed)
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text[:200]}")
                    else:
                        added.append(elapsed - answer.json()["timings_ms"]["total"] / 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "rps": len(pairs) / wall,
        "p50": statistics.median(latencies),
        "p95": cuts[18],
        "per_pair": wall / len(pairs),
        "added": statistics.median(added),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    pairs = make_pairs(args.pairs)
    print(f"{len(pairs)} pairs of 1 MP JPEGs, metrics comparator, {args.rounds} rounds per level")
    overheads = []
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "direct.log").open("w") as log:
        # Both sides log JSON lines at INFO to a file, as a deployment would.
        with contextlib.redirect_stderr(log):
            configure_logging("json", "INFO")
        env = {"PAIRWATCH_QUEUE_SIZE": str(max(levels) + 1)}
        with serve_process(Path(tmp), env) as server:
            served(server.url, pairs[:4], 1)  # warm-up: imports, first decodes
            for clients in levels:
                # The machine is shared: each round times the yardstick right before the
                # server, and the round with the median ratio is reported.
                rounds = []
                for _ in range(args.rounds):
                    baseline = direct(pairs)
                    rounds.append((served(server.url, pairs, clients), baseline))
                rounds.sort(key=lambda r: r[0]["per_pair"] / r[1])
                numbers, baseline = rounds[len(rounds) // 2]
                overhead = numbers["per_pair"] / baseline - 1
                overheads.append(overhead)
                print(
                    f"serve, {clients:2d} clients: {numbers['rps']:.2f} req/s, "
                    f"p50 {numbers['p50'] * 1000:.0f} ms, p95 {numbers['p95'] * 1000:.0f} ms, "
                    f"{numbers['per_pair'] * 1000:.1f} ms/pair vs direct "
                    f"{baseline * 1000:.1f} ms/pair ({1 / baseline:.2f} pairs/s): {overhead:+.1%}"
                )
                if clients == 1:
                    print(
                        f"  one request at a time: the server adds {numbers['added'] * 1000:.1f}"
                        " ms (median latency minus the pipeline's own timings_ms.total)"
                    )
    worst = max(overheads)
    verdict = "meets" if worst <= TARGET_OVERHEAD else "misses"
    print(f"worst overhead {worst:+.1%}: {verdict} the {TARGET_OVERHEAD:.0%} target")


if __name__ == "__main__":
    main()
