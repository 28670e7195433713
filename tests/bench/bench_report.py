"""Benchmark: the diff image's cost per pair, and ``pairwatch report`` over 1,000 pairs.

1. ``compare_pair`` with and without ``diff_image`` on 12-megapixel photos (same run, ratio).
2. A folder of N pairs (real results of a few real comparisons, copied to N pair folders with
   their inputs): report build time and HTML size with embedded previews against no previews,
   then page timings in headless Chromium (DOMContentLoaded, load, one filter, one sort).

    .venv/bin/python -m tests.bench.bench_report [--pairs 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.pairs import DIFF_NAME, RESULT_NAME
from handler.pipeline import ImageInput, compare_pair
from tests.support import scenes
from tests.support.browser import start_chromium
from watcher.report import build_report

MAX_PIXELS = 200_000_000


def _pair(a: bytes, b: bytes, diff: bool) -> Any:
    return compare_pair(
        "bench",
        ImageInput("a.jpg", lambda: a),
        ImageInput("b.jpg", lambda: b),
        ComparisonConfig(),
        MetricsComparator(),
        max_input_pixels=MAX_PIXELS,
        diff_image=diff,
    )


def bench_diff(repeat: int) -> None:
    photo = scenes.photo("coffee").resize((4000, 3000), Image.Resampling.BICUBIC)
    a, b = scenes.encode(photo), scenes.pasted_object(photo)
    times: dict[bool, list[float]] = {False: [], True: []}
    size = 0
    for _ in range(repeat):
        for diff in (False, True):
            start = time.perf_counter()
            outcome = _pair(a, b, diff)
            times[diff].append(time.perf_counter() - start)
            if outcome.diff_png:
                size = len(outcome.diff_png)
    plain, with_diff = statistics.median(times[False]), statistics.median(times[True])
    print(f"compare_pair 12MP pair, median of {repeat}:")
    print(f"  without diff image   {plain * 1000:8.1f} ms")
    print(
        f"  with diff image      {with_diff * 1000:8.1f} ms  "
        f"(x{with_diff / plain:.2f}; diff.png {size / 1024:.0f} KiB)"
    )


def _make_folder(root: Path, pairs: int) -> None:
    seeds = []
    for name in scenes.PHOTOS:
        photo = scenes.photo(name).resize((1600, 1200), Image.Resampling.BICUBIC)
        for edit in (scenes.reencoded, scenes.pasted_object):
            a, b = scenes.encode(photo), edit(photo)
            seeds.append((a, b, _pair(a, b, True)))
    for index in range(pairs):
        a, b, outcome = seeds[index % len(seeds)]
        folder = root / f"pair-{index:05d}"
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(a)
        (folder / "b.jpg").write_bytes(b)
        (folder / DIFF_NAME).write_bytes(outcome.diff_png)
        result = outcome.result.model_copy(update={"pair_id": folder.name, "diff_image": DIFF_NAME})
        (folder / RESULT_NAME).write_text(result.to_json())


def _browser_timings(page: Path, profile: Path) -> dict[str, float]:
    from selenium.webdriver.support.ui import Select

    driver = start_chromium(profile)
    try:
        driver.get(page.as_uri())
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd};"
        )
        start = time.perf_counter()
        Select(driver.find_element("id", "show")).select_by_value("different")
        driver.execute_script("return document.getElementById('count').textContent")
        filter_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        Select(driver.find_element("id", "sort")).select_by_value("name")
        driver.execute_script("return document.body.offsetHeight")
        sort_ms = (time.perf_counter() - start) * 1000
        return {"dcl": nav["dcl"], "load": nav["load"], "filter": filter_ms, "sort": sort_ms}
    finally:
        driver.quit()


def bench_report(pairs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "results"
        _make_folder(root, pairs)
        rows = {}
        for label, thumb in (("no previews", 0), ("previews", 128)):
            page = Path(tmp) / f"report-{thumb}.html"
            start = time.perf_counter()
            built = build_report(
                root, page, thumb_size=thumb, max_input_bytes=1 << 28, max_input_pixels=MAX_PIXELS
            )
            seconds = time.perf_counter() - start
            timings = _browser_timings(page, Path(tmp) / f"profile-{thumb}")
            rows[label] = (seconds, built.bytes, timings)
        print(f"report over {pairs} pairs (1600x1200 JPEG inputs):")
        for label, (seconds, size, t) in rows.items():
            print(
                f"  {label:12s} build {seconds:6.2f} s  html {size / 1e6:6.2f} MB  "
                f"DOMContentLoaded {t['dcl']:6.0f} ms  load {t['load']:6.0f} ms  "
                f"filter {t['filter']:5.0f} ms  sort {t['sort']:5.0f} ms"
            )
        base, full = rows["no previews"], rows["previews"]
        print(
            f"  previews/no previews: build x{full[0] / base[0]:.1f}, "
            f"size x{full[1] / base[1]:.1f}, load x{full[2]['load'] / base[2]['load']:.2f}"
        )
        print(json.dumps({k: {"build_s": v[0], "bytes": v[1], **v[2]} for k, v in rows.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bench_diff(args.repeat)
    bench_report(args.pairs)


if __name__ == "__main__":
    main()
