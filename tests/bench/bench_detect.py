"""Benchmark: native-resolution change detection against odiff, in one run, on the same files.

Cases: a full-page text screenshot of 3446 x 10728 with three words replaced; the same page
with a 74 px band inserted at the top as well (every row below moves down: aligned detection);
a 48 MP photo pair with a pasted object; a 100 MP pair with a pasted object; the same 100 MP
pair taken again from a camera moved by (5, 3) px, with the object. For each: odiff's wall time
and peak RSS (the yardstick, npm ``odiff-bin`` installed into a temporary folder: not a
dependency), pairwatch's detection stage alone (``handler.detect.detect`` in a fresh process:
its time, peak RSS, regions by kind and the alignment's offset), and the whole ``pairwatch
compare`` process (start-up included); ratios against odiff. Checks that every changed word
lies inside a reported region (at its place in B).

    .venv/bin/python -m tests.bench.bench_detect [--repeat 1] [--odiff PATH] [--skip-100mp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from tests.support import scenes, screens

ODIFF_VERSION = "4.5.0"
SCREEN = (3446, 10728)
#: A child that times only the detection stage and reports its own peak RSS (VmHWM).
DETECT_CHILD = """
import json, sys, time
from handler.detect import detect
a, b = (open(p, "rb").read() for p in sys.argv[1:3])
start = time.perf_counter()
found = detect(a, b, max_pixels=200_000_000)
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
kinds = [region.kind for region in found.regions]
offset = found.alignment.offset if found.alignment else None
print(json.dumps({"seconds": seconds, "rss_kb": hwm, "kinds": kinds, "offset": offset}))
"""
#: The band inserted at the top of the aligned screenshot.
BAND = 74
#: How far the camera moved between the two shots of the shifted 100 MP pair.
CAMERA = (5, 3)


@dataclass
class Run:
    seconds: float
    rss_mb: float
    output: str = ""
    stderr: str = ""


def timed(command: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of one process (GNU time's %M: the child's own maximum)."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    done = subprocess.run(
        [time_bin, "-f", "RSS_KB=%M", *command], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    rss = [line for line in done.stderr.splitlines() if line.startswith("RSS_KB=")]
    rss_mb = int(rss[-1].split("=")[1]) / 1024 if rss else float("nan")
    return Run(seconds, rss_mb, done.stdout, done.stderr)


def npm_install(folder: Path, package: str, command: str) -> Path:
    """``package`` (name@version) installed into ``folder``: the path of its ``command``.
    The yardsticks are npm tools, installed for the run only: not dependencies."""
    subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", package],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return folder / "node_modules" / ".bin" / command


def install_odiff(folder: Path) -> Path:
    return npm_install(folder, f"odiff-bin@{ODIFF_VERSION}", "odiff")


def make_screenshot(folder: Path) -> tuple[Path, Path, list[tuple[int, int, int, int]]]:
    page = screens.text_page(SCREEN)
    count = len(page.words)
    picks = {count // 5: "banana", count // 2: "quartz", 4 * count // 5: "zephyr"}
    edited = screens.replace_words(page, picks)
    a, b = folder / "page-a.png", folder / "page-b.png"
    a.write_bytes(screens.png(page.image))
    b.write_bytes(screens.png(edited.image))
    return a, b, [edited.words[index][1] for index in picks]


def make_banded_screenshot(
    folder: Path, edited: Path, words: list[tuple[int, int, int, int]]
) -> tuple[Path, list[tuple[int, int, int, int]]]:
    """The edited page with a band BAND px high inserted at the top, and its words' boxes."""
    with Image.open(edited) as page:
        banded = Image.new("RGB", (page.width, page.height + BAND), (253, 241, 199))
        draw = ImageDraw.Draw(banded)
        draw.text((40, 24), "We use cookies to remember your basket.", fill=(20, 20, 20))
        banded.paste(page.convert("RGB"), (0, BAND))
    path = folder / "page-banded.png"
    banded.save(path, "PNG")
    return path, [(x, y + BAND, w, h) for x, y, w, h in words]


def make_photo_pair(
    folder: Path, size: tuple[int, int], name: str, camera: tuple[int, int] = (0, 0)
) -> tuple[Path, Path]:
    """A photo at ``size`` and the same scene with an object pasted into it, taken with the
    camera moved by ``camera`` (the content moves the other way)."""
    dx, dy = camera
    scene = scenes.photo("astronaut").resize((size[0] + dx, size[1] + dy), Image.Resampling.BICUBIC)
    photo = scene.crop((0, 0, *size))
    a, b = folder / f"{name}-a.jpg", folder / f"{name}-b.jpg"
    photo.save(a, "JPEG", quality=90)
    b.write_bytes(scenes.pasted_object(scene.crop((dx, dy, size[0] + dx, size[1] + dy)), 0.01))
    return a, b


def median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda run: run.seconds)
    middle = ordered[len(ordered) // 2]
    return Run(
        statistics.median(r.seconds for r in runs), max(r.rss_mb for r in runs), middle.output
    )


def measure(
    label: str,
    a: Path,
    b: Path,
    odiff: Path,
    repeat: int,
    words: list[tuple[int, int, int, int]] | None,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "PAIRWATCH_LOG_FORMAT": "json"}
    yard = median_run(
        [
            timed([str(odiff), str(a), str(b), str(a.with_suffix(".odiff.png"))])
            for _ in range(repeat)
        ]
    )
    stage_runs = []
    for _ in range(repeat):
        run = timed([sys.executable, "-c", DETECT_CHILD, str(a), str(b)], env)
        report = json.loads(run.output)
        stage_runs.append(Run(report["seconds"], report["rss_kb"] / 1024, run.output))
    stage = median_run(stage_runs)
    found = json.loads(stage.output)
    whole = median_run(
        [
            timed(
                [
                    sys.executable,
                    "-m",
                    "watcher.cli",
                    "compare",
                    str(a),
                    str(b),
                    "--comparator",
                    "metrics",
                ],
                env,
            )
            for _ in range(repeat)
        ]
    )
    result = json.loads(whole.output)
    print(f"\n{label}: {a.stat().st_size / 1e6:.1f} MB + {b.stat().st_size / 1e6:.1f} MB")
    print(
        f"  odiff {ODIFF_VERSION}            {yard.seconds:6.2f} s  {yard.rss_mb:6.0f} MB peak RSS"
    )
    print(
        f"  pairwatch detect stage  {stage.seconds:6.2f} s  {stage.rss_mb:6.0f} MB"
        f"   time x{stage.seconds / yard.seconds:.2f} of odiff"
        f"   regions {dict(Counter(found['kinds']))} offset {found['offset']}"
    )
    print(
        f"  pairwatch compare       {whole.seconds:6.2f} s  {whole.rss_mb:6.0f} MB"
        f"   time x{whole.seconds / yard.seconds:.2f}, "
        f"RSS {whole.rss_mb / yard.rss_mb:.0%} of odiff"
    )
    print(
        f"  result: is_similar={result['is_similar']} regions={len(result['changed_regions'])}"
        f" changed_pixels={result['metrics'].get('changed_pixels')}"
        f" timings_ms={result['timings_ms']}"
    )
    if words is not None:
        # Where each region is in B (an older result: x/y/width/height, A's box).
        boxes = [r.get("b") or r for r in result["changed_regions"]]
        for x, y, width, height in words:
            inside = any(
                r["x"] <= x
                and r["y"] <= y
                and x + width <= r["x"] + r["width"]
                and y + height <= r["y"] + r["height"]
                for r in boxes
            )
            print(
                f"  changed word at ({x}, {y}) {width}x{height}: "
                + ("inside a region" if inside else "MISSED")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--odiff", type=Path, help="an odiff binary (default: npm install it)")
    parser.add_argument("--skip-100mp", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        folder = Path(tmp)
        odiff = args.odiff or install_odiff(folder)
        start = time.perf_counter()
        page_a, page_b, words = make_screenshot(folder)
        banded, banded_words = make_banded_screenshot(folder, page_b, words)
        photo_a, photo_b = make_photo_pair(folder, (8000, 6000), "photo48")
        cases: list[tuple[str, Path, Path, list[tuple[int, int, int, int]] | None]] = [
            ("screenshot 3446x10728, three words replaced", page_a, page_b, words)
        ]
        cases.append(
            (
                f"screenshot, {BAND} px band inserted at the top + three words",
                page_a,
                banded,
                banded_words,
            )
        )
        cases.append(("photo 8000x6000 (48 MP), pasted object", photo_a, photo_b, None))
        if not args.skip_100mp:
            big_a, big_b = make_photo_pair(folder, (10000, 10000), "photo100")
            cases.append(("photo 10000x10000 (100 MP), pasted object", big_a, big_b, None))
            moved_a, moved_b = make_photo_pair(folder, (10000, 10000), "moved100", CAMERA)
            cases.append(
                (f"100 MP, camera moved by {CAMERA} px, pasted object", moved_a, moved_b, None)
            )
        print(f"inputs rendered in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs")
        for label, a, b, case_words in cases:
            measure(label, a, b, odiff, args.repeat, case_words)


if __name__ == "__main__":
    main()
