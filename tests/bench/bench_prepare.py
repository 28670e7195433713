"""Benchmark: handler.images.prepare against the original service's "optimised" code.

Each measurement runs in a fresh process (so peak RSS is that path's own), on the same files,
in the same run. Prints times, peak RSS above the interpreter's baseline, and ratios.

    .venv/bin/python -m tests.bench.bench_prepare [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from tests.support import scenes

# The original service's code path, verbatim in spirit: convert first, then thumbnail, optimise.
BASELINE = """
from PIL import Image
img = Image.open(io.BytesIO(data))
if img.mode != "RGB":
    img = img.convert("RGB")
img.thumbnail((1024, 1024), Image.LANCZOS)
buf = io.BytesIO()
img.save(buf, "JPEG", quality=85, optimize=True)
"""
PAIRWATCH = """
from handler.images import prepare
prepare(data, (1024, 1024), 85)
"""
# Peak RSS from /proc (VmHWM, reset after the imports): getrusage's ru_maxrss survives fork+exec
# and would report the parent's high-water mark.
# The yardstick: OpenCV's shrink-on-load (libjpeg-turbo DCT scaling) + INTER_AREA, when installed
# (`pip install opencv-python-headless`; not a project dependency).
YARDSTICK = """
import cv2, numpy as np
from PIL import Image
width, height = Image.open(io.BytesIO(data)).size
factor = max(f for f in (1, 2, 4, 8) if width // f >= 1024 or height // f >= 1024)
flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
         8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
scale = 1024 / max(img.shape[:2])
img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                 interpolation=cv2.INTER_AREA)
cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
"""
RUNNER = """
import io, json, sys, time
import PIL.Image, numpy
import handler.images

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
data = open(sys.argv[1], "rb").read()
best = 1e9
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    exec(sys.argv[3])
    best = min(best, time.perf_counter() - start)
peak = status("VmHWM:")
print(json.dumps({"seconds": best, "peak_mb": (peak - base) / 1024}))
"""


def _make_inputs(folder: Path) -> dict[str, Path]:
    photo = scenes.photo("astronaut")
    rgb48 = photo.resize((8000, 6000), Image.Resampling.BICUBIC)
    paths = {
        "48MP RGB JPEG": folder / "rgb48.jpg",
        "48MP CMYK JPEG": folder / "cmyk48.jpg",
        "100MP RGB JPEG": folder / "rgb100.jpg",
    }
    rgb48.save(paths["48MP RGB JPEG"], quality=90)
    rgb48.convert("CMYK").save(paths["48MP CMYK JPEG"], quality=90)
    photo.resize((10000, 10000), Image.Resampling.BICUBIC).save(paths["100MP RGB JPEG"], quality=90)
    return paths


def _measure(path: Path, code: str, repeat: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), str(repeat), code],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def _has_opencv() -> bool:
    return importlib.util.find_spec("cv2") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = _make_inputs(Path(tmp))
        print(f"{'input':16} {'path':10} {'best s':>8} {'peak MB':>8}")
        for label, path in inputs.items():
            base = _measure(path, BASELINE, args.repeat)
            ours = _measure(path, PAIRWATCH, args.repeat)
            rows = [("baseline", base), ("pairwatch", ours)]
            fastest = _measure(path, YARDSTICK, args.repeat) if _has_opencv() else None
            if fastest:
                rows.append(("opencv", fastest))
            for name, row in rows:
                print(f"{label:16} {name:10} {row['seconds']:8.3f} {row['peak_mb']:8.1f}")
            speed = base["seconds"] / ours["seconds"]
            memory = ours["peak_mb"] / max(base["peak_mb"], 1e-6)
            line = f"{label:16} speed-up {speed:.2f}x, peak memory {memory:.2f}x of baseline"
            if fastest:
                line += f", {ours['seconds'] / fastest['seconds']:.2f}x the yardstick's time"
            print(line + "\n")


if __name__ == "__main__":
    main()
