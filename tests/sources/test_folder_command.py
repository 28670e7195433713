"""``pairwatch watch DIR`` end to end: the real CLI in a subprocess, real files, real signals."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handler.result import ComparisonResult
from tests.support.logs import json_event, json_events
from watcher.args import positive_seconds, seconds
from watcher.cli import build_parser, main, settings_from_args

pytestmark = pytest.mark.timeout(90)

PAIRWATCH = [sys.executable, "-m", "watcher.cli"]
REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
    return {**env, "PAIRWATCH_LOG_FORMAT": "json", "PAIRWATCH_SETTLE_TIME": "0.2", **extra}


def _pair(folder: Path, a: bytes, b: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(a)
    (folder / "b.jpg").write_bytes(b)


def _age(folder: Path) -> None:
    """Make files look written a minute ago, so a run does not wait for them to settle."""
    past = time.time() - 60
    for path in folder.rglob("*"):
        os.utime(path, (past, past))


def test_once_processes_everything_and_exits_0(tmp_path: Path, photos: dict[str, bytes]) -> None:
    _pair(tmp_path / "same", photos["a"], photos["a_copy"])
    _pair(tmp_path / "nested" / "different", photos["a"], photos["other"])
    _age(tmp_path)
    proc = subprocess.run(
        [*PAIRWATCH, "watch", str(tmp_path), "--once"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    same = ComparisonResult.model_validate_json((tmp_path / "same" / "result.json").read_text())
    different = ComparisonResult.model_validate_json(
        (tmp_path / "nested" / "different" / "result.json").read_text()
    )
    assert same.is_similar and different.is_similar is False
    assert different.pair_id == "nested/different"
    events = json_events(proc.stderr)
    for name in ("pair_detected", "pair_started", "image_prepared", "pair_compared"):
        assert {e["pair_id"] for e in events if e["event"] == name} == {"same", "nested/different"}
    written = [e for e in events if e["event"] == "result_written"]
    assert len(written) == 2 and all(e["duration_ms"] > 0 for e in written)
    assert proc.stdout == ""

    # Run again: nothing to do, and still exit 0.
    again = subprocess.run(
        [*PAIRWATCH, "watch", str(tmp_path), "--once"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert again.returncode == 0
    assert not [e for e in json_events(again.stderr) if e["event"] == "pair_started"]


def test_once_exits_1_when_a_pair_failed(tmp_path: Path, photos: dict[str, bytes]) -> None:
    _pair(tmp_path / "good", photos["a"], photos["a_copy"])
    _pair(tmp_path / "broken", photos["a"], photos["a"][:300])
    _age(tmp_path)
    proc = subprocess.run(
        [*PAIRWATCH, "watch", str(tmp_path), "--once", "--pair-timeout", "30"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    broken = ComparisonResult.model_validate_json((tmp_path / "broken" / "result.json").read_text())
    assert broken.error is not None and broken.error.type == "invalid_image"
    assert ComparisonResult.model_validate_json(
        (tmp_path / "good/result.json").read_text()
    ).is_similar
    failed = [e for e in json_events(proc.stderr) if e["event"] == "pair_failed"]
    assert failed and failed[0]["pair_id"] == "broken" and "duration_ms" in failed[0]


def test_bundled_examples(tmp_path: Path) -> None:
    """The README's first command, on a copy of examples/ (the checkout stays clean)."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples", examples, ignore=shutil.ignore_patterns("*result.json"))
    _age(examples)
    proc = subprocess.run(
        [*PAIRWATCH, "watch", str(examples), "--once"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    results = sorted(p.relative_to(examples).as_posix() for p in examples.rglob("*result.json"))
    assert results == [
        "astronaut-reencoded/result.json",
        "camera/mirrored.result.json",
        "coffee-edited/result.json",
    ]
    similar = {
        path: ComparisonResult.model_validate_json((examples / path).read_text()).is_similar
        for path in results
    }
    assert similar == {
        "astronaut-reencoded/result.json": True,
        "camera/mirrored.result.json": False,
        "coffee-edited/result.json": False,
    }


@pytest.mark.usefixtures("no_pairwatch_env")
def test_not_a_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--settle-time", "-0.5", "is negative"),
        ("--settle-time", "nan", "not a finite number"),
        ("--pair-timeout", "inf", "not a finite number"),
        ("--pair-timeout", "0", "above 0"),
        ("--pair-timeout", "soon", "not a number"),
    ],
)
def test_bad_durations_are_usage_errors(
    tmp_path: Path, option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse refuses them (exit 2) before anything starts; nan would pass any bound check."""
    with pytest.raises(SystemExit) as exit_:
        main(["watch", str(tmp_path), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err


def test_flags_and_environment_are_validated_as_one_set_of_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag whose dest is a settings field overrides it; an invalid value from any source is
    a usage error naming the field (exit 2), before a comparator is built."""
    args = build_parser().parse_args(
        ["watch", str(tmp_path), "--concurrency", "3", "--pair-timeout", "9"]
    )
    monkeypatch.setenv("PAIRWATCH_PAIR_TIMEOUT", "1")
    monkeypatch.setenv("PAIRWATCH_SETTLE_TIME", "2")
    settings = settings_from_args(args)
    assert (settings.concurrency, settings.pair_timeout, settings.settle_time) == (3, 9, 2)
    monkeypatch.setenv("PAIRWATCH_CONCURRENCY", "0")
    assert main(["watch", str(tmp_path)]) == 2
    assert "concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["watch", str(tmp_path), "--concurrency", "0"])
    assert exit_.value.code == 2


def test_building_the_parser_imports_no_implementation() -> None:
    """``pairwatch schema`` and ``--help`` pay for argparse, not for boto3, minio or watchdog."""
    probe = (
        "import sys; from watcher.cli import build_parser; build_parser(); "
        "heavy = {'boto3', 'botocore', 'minio', 'watchdog', 'jinja2', 'PIL', "
        "'watcher.sources.sqs', 'watcher.sources.folder', 'watcher.report', 'handler.jobs'} "
        "& set(sys.modules); "
        "print(sorted(heavy))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert proc.stdout.strip() == "[]", proc.stderr


def test_duration_types() -> None:
    assert seconds("0") == 0.0 and seconds("1.5") == 1.5
    assert positive_seconds("0.25") == 0.25


class _Running:
    """A watcher subprocess whose JSON log lines are read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*PAIRWATCH, "watch", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=_env(),
        )
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if (event := json_event(line)) is not None:
                self._lines.put(event)
        self._lines.put(None)

    def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"the watcher exited before logging {name}")
            self.events.append(event)
            if event["event"] == name:
                return event

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        while (event := self._lines.get_nowait() if not self._lines.empty() else None) is not None:
            self.events.append(event)
        return code


@pytest.fixture
def running() -> Iterator[list[_Running]]:
    started: list[_Running] = []
    yield started
    for watcher in started:
        if watcher.proc.poll() is None:
            watcher.proc.kill()
            watcher.proc.wait()


@pytest.fixture(scope="module")
def slow_pngs() -> tuple[bytes, bytes]:
    """A 36-megapixel PNG, twice (two zlib levels: the same pixels, other bytes, so the pair is
    decoded and compared): about half a second each to decode, long enough to signal mid-pair."""
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    pixels = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5).astype(np.uint8)
    image = Image.fromarray(pixels.repeat(3, axis=2))
    encoded = []
    for level in (1, 2):
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=level)
        encoded.append(buffer.getvalue())
    return encoded[0], encoded[1]


def test_sigterm_mid_pair_finishes_it_and_exits_0(
    tmp_path: Path, running: list[_Running], slow_pngs: tuple[bytes, bytes]
) -> None:
    watcher = _Running(str(tmp_path), "--concurrency", "1")  # one pair in hand
    running.append(watcher)
    watcher.wait_event("watch_started")
    for name in ("p1", "p2", "p3"):
        (tmp_path / f".{name}").mkdir()
        (tmp_path / f".{name}" / "a.png").write_bytes(slow_pngs[0])
        (tmp_path / f".{name}" / "b.png").write_bytes(slow_pngs[1])
    for name in ("p1", "p2", "p3"):  # the three pairs land at once
        (tmp_path / f".{name}").rename(tmp_path / name)
    first = watcher.wait_event("pair_started")
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.finish() == 0
    events = watcher.events
    names = [e["event"] for e in events]
    done = [e["pair_id"] for e in events if e["event"] == "result_written"]
    assert done == [first["pair_id"]], "the pair in hand is finished, no new one is started"
    result = tmp_path / first["pair_id"] / "result.json"
    assert ComparisonResult.model_validate_json(result.read_text()).status == "ok"
    assert names[-1] == "watch_stopped" and events[-1]["reason"] == "signal SIGTERM"
    assert sum(1 for p in tmp_path.rglob("result.json")) == 1
    assert not list(tmp_path.rglob(".*.tmp")), "no temporary files are left behind"


def test_sigint_when_idle_exits_0(tmp_path: Path, running: list[_Running]) -> None:
    watcher = _Running(str(tmp_path), "--polling")
    running.append(watcher)
    watcher.wait_event("watch_started")
    watcher.proc.send_signal(signal.SIGINT)
    assert watcher.finish(timeout=10) == 0
    assert watcher.events[-1]["event"] == "watch_stopped"


def test_drop_a_pair_into_a_running_watcher(
    tmp_path: Path, running: list[_Running], photos: dict[str, bytes]
) -> None:
    watcher = _Running(str(tmp_path))
    running.append(watcher)
    watcher.wait_event("watch_started")
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    _pair(staging / "dropped", photos["a"], photos["other"])
    shutil.move(staging / "dropped", tmp_path / "dropped")
    written = watcher.wait_event("result_written")
    assert written["pair_id"] == "dropped" and written["status"] == "ok"
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.finish() == 0


def test_progress_bar_when_stderr_is_a_terminal(tmp_path: Path, photos: dict[str, bytes]) -> None:
    for name in ("p1", "p2", "p3"):
        _pair(tmp_path / name, photos["a"], photos["a_copy"])
    _age(tmp_path)
    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0x0; give it a size as a terminal window would.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [*PAIRWATCH, "watch", str(tmp_path), "--once"],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env={**_env(), "PAIRWATCH_LOG_FORMAT": "auto"},
    )
    os.close(follower)
    output = b""
    while True:  # keep reading, or the terminal's buffer fills and blocks the writer
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(30) == 0
    text = output.decode(errors="replace")
    assert "3/3" in text and "pair" in text
    assert "result_written" in text  # console log lines, printed above the bar
