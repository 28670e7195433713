"""One deadline per pair (``processing_timeout``): the ``Deadline`` itself on a hand-moved clock,
then a real pair stopped in each stage: fetch (a slow S3 endpoint on loopback), prepare (a
libvips shrink killed), detect (waiting for room in the decode budget, a 196 MP pair), compare
(between metrics), and the runner starting the deadline when a worker takes the pair, not when
it was offered. (The VL model's share: tests/compare/vl/test_comparator.py.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import structlog
from PIL import Image

from handler.aws_clients import s3_client
from handler.bucket_jobs import BucketJobs
from handler.budget import DEFAULT_DECODE_BUDGET_MP, process_budget
from handler.compare.base import Verdict
from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig, Settings
from handler.crops import RegionCrop
from handler.deadline import Deadline, current, current_or_new
from handler.detect import Detection
from handler.disposition import Disposition, done
from handler.errors import ComparisonTimeout, PairError
from handler.events import ObjectEvent
from handler.images import PreparedImage, prepare
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from handler.vips import kill_when, pyvips
from tests.support import scenes
from tests.support.clock import Clock
from tests.support.s3_servers import aws_env, client, moto_server, unique
from tests.support.slow_proxy import slow_proxy
from tests.support.watch_run import age, watch_once
from watcher.runner import Runner
from watcher.shutdown import StopFlag

HUGE = 14_000  # 196 megapixels a side squared, as in the issue
MAX_PIXELS = 200_000_000


def test_deadline_counts_from_its_start_and_names_the_stage(clock: Clock) -> None:
    deadline = Deadline(2.0, clock=clock)
    deadline.enter("prepare")
    clock.now += 1.5
    assert deadline.remaining() == pytest.approx(0.5) and not deadline.expired()
    deadline.enter("detect")
    clock.now += 0.25
    assert deadline.stage_ms() == pytest.approx(250.0)
    clock.now += 0.25
    with pytest.raises(ComparisonTimeout, match="stopped during detect") as raised:
        deadline.check()
    assert raised.value.details == {"stage": "detect"} and raised.value.status == "timeout"
    with pytest.raises(ComparisonTimeout, match="stopped during compare"):
        deadline.enter("compare")


def test_a_pair_may_ask_for_less_time_never_for_more(clock: Clock) -> None:
    deadline = Deadline(10.0, clock=clock)
    clock.now += 1.0
    assert deadline.capped(60.0) is deadline
    shorter = deadline.capped(3.0)
    assert shorter.remaining() == pytest.approx(2.0)  # from the same start
    assert deadline.renewed().remaining() == pytest.approx(10.0)  # the next pair: from now
    clock.now += 8.5
    grace = deadline.extended(5.0)
    assert grace.remaining() == pytest.approx(5.0) and deadline.remaining() == pytest.approx(0.5)


class _Gone(PairError):
    """What a pair nobody waits for any more stops with (serve's: its client went away)."""

    type = "client_disconnected"


def test_an_abandoned_pair_stops_at_its_next_check_whichever_deadline_it_holds(
    clock: Clock,
) -> None:
    deadline = Deadline(10.0, clock=clock)
    shorter, grace = deadline.capped(5.0), deadline.extended(20.0)
    deadline.check()
    deadline.abandon(_Gone("the client disconnected"))
    deadline.abandon(_Gone("a second word changes nothing"))
    for held in (deadline, shorter, grace):
        with pytest.raises(_Gone, match="the client disconnected"):
            held.check()
        with pytest.raises(_Gone):
            held.enter("compare")
    assert deadline.remaining() == 10.0  # time is not what stopped it
    assert not deadline.renewed()._abandoned  # the next pair of a unit of work is another


def test_a_pair_abandoned_while_it_detects_stops_at_the_next_strip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Abandoned from another thread once detection has started: the next strip's check
    stops it there, before its images are prepared or compared."""
    import handler.pipeline as pipeline

    photo = scenes.photo("astronaut").resize((2000, 2000))
    a, b = scenes.encode(photo), scenes.pasted_object(photo)
    deadline = Deadline(60)
    real_detect = pipeline.detect

    def detect_abandoned(*args: object, **kwargs: object) -> Detection:
        threading.Thread(target=deadline.abandon, args=(_Gone("the client left"),)).start()
        time.sleep(0.05)
        return real_detect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "detect", detect_abandoned)
    with structlog.testing.capture_logs() as logs:
        outcome = compare_pair(
            "gone", _input("a.jpg", a), _input("b.jpg", b), ComparisonConfig(),
            MetricsComparator(), max_input_pixels=MAX_PIXELS, deadline=deadline,
        )  # fmt: skip
    result = outcome.result
    assert result.status == "error" and result.error is not None
    assert (result.error.type, result.error.stage) == ("client_disconnected", None)
    assert not [e for e in logs if e["event"] in ("image_prepared", "changes_detected")]
    (failed,) = [e for e in logs if e["event"] == "pair_failed"]
    assert failed["error_type"] == "client_disconnected"
    assert process_budget(DEFAULT_DECODE_BUDGET_MP).in_use == 0


def test_the_current_deadline_is_the_applied_one(clock: Clock) -> None:
    deadline = Deadline(1.0, clock=clock)
    assert current() is None and current_or_new(7.0).seconds == 7.0
    with deadline.applied():
        assert current() is deadline and current_or_new(7.0) is deadline
    assert current() is None


def _input(name: str, data: bytes) -> ImageInput:
    return ImageInput(name, lambda: data)


def test_a_196_megapixel_pair_under_a_1_s_deadline_stops_in_detection(
    huge_pair: tuple[bytes, bytes],
) -> None:
    """The issue's pair: 84 s of detection with processing_timeout 1 came back ``ok``."""
    started = time.monotonic()
    outcome = compare_pair(
        "huge",
        _input("a.png", huge_pair[0]),
        _input("b.png", huge_pair[1]),
        ComparisonConfig(processing_timeout=1),
        MetricsComparator(),
        max_input_pixels=MAX_PIXELS,
        diff_image=True,
    )
    took = time.monotonic() - started
    result = outcome.result
    assert result.status == "timeout" and result.error is not None, result.error
    assert (result.error.type, result.error.stage) == ("timeout", "detect")
    assert "processing_timeout (1 s)" in result.error.message
    assert took < 2.5, f"stopped {took:.2f} s after it started"
    # The timings so far: the inputs' headers were read, detection ran until it was stopped.
    assert result.timings_ms["detect"] > 0 and "prepare" in result.timings_ms
    assert result.inputs[0].original_size == (HUGE, HUGE)
    assert outcome.diff_png is None
    # The decode budget is given back at once: the next pair (other bytes: it decodes) is
    # compared.
    photo = scenes.photo("rocket")
    nxt = compare_pair(
        "next", _input("a.jpg", scenes.encode(photo)),
        _input("b.jpg", scenes.encode(photo, quality=80)), ComparisonConfig(),
        MetricsComparator(), max_input_pixels=MAX_PIXELS,
    )  # fmt: skip
    assert nxt.result.status == "ok"
    assert process_budget(DEFAULT_DECODE_BUDGET_MP).in_use == 0


def test_waiting_for_room_to_decode_counts_against_the_deadline() -> None:
    """Other pairs hold the whole decode budget: this one times out in ``detect`` while it
    waits for room, and its message says what it waited for."""
    photo = scenes.photo("coffee")
    a, b = scenes.encode(photo), scenes.encode(photo, quality=80)
    budget = process_budget(DEFAULT_DECODE_BUDGET_MP)
    with budget.held(budget.total):
        started = time.monotonic()
        outcome = compare_pair(
            "waiting", _input("a.jpg", a), _input("b.jpg", b),
            ComparisonConfig(processing_timeout=0.5), MetricsComparator(),
            max_input_pixels=MAX_PIXELS,
        )  # fmt: skip
        took = time.monotonic() - started
    result = outcome.result
    assert result.status == "timeout" and result.error is not None
    assert result.error.stage == "detect" and "processing_timeout (0.5 s)" in result.error.message
    assert (
        "no room to decode" in result.error.message and "decode_budget_mp" in result.error.message
    )
    assert result.timings_ms["detect"] >= 400  # the wait counts, in its stage
    assert 0.45 < took < 1.5


def test_a_libvips_shrink_is_killed_once_the_deadline_passes(
    huge_pair: tuple[bytes, bytes],
) -> None:
    """Work that libvips evaluates itself (no Python between its strips) stops from its own
    ``eval`` callback: the issue's shrink of a large input, and a long blur."""
    with pytest.raises(ComparisonTimeout):
        prepare(huge_pair[0], (1024, 1024), 85, max_pixels=MAX_PIXELS, expired=lambda: True)
    # Expired from libvips' second progress report on, so the kill does not race the blur's
    # own speed on a quiet or a busy machine (a wall-clock kill at 0.3 s lost to a 0.28 s blur).
    blurred = pyvips.Image.black(12000, 12000).gaussblur(60)
    reports: list[int] = []

    def expired() -> bool:
        reports.append(1)
        return len(reports) > 1

    kill_when(blurred, expired)
    with pytest.raises(pyvips.Error, match="killed"):
        blurred.avg()
    assert 2 <= len(reports) < 50  # stopped at its next report, not at the end


class _TimeFlies(MetricsComparator):
    """The metrics comparator, during which the pair's (hand-moved) clock passes its deadline."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict:
        self.clock.now += 60
        return super().compare(a, b, config, detection=detection, deadline=deadline)


def test_the_metrics_comparator_checks_the_deadline_between_metrics(clock: Clock) -> None:
    """(A pair that changed: identical inputs get the scores of identical images, set.)"""
    photo = scenes.photo("chelsea")
    outcome = compare_pair(
        "slow-compare", _input("a.jpg", scenes.encode(photo)),
        _input("b.jpg", scenes.pasted_object(photo)), ComparisonConfig(),
        _TimeFlies(clock), max_input_pixels=MAX_PIXELS, deadline=Deadline(30, clock=clock),
    )  # fmt: skip
    result = outcome.result
    assert result.status == "timeout" and result.error is not None
    assert result.error.stage == "compare" and result.timings_ms["compare"] >= 60_000
    assert {"prepare", "detect", "compare", "total"} <= set(result.timings_ms)


class _Offered:
    """Offers nothing itself; finished once both units of work have run."""

    def __init__(self, finished: threading.Event) -> None:
        self._finished = finished

    def start(self) -> None:
        pass

    def pump(self) -> None:
        pass

    def finished(self) -> bool:
        return self._finished.is_set()

    def next_wait(self) -> float | None:
        return None

    def stop(self) -> None:
        pass


def test_the_runner_starts_the_deadline_when_a_worker_takes_the_pair() -> None:
    """Time in the queue never counts: the second pair waited behind the first and still has
    its whole processing_timeout when it starts."""
    runner: Runner[str] = Runner(
        MetricsComparator(), concurrency=1, queue_size=10, processing_timeout=5
    )
    seen: dict[str, tuple[float, float]] = {}
    both = threading.Event()

    def work(key: str) -> Callable[[float], Disposition]:
        def run(queued_ms: float) -> Disposition:
            deadline = current()
            assert deadline is not None and deadline.seconds == 5
            seen[key] = (queued_ms, deadline.remaining())
            time.sleep(0.4)
            if len(seen) == 2:
                both.set()
            return done()

        return run

    runner.offer("first", work("first"))
    runner.offer("second", work("second"))
    runner.run(StopFlag(), _Offered(both))
    queued_ms, remaining = seen["second"]
    assert queued_ms >= 350 and remaining > 4.9


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


def _noise_jpeg(seed: int) -> bytes:
    """About 600 KB of JPEG: a few seconds through a store that trickles 160 KB/s."""
    pixels = np.random.default_rng(seed).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    return scenes.encode(Image.fromarray(pixels), quality=95)


@pytest.mark.parametrize("mode", ["trickle", "stall"])
def test_a_slow_store_stops_the_pair_in_fetch_and_its_timeout_is_written(
    moto: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 endpoint answers GETs 16 KB every 0.1 s, or not at all: the pair stops at its
    1 s deadline (not after the downloads, nor after the client's 20 s read timeout x 3
    attempts), and its ``timeout`` result, stage ``fetch``, is still written."""
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    bucket = unique("slow")
    s3 = client("s3", moto)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=_noise_jpeg(1))
    s3.put_object(Bucket=bucket, Key="p/b.jpg", Body=_noise_jpeg(2))
    settings = Settings(comparison={"processing_timeout": 1.0}, diff_image=False)
    with slow_proxy(moto) as proxy:
        jobs = BucketJobs(settings, MetricsComparator(), s3_client(proxy.url, "us-east-1"))
        event = ObjectEvent(bucket=bucket, key="p/b.jpg", kind="created")
        proxy.mode = mode
        started = time.monotonic()
        report = jobs.handle(event, now=time.time())
        took = time.monotonic() - started
        proxy.mode = ""
    (job,) = report.reports
    assert took < 1.0 + 1.5, f"the pair took {took:.2f} s"
    assert job.result is not None and job.result.error is not None, job
    assert (job.result.status, job.result.error.stage) == ("timeout", "fetch")
    assert report.disposition.is_retry  # a failure of the moment: looked at again
    if mode == "trickle":  # (a store that never answers cannot take the result either)
        assert job.action == "written"
        stored = s3.get_object(Bucket=bucket, Key="p/result.json")["Body"].read()
        assert ComparisonResult.model_validate_json(stored).status == "timeout"


def test_the_folder_watcher_holds_every_pair_to_the_deployments_deadline(
    tmp_path: Path, huge_pair: tuple[bytes, bytes]
) -> None:
    """``pairwatch watch --once`` with processing_timeout 1: the 196 MP folder pair times out in
    detection, so does a manifest of it asking for 600 s (a pair may ask for less time, never
    more), and the small pair queued behind them is compared."""
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.png").write_bytes(huge_pair[0])
    (tmp_path / "big" / "b.png").write_bytes(huge_pair[1])
    (tmp_path / "jobs").mkdir()
    manifest = {"a": "../big/a.png", "b": "../big/b.png", "config": {"processing_timeout": 600}}
    (tmp_path / "jobs" / "asks-more.pair.json").write_text(json.dumps(manifest))
    small = scenes.encode(scenes.photo("rocket").resize((96, 96)))
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.jpg").write_bytes(small)
    (tmp_path / "small" / "b.jpg").write_bytes(small)
    age(tmp_path)
    config = tmp_path.parent / f"{tmp_path.name}.toml"
    config.write_text("diff_image = false\n[comparison]\nprocessing_timeout = 1\n")

    started = time.monotonic()
    run = watch_once(tmp_path, "--config", str(config))
    took = time.monotonic() - started

    assert run.returncode == 1, run.stderr[-3000:]  # two pairs failed (timed out)
    for path in ("big/result.json", "jobs/asks-more.result.json"):
        result = ComparisonResult.model_validate_json((tmp_path / path).read_bytes())
        assert result.status == "timeout" and result.error is not None, path
        assert result.error.stage == "detect" and "(1 s)" in result.error.message, path
    small_result = ComparisonResult.model_validate_json(
        (tmp_path / "small/result.json").read_bytes()
    )
    assert small_result.status == "ok"
    assert took < 20, f"{took:.1f} s"
