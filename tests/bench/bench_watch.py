"""Benchmark: the folder watcher against calling the handler directly, on the same pairs.

Target (issue 4): with the metrics comparator and 1-megapixel JPEG pairs, p50 from the second
image landing to ``result.json`` under 1 s, and watcher throughput within 80 % of the handler's.

1. ``direct``: ``handler.jobs.run_pair_job`` on every pair, in this process (same work as the
   watcher's job: read, prepare, compare, write result.json and diff.png).
2. ``burst``: the real CLI (``pairwatch watch DIR``) in a subprocess; all pairs are dropped as
   fast as possible (rsync-style: hidden temp file, then rename). Pairs/s from the first drop
   to the last result.
3. ``paced``: pairs dropped one by one at about half the direct throughput, alternately renamed
   into place (rsync) and written in place (``cp``; these wait for the settle time, 0.5 s by
   default). Latency = second image landed -> result written, per drop style.

Result times come from the watcher's ``result_written`` log lines (logged right after the
rename that makes result.json appear), so the benchmark does not poll the disk against the
watcher for the two CPUs.

    .venv/bin/python -m tests.bench.bench_watch [--pairs 200] [--paced-pairs 200]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from handler.compare import create_comparator
from handler.config import Settings
from handler.jobs import run_pair_job
from handler.logs import configure_logging
from handler.pairs import PairSpec
from handler.storage import LocalStorage
from tests.support import scenes

SIZE = (1155, 866)  # 1.0 megapixel


def make_pairs(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` pairs cycling through real photos and edits, as 1 MP JPEGs with sensor noise."""
    rng = np.random.default_rng(4)
    bases = []
    for name in scenes.PHOTOS:
        pixels = np.asarray(scenes.photo(name).resize(SIZE, Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)
        bases.append(Image.fromarray(noisy))
    edits = [*scenes.SIMILAR_EDITS.values(), *scenes.DIFFERENT_EDITS.values()]
    distinct = []
    for i in range(min(count, len(bases) * len(edits))):
        base = bases[i % len(bases)]
        b = edits[i % len(edits)](base)
        b_jpeg = _as_jpeg(b)
        distinct.append((scenes.encode(base, quality=90), b_jpeg))
    return [distinct[i % len(distinct)] for i in range(count)]


def _as_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            return data
        return scenes.encode(img.convert("RGB"), quality=90)


def drop(folder: Path, a: bytes, b: bytes, style: str) -> float:
    """Put a pair into ``folder``; returns the time the second image landed."""
    folder.mkdir(exist_ok=True)
    for name, data in (("a.jpg", a), ("b.jpg", b)):
        if style == "rename":
            temp = folder / f".{name}.tmp1234"
            temp.write_bytes(data)
            temp.rename(folder / name)
        else:
            (folder / name).write_bytes(data)
    return time.time()


def bench_direct(root: Path, pairs: list[tuple[bytes, bytes]], settings: Settings) -> float:
    for i, (a, b) in enumerate(pairs):
        drop(root / f"p{i:04d}", a, b, "rename")
    comparator = create_comparator(settings)
    storage = LocalStorage(root)
    start = time.perf_counter()
    for i in range(len(pairs)):
        spec = PairSpec("folder", f"p{i:04d}")
        report = run_pair_job(storage, spec, settings, comparator, now=time.time())
        assert report.action == "written", report
    elapsed = time.perf_counter() - start
    comparator.close()
    return len(pairs) / elapsed


class Watcher:
    """``pairwatch watch ROOT`` with its result_written events collected as they come."""

    def __init__(self, root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
        env["PAIRWATCH_LOG_FORMAT"] = "json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "watch", str(root)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.written: dict[str, float] = {}
        self.failed: list[str] = []
        self.started = threading.Event()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["event"] == "watch_started":
                self.started.set()
            elif event["event"] == "result_written":
                stamp = datetime.fromisoformat(event["timestamp"]).timestamp()
                with self._changed:
                    self.written[event["pair_id"]] = stamp
                    if event["status"] != "ok":
                        self.failed.append(event["pair_id"])
                    self._changed.notify_all()

    def wait_for(self, pair_ids: set[str], timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: pair_ids <= self.written.keys(), timeout):
                missing = sorted(pair_ids - self.written.keys())
                raise SystemExit(f"no result for {len(missing)} pairs, e.g. {missing[:3]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def bench_burst(root: Path, pairs: list[tuple[bytes, bytes]]) -> tuple[float, list[float]]:
    watcher = Watcher(root)
    try:
        assert watcher.started.wait(60), "watcher did not start"
        first = time.time()
        landed = {
            f"p{i:04d}": drop(root / f"p{i:04d}", a, b, "rename") for i, (a, b) in enumerate(pairs)
        }
        watcher.wait_for(set(landed), timeout=600)
    finally:
        watcher.stop()
    last = max(watcher.written[p] for p in landed)
    assert not watcher.failed, watcher.failed
    return len(pairs) / (last - first), [watcher.written[p] - t for p, t in landed.items()]


def bench_paced(
    root: Path, pairs: list[tuple[bytes, bytes]], interval: float
) -> dict[str, list[float]]:
    watcher = Watcher(root)
    landed: dict[str, tuple[str, float]] = {}
    try:
        assert watcher.started.wait(60), "watcher did not start"
        next_drop = time.monotonic()
        (root / "q0000").mkdir()
        for i, (a, b) in enumerate(pairs):
            style = ("rename", "copy")[i % 2]
            time.sleep(max(0.0, next_drop - time.monotonic()))
            landed[f"q{i:04d}"] = (style, drop(root / f"q{i:04d}", a, b, style))
            # Like a sync client, the next folder exists before its files arrive. (Files renamed
            # into a folder created a moment before can reach watchdog as plain creations, which
            # then wait for the settle time.)
            (root / f"q{i + 1:04d}").mkdir()
            next_drop += interval
        watcher.wait_for(set(landed), timeout=600)
    finally:
        watcher.stop()
    latencies: dict[str, list[float]] = {"rename": [], "copy": []}
    for pair_id, (style, t) in landed.items():
        latencies[style].append(watcher.written[pair_id] - t)
    return latencies


def percentiles(values: list[float]) -> str:
    q = [v * 1000 for v in statistics.quantiles(values, n=100, method="inclusive")]
    return f"p50 {q[49]:7.1f} ms   p95 {q[94]:7.1f} ms   max {max(values) * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--paced-pairs", type=int, default=200)
    args = parser.parse_args()
    configure_logging("json", "WARNING")  # the direct run's per-pair logs would drown the numbers
    settings = Settings()
    print(
        f"pairs: {args.pairs} x 2 JPEGs of {SIZE[0]}x{SIZE[1]} px, comparator metrics, "
        f"settle_time {settings.settle_time} s, diff_image {settings.diff_image}, "
        f"{os.cpu_count()} CPUs"
    )
    pairs = make_pairs(max(args.pairs, args.paced_pairs))
    sizes = [len(a) + len(b) for a, b in pairs]
    print(f"mean pair size {statistics.mean(sizes) / 1024:.0f} KiB")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for name in ("direct", "burst", "paced"):
            (base / name).mkdir()
        direct = bench_direct(base / "direct", pairs[: args.pairs], settings)
        print(f"direct  (run_pair_job)   {direct:6.2f} pairs/s")
        burst, burst_latency = bench_burst(base / "burst", pairs[: args.pairs])
        print(
            f"watcher (burst of {args.pairs})   {burst:6.2f} pairs/s   "
            f"= {burst / direct:.0%} of direct (target >= 80%)"
        )
        print(f"  burst latency (queueing included): {percentiles(burst_latency)}")
        interval = 2 / direct
        paced = bench_paced(base / "paced", pairs[: args.paced_pairs], interval)
        print(f"watcher (paced, one pair every {interval * 1000:.0f} ms), second image -> result:")
        for style, values in paced.items():
            label = "renamed into place" if style == "rename" else "written in place  "
            print(f"  {label} ({len(values)}): {percentiles(values)}")
        every = [v for values in paced.values() for v in values]
        print(f"  all ({len(every)}):               {percentiles(every)}   (target p50 < 1000 ms)")


if __name__ == "__main__":
    main()
