"""Benchmark: a folder of everyday screenshot pairs, pairwatch against reg-cli, side by side.

Two workloads of 100 pairs of 1280 x 800 PNG screenshots rendered here (a header, a sidebar,
buttons, lines of text), 20 of them with one line of text changed in B:

* ``identical``: the 80 unchanged pairs are byte-identical (a typical CI run);
* ``reencoded``: every B is re-encoded (same pixels, other bytes: another zlib level and a text
  chunk), so no pair is byte-identical.

The yardstick is reg-cli (npm ``reg-cli``, the folder-comparison tool of the reg-suit family,
installed into a temporary folder: not a dependency), run as ``reg-cli ACTUAL EXPECTED DIFF -J
out.json -M 0``. pairwatch runs as ``pairwatch watch DIR --once`` with default settings (diff
images on), on a fresh copy of the same pairs each time. Both are timed as whole processes
(start-up included) with their peak RSS (GNU time's %M), alternately, ``--repeat`` times;
medians are printed with the ratio reg-cli time / pairwatch time (>= 1.0: pairwatch is at
least as fast). Every run's verdicts are checked against reg-cli's (``failedItems`` =
``is_similar: false``), and the per-pair cost of byte-identical pairs is read from the results
(``timings_ms.total``) and the ``result_written`` log lines (the whole job, writes included).

With ``--memory`` it then measures what the decode budget does to memory: the re-encoded
workload at ``--concurrency 8`` under several ``decode_budget_mp`` values, beside the default
concurrency, peak RSS and wall time of each (median of ``--repeat``).

    .venv/bin/python -m tests.bench.bench_folder [--repeat 3] [--reg-cli PATH] [--pairs 100]
                                                 [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, PngImagePlugin

from tests.bench.bench_detect import Run, npm_install, timed
from tests.support import screens

REG_CLI_VERSION = "0.18.16"
SIZE = (1280, 800)
CHANGED_EVERY = 5  # one pair in five has a changed line: 20 of 100
TEXT_LINES = 24


@dataclass
class Workload:
    name: str
    root: Path
    changed: set[str]
    #: Pair names whose A and B are byte-identical.
    identical: set[str]
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"reg-cli": [], "pairwatch": []})
    identical_ms: list[float] = field(default_factory=list)
    identical_job_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)


def install_reg_cli(folder: Path) -> Path:
    return npm_install(folder, f"reg-cli@{REG_CLI_VERSION}", "reg-cli")


def screenshot(seed: int, changed: bool) -> Image.Image:
    """An application screen: a title bar, a menu, buttons and TEXT_LINES lines of text. With
    ``changed``, one line of the text (chosen by ``seed``) says something else."""
    rng = random.Random(seed)
    image = Image.new("RGB", SIZE, (250, 250, 252))
    draw = ImageDraw.Draw(image)
    hue = rng.choice([(40, 80, 160), (30, 120, 90), (120, 50, 130), (170, 90, 30)])
    draw.rectangle((0, 0, SIZE[0], 56), fill=hue)
    draw.text((24, 14), f"Project {seed:03d} - Dashboard", fill="white", font=screens.font(24))
    draw.rectangle((0, 56, 220, SIZE[1]), fill=(236, 238, 242))
    for row, item in enumerate(("Overview", "Reports", "Settings", "Members", "Billing")):
        draw.text((28, 84 + 40 * row), item, fill=(50, 50, 60), font=screens.font(18))
    for column in range(3):
        x = 260 + 160 * column
        draw.rounded_rectangle((x, 80, x + 140, 120), radius=8, fill=hue)
        draw.text((x + 22, 90), rng.choice(["Save", "Export", "Share", "Filter"]), fill="white")
    face = screens.font(16)
    changed_line = rng.randrange(TEXT_LINES)
    for line in range(TEXT_LINES):
        words = [rng.choice(screens.WORDS) for _ in range(rng.randrange(6, 14))]
        if changed and line == changed_line:
            words = ["updated", "figures", *words[2:]]
            words[-1] = "zephyr"
        draw.text((260, 150 + 26 * line), " ".join(words), fill=(25, 25, 30), font=face)
    return image


def png(image: Image.Image, *, reencode: bool = False) -> bytes:
    """PNG bytes; ``reencode``: the same pixels, other bytes (zlib level 1 and a text chunk)."""
    if not reencode:
        return screens.png(image)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "re-encoded for bench_folder")
    return screens.png(image, compress_level=1, pnginfo=info)


def build(base: Path, count: int) -> list[Workload]:
    """Both workloads' reg-cli folders (expected = A, actual = B); pairwatch copies come later."""
    workloads = [
        Workload("identical", base / "identical", set(), set()),
        Workload("reencoded", base / "reencoded", set(), set()),
    ]
    for workload in workloads:
        for side in ("expected", "actual"):
            (workload.root / side).mkdir(parents=True)
    for index in range(count):
        name = f"{index:03d}"
        changed = index % CHANGED_EVERY == CHANGED_EVERY - 1
        a_image = screenshot(index, changed=False)
        a = png(a_image)
        b_image = screenshot(index, changed=True) if changed else a_image
        for workload in workloads:
            reencode = workload.name == "reencoded"
            b = png(b_image, reencode=reencode) if changed or reencode else a
            assert (a == b) == (not changed and not reencode)
            (workload.root / "expected" / f"{name}.png").write_bytes(a)
            (workload.root / "actual" / f"{name}.png").write_bytes(b)
            if changed:
                workload.changed.add(name)
            elif not reencode:
                workload.identical.add(name)
    return workloads


def pair_folder(workload: Workload, into: Path) -> Path:
    """A fresh ``pairwatch watch`` folder: NAME/a.png (expected) and NAME/b.png (actual)."""
    if into.exists():
        shutil.rmtree(into)
    for source in sorted((workload.root / "expected").iterdir()):
        folder = into / source.stem
        folder.mkdir(parents=True)
        shutil.copyfile(source, folder / "a.png")
        shutil.copyfile(workload.root / "actual" / source.name, folder / "b.png")
    return into


def run_reg_cli(reg_cli: Path, workload: Workload) -> set[str]:
    """Times one reg-cli run; the names it reports as failed."""
    diff = workload.root / "diff"
    report = workload.root / "out.json"
    shutil.rmtree(diff, ignore_errors=True)
    report.unlink(missing_ok=True)
    expected, actual = workload.root / "expected", workload.root / "actual"
    run = timed([str(reg_cli), str(actual), str(expected), str(diff), "-J", str(report), "-M", "0"])
    workload.runs["reg-cli"].append(run)
    data = json.loads(report.read_text())
    passed = {Path(item).stem for item in data["passedItems"]}
    failed = {Path(item).stem for item in data["failedItems"]}
    assert len(passed) + len(failed) == len(list(expected.iterdir())), data
    return failed


def watch_once(folder: Path, **settings: str) -> Run:
    """``pairwatch watch FOLDER --once`` with ``PAIRWATCH_*`` ``settings``, timed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
    env["PAIRWATCH_LOG_FORMAT"] = "json"
    env.update({f"PAIRWATCH_{name.upper()}": value for name, value in settings.items()})
    # Files settled long ago (the watcher would otherwise wait settle_time for fresh ones).
    old = time.time() - 60
    for path in folder.rglob("*.png"):
        os.utime(path, (old, old))
    pairwatch = Path(sys.executable).with_name("pairwatch")  # the installed command
    return timed([str(pairwatch), "watch", str(folder), "--once"], env)


def run_pairwatch(workload: Workload, folder: Path) -> set[str]:
    """Times one ``pairwatch watch --once``; the pairs it found different."""
    run = watch_once(folder)
    workload.runs["pairwatch"].append(run)
    different = set()
    for pair in sorted(p for p in folder.iterdir() if p.is_dir()):
        result = json.loads((pair / "result.json").read_text())
        assert result["status"] == "ok", result
        assert (pair / "diff.png").exists(), pair
        if not result["is_similar"]:
            different.add(pair.name)
        timings = result["timings_ms"]
        if pair.name in workload.identical:
            workload.identical_ms.append(timings["total"])
            assert result["metrics"]["pixel_identical"] == 1.0, result
        else:
            for stage, value in timings.items():
                workload.stages.setdefault(stage, []).append(value)
    for event in _events(run.stderr):
        if event["event"] == "result_written" and event["pair_id"] in workload.identical:
            workload.identical_job_ms.append(event["duration_ms"])
    return different


def _events(stderr: str) -> Iterator[dict[str, Any]]:
    for line in stderr.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


def report(workload: Workload, pairs: int) -> None:
    reg = workload.runs["reg-cli"]
    pw = workload.runs["pairwatch"]
    reg_s = statistics.median(r.seconds for r in reg)
    pw_s = statistics.median(r.seconds for r in pw)
    print(f"\n{workload.name}: {pairs} pairs, {len(workload.changed)} changed, "
          f"{len(workload.identical)} byte-identical; medians of {len(reg)} runs")  # fmt: skip
    for label, runs, seconds in (("reg-cli", reg, reg_s), ("pairwatch", pw, pw_s)):
        all_s = ", ".join(f"{r.seconds:.2f}" for r in runs)
        rss = statistics.median(r.rss_mb for r in runs)
        print(f"  {label:10s} {seconds:6.2f} s  {pairs / seconds:6.1f} pairs/s  "
              f"{rss:5.0f} MB peak RSS   (runs: {all_s} s)")  # fmt: skip
    ratios = [r.seconds / p.seconds for r, p in zip(reg, pw, strict=True)]
    print(f"  ratio reg-cli / pairwatch time: {reg_s / pw_s:.2f}x of the medians; per round "
          f"{', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f}x "
          f"(>= 1.0: pairwatch as fast)")  # fmt: skip
    if workload.identical_ms:
        ms = sorted(workload.identical_ms)
        job = sorted(workload.identical_job_ms)
        print(f"  byte-identical pairs: timings_ms.total median {statistics.median(ms):.2f} ms, "
              f"max {ms[-1]:.2f} ms; whole job (result_written duration_ms) median "
              f"{statistics.median(job):.2f} ms, max {job[-1]:.2f} ms")  # fmt: skip
    medians = {k: round(statistics.median(v), 1) for k, v in sorted(workload.stages.items())}
    print(f"  other pairs, timings_ms medians: {medians}")


def memory(workload: Workload, base: Path, repeat: int) -> None:
    """Peak RSS under the decode budget: concurrency 8 at several budgets, and the default."""
    print(f"\nmemory, {workload.name} workload: peak RSS (and wall time), medians of {repeat}")
    cases: list[tuple[str, dict[str, str]]] = [("default concurrency, budget 24 MP", {})]
    for budget in ("4", "8", "24"):
        settings = {"concurrency": "8", "decode_budget_mp": budget}
        cases.append((f"concurrency 8, budget {budget} MP", settings))
    for label, settings in cases:
        runs = []
        for _ in range(repeat):
            runs.append(watch_once(pair_folder(workload, base / "memory"), **settings))
        rss = statistics.median(r.rss_mb for r in runs)
        seconds = statistics.median(r.seconds for r in runs)
        print(f"  {label:36s} {rss:5.0f} MB   {seconds:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--reg-cli", type=Path, help="a reg-cli executable (default: npm)")
    parser.add_argument("--only", choices=("identical", "reencoded"))
    parser.add_argument("--memory", action="store_true", help="also the decode budget's memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        base = Path(tmp)
        reg_cli = args.reg_cli or install_reg_cli(base)
        start = time.perf_counter()
        workloads = build(base, args.pairs)
        if args.only:
            workloads = [w for w in workloads if w.name == args.only]
        print(f"{args.pairs} pairs of {SIZE[0]}x{SIZE[1]} PNG rendered in "
              f"{time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs; "
              f"reg-cli {REG_CLI_VERSION}")  # fmt: skip
        for round_ in range(args.repeat):
            for workload in workloads:
                folder = pair_folder(workload, base / "pairwatch" / workload.name)
                # Alternate which goes first, so neither always meets a warmer page cache.
                order = ("reg", "pw") if round_ % 2 == 0 else ("pw", "reg")
                verdicts = {}
                for tool in order:
                    if tool == "reg":
                        verdicts[tool] = run_reg_cli(reg_cli, workload)
                    else:
                        verdicts[tool] = run_pairwatch(workload, folder)
                agree = verdicts["reg"] == verdicts["pw"] == workload.changed
                print(f"  round {round_ + 1} {workload.name}: reg-cli "
                      f"{workload.runs['reg-cli'][-1].seconds:.2f} s, pairwatch "
                      f"{workload.runs['pairwatch'][-1].seconds:.2f} s, verdicts "
                      f"{'identical' if agree else 'DIFFER'}", flush=True)  # fmt: skip
                if not agree:
                    print(f"    reg-cli failed {sorted(verdicts['reg'])}\n"
                          f"    pairwatch different {sorted(verdicts['pw'])}")  # fmt: skip
        for workload in workloads:
            report(workload, args.pairs)
        if args.memory:
            reencoded = [w for w in workloads if w.name == "reencoded"]
            memory(reencoded[0] if reencoded else workloads[0], base, args.repeat)


if __name__ == "__main__":
    main()
