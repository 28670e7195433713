"""How many hops a pair takes through pairwatch's own modules: a folder drop to its
``result.json``, and an upload to its response (issue 21's "hops", before and after a move).

Runs the real command in this process (``pairwatch watch DIR`` or ``pairwatch serve``) under a
profile hook on every thread, drops one pair (or posts one upload), and records each call that
crosses from one project file into another. The comparison itself (``compare_pair`` and what it
calls) is one hop: what is counted is the way a pair travels, not the pixels' work.

    python -m tests.bench.hops folder
    python -m tests.bench.hops upload

Prints the distinct hops in the order they first happened (caller file -> callee
file:function), their count, the files touched and the distinct ways into each file.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROJECT = (str(ROOT / "handler") + os.sep, str(ROOT / "watcher") + os.sep)
#: Helpers every stage calls (logging, settings reads) would drown the path: not counted.
QUIET = ("handler/logs.py",)
#: The comparison's own work counts as the one hop into it.
LEAF = "compare_pair"


def _project_file(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if name.startswith(PROJECT):
        return os.path.relpath(name, ROOT)
    return None


class HopRecorder:
    """A profile hook: records each call entering a project file from another file (or from
    outside the project, e.g. a thread's start or a library's callback) while ``recording``."""

    def __init__(self) -> None:
        self.recording = False
        self.hops: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        del arg
        if event != "call" or not self.recording:
            return
        callee = _project_file(frame)
        if callee is None or callee.endswith(QUIET):
            return
        caller, outer = None, frame.f_back
        while outer is not None:
            if outer.f_code.co_name == LEAF:
                return  # inside the comparison: its work is not the pair's path
            caller = caller or _project_file(outer)
            outer = outer.f_back
        if caller != callee:
            with self.lock:
                self.hops.append((caller or "(outside)", f"{callee}:{frame.f_code.co_name}"))


def _write_pair(folder: Path) -> None:
    from PIL import Image  # the driver makes images; pairwatch's own code is what is traced

    folder.mkdir(parents=True)
    for name, shade in (("a.png", 200), ("b.png", 90)):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (shade, shade, shade)).save(buffer, "PNG")
        (folder / name).write_bytes(buffer.getvalue())


def _wait_for(path: Path, timeout: float) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _drive_folder(recorder: HopRecorder, inbox: Path) -> None:
    time.sleep(2.0)  # the watcher is up and its start-up scan done
    recorder.recording = True
    _write_pair(inbox / "p1")
    found = _wait_for(inbox / "p1" / "result.json", 60)
    time.sleep(0.5)  # the diff image and the bookkeeping after the result
    recorder.recording = False
    print("result.json written" if found else "NO RESULT within 60 s", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGTERM)


def _drive_upload(recorder: HopRecorder, port: int, folder: Path) -> None:
    import httpx

    base = f"http://127.0.0.1:{port}"
    until = time.monotonic() + 60
    while time.monotonic() < until:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    _write_pair(folder / "up")
    files = {
        side: (f"{side}.png", (folder / "up" / f"{side}.png").read_bytes(), "image/png")
        for side in ("a", "b")
    }
    recorder.recording = True
    answer = httpx.post(f"{base}/v1/compare", files=files, timeout=60)
    recorder.recording = False
    print(f"upload answered {answer.status_code}", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGTERM)


def _report(recorder: HopRecorder, verbose: bool) -> None:
    """A loop that polls (the runner's tick, one watchdog event per file) repeats the same hop:
    the path is the distinct hops, in the order they first happened."""
    path = list(dict.fromkeys(recorder.hops))
    for number, (caller, callee) in enumerate(recorder.hops if verbose else path, 1):
        print(f"{number:3d}  {caller} -> {callee}")
    entered = Counter(callee.split(":")[0] for _, callee in path)
    print(
        f"\n{len(path)} distinct hops ({len(recorder.hops)} calls across files) over "
        f"{len(entered)} files; distinct ways into each file:"
    )
    for name, times in entered.most_common():
        print(f"  {times:3d}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=("folder", "upload"))
    parser.add_argument("--verbose", action="store_true", help="every call, repeats included")
    args = parser.parse_args()
    from watcher.cli import main as cli_main

    recorder = HopRecorder()
    sys.setprofile(recorder)
    threading.setprofile(recorder)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if args.path == "folder":
            inbox = folder / "inbox"
            inbox.mkdir()
            driver = threading.Thread(target=_drive_folder, args=(recorder, inbox), daemon=True)
            argv = ["watch", str(inbox)]
        else:
            port = _free_port()
            driver = threading.Thread(
                target=_drive_upload, args=(recorder, port, folder), daemon=True
            )
            argv = ["serve", "--port", str(port)]
        driver.start()
        try:
            cli_main(argv)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    _report(recorder, args.verbose)


if __name__ == "__main__":
    main()
