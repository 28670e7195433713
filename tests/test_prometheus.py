"""The shared Prometheus metrics (``watcher.prometheus``) as a small component, and the watchers'
``--metrics-port`` endpoint on a real ``pairwatch watch DIR`` process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from handler import disposition
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.disposition import Disposition
from handler.errors import InvalidImage
from handler.result import ComparatorInfo, ComparisonResult, InputInfo, VLDetails, failure_result
from tests.support import scenes
from tests.support.s3_servers import ROOT, free_port, wait_for
from tests.support.sources import Offered
from watcher import prometheus
from watcher.runner import Runner
from watcher.shutdown import StopFlag


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _result(**update: object) -> ComparisonResult:
    base = ComparisonResult(
        pair_id="p",
        status="ok",
        similarity=0.5,
        is_similar=False,
        comparator=ComparatorInfo(name="vl", model="m", device="cuda:0"),
        inputs=[InputInfo(name="a.jpg"), InputInfo(name="b.jpg")],
        config=ComparisonConfig(),
        timings_ms={"prepare": 20.0, "compare": 300.0, "total": 330.0},
        vl=VLDetails(visual_tokens=1998, peak_memory_mb=512.0),
    )
    return base.model_copy(update=update)


def test_record_result_counts_stages_errors_and_vl_numbers() -> None:
    ok = {"source": "sqs", "comparator": "vl", "status": "ok"}
    before = {
        "pairs": _value("pairwatch_pairs_total", **ok),
        "compare": _value("pairwatch_stage_seconds_sum", stage="compare"),
        "write": _value("pairwatch_stage_seconds_count", stage="write"),
        "tokens": _value("pairwatch_vl_visual_tokens_sum"),
        "memory": _value("pairwatch_vl_peak_memory_bytes_sum"),
        "errors": _value("pairwatch_pair_errors_total", type="invalid_image"),
    }
    prometheus.record_result(_result(), "sqs", stages={"write": 0.01})
    assert _value("pairwatch_pairs_total", **ok) == before["pairs"] + 1
    assert _value("pairwatch_stage_seconds_sum", stage="compare") == pytest.approx(
        before["compare"] + 0.3
    )
    assert _value("pairwatch_stage_seconds_count", stage="write") == before["write"] + 1
    assert _value("pairwatch_vl_visual_tokens_sum") == before["tokens"] + 1998
    assert _value("pairwatch_vl_peak_memory_bytes_sum") == before["memory"] + 512 * 2**20

    failed = failure_result(
        "p",
        InvalidImage("truncated"),
        [InputInfo(name="a"), InputInfo(name="b")],
        ComparisonConfig(),
        ComparatorInfo(name="metrics"),
    )
    prometheus.record_result(failed, "folder")
    assert _value("pairwatch_pair_errors_total", type="invalid_image") == before["errors"] + 1


def test_watch_metrics_port_serves_the_same_names(tmp_path: Path) -> None:
    """``pairwatch watch DIR --metrics-port PORT``: a real watcher, a real pair, a scrape."""
    port = free_port()
    img = scenes.photo("rocket")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAIRWATCH_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "watch", str(tmp_path), "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape() -> str | None:
            try:
                return httpx.get(url, timeout=1).text
            except httpx.HTTPError:
                return None

        assert "pairwatch_pairs_total" in wait_for(scrape, 30, 0.1, "the metrics endpoint")
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "a.jpg").write_bytes(scenes.encode(img))
        (tmp_path / "p" / "b.jpg").write_bytes(scenes.pasted_object(img))
        wanted = 'pairwatch_pairs_total{comparator="metrics",source="folder",status="ok"} 1.0'
        text = wait_for(lambda: (t := scrape()) and wanted in t and t, 30, 0.2, wanted)
        for stage in ("fetch", "prepare", "compare", "write"):  # fetch and write: the job's
            assert f'pairwatch_stage_seconds_count{{stage="{stage}"}} 1.0' in text, stage
        # The runner moves the gauges (see the in-process test) and puts them back once idle.
        idle = "\npairwatch_in_flight 0.0"
        text = wait_for(lambda: (t := scrape()) and idle in t and t, 10, 0.1, "no work running")
        assert "\npairwatch_queue_depth 0.0" in text
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_a_runner_moves_queue_depth_and_in_flight() -> None:
    """Every watcher's runner keeps ``pairwatch_queue_depth`` (keys waiting, including one
    offered again while it runs) and ``pairwatch_in_flight`` (work running) up to date."""
    depth, running = _value("pairwatch_queue_depth"), _value("pairwatch_in_flight")
    release = threading.Event()

    def work(_: float) -> Disposition:
        release.wait(20)
        return disposition.done()

    runner: Runner[str] = Runner(MetricsComparator(), concurrency=2, queue_size=10)
    for key in "abcde":
        runner.offer(key, work, recheck=False)
    assert _value("pairwatch_queue_depth") == depth + 5
    thread = threading.Thread(target=runner.run, args=(StopFlag(), Offered()))
    thread.start()
    try:
        wait_for(lambda: _value("pairwatch_in_flight") == running + 2, 10, 0.01, "2 running")
        assert _value("pairwatch_queue_depth") == depth + 3
        runner.offer("a", work, recheck=False)  # in flight: runs again after, so it waits
        assert _value("pairwatch_queue_depth") == depth + 4
    finally:
        release.set()
        thread.join(20)
    assert not thread.is_alive()
    assert _value("pairwatch_queue_depth") == depth and _value("pairwatch_in_flight") == running
