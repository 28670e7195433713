"""``handler.locks``: a pair is never run twice at once, in one process or across processes.

Fault 7 is reproduced with the real CLI: two ``pairwatch watch --once`` processes on one folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from handler.locks import lock_name, pair_lock
from handler.storage import LocalStorage
from tests.support import scenes
from tests.support.logs import json_events

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def test_in_process_a_second_job_waits_for_the_first(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    storage = LocalStorage(tmp_path)
    order: list[str] = []

    def second() -> None:
        with pair_lock(LocalStorage(tmp_path), "p/result.json") as held:
            order.append(f"second held={held}")

    with pair_lock(storage, "p/result.json") as held:
        assert held
        assert (tmp_path / "p" / ".result.json.lock").exists()
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # same root, same pair: it waits
        with pair_lock(storage, "q.result.json") as other:
            assert other  # another pair is not held up
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second held=True"]
    assert sorted(os.listdir(tmp_path / "p")) == []  # lock files do not stay behind


def test_a_lock_held_by_another_process_makes_the_pair_busy(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    lock = tmp_path / "p" / ".result.json.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pair_lock(LocalStorage(tmp_path), "p/result.json") as held:
            assert not held
    finally:
        holder.kill()
        holder.wait()
    with pair_lock(LocalStorage(tmp_path), "p/result.json") as held:
        assert held
        with open(lock) as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lock_names_always_fit_and_are_hidden() -> None:
    assert lock_name("a/b/result.json") == "a/b/.result.json.lock"
    long_name = "x" * 240 + ".result.json"
    hashed = lock_name(f"a/{long_name}")
    assert hashed.startswith("a/.") and len(hashed.split("/")[1].encode()) <= 255


def test_two_watchers_on_one_folder_compare_each_pair_once(tmp_path: Path) -> None:
    photo = scenes.photo("astronaut").resize((96, 96))
    a, b = scenes.encode(photo), scenes.encode(photo, quality=60)
    pairs = 24
    for index in range(pairs):
        folder = tmp_path / f"p{index:02d}"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(a)
        (folder / "b.jpg").write_bytes(b)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")},
        "PAIRWATCH_LOG_FORMAT": "json",
        "PAIRWATCH_DIFF_IMAGE": "false",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "watch", str(tmp_path), "--once"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    started: list[str] = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=100)
        assert proc.returncode == 0, stderr[-3000:]
        events = json_events(stderr)
        started += [e["pair_id"] for e in events if e["event"] == "pair_started"]
    assert sorted(started) == [f"p{i:02d}" for i in range(pairs)]  # each compared once
    for index in range(pairs):
        result = json.loads((tmp_path / f"p{index:02d}" / "result.json").read_text())
        assert result["status"] == "ok"
    assert not list(tmp_path.rglob(".*.lock"))
