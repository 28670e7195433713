"""Batched generation in the real worker process, on the tiny random-weight Qwen2-VL.

Random weights answer whatever their logits say, so these answers depend on the images: a
padding or rope/position-id bug in a batch changes them. Decoding is constrained to the answer
schema (xgrammar), which is what makes every random answer a valid one. Concurrent callers are
threads, as the runner's are; faults are injected inside the worker (``protocol.Fault``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handler.compare.vl import VLComparator
from handler.compare.vl.local_backend import LocalBackend
from handler.compare.vl.prompt import ModelAnswer, answer_schema, build_prompt
from handler.compare.vl.protocol import Fault, LabelledImage, Reply, Request
from handler.config import ComparisonConfig, Settings
from handler.errors import ModelCrashed, PairError
from handler.images import PreparedImage, prepare
from tests.support import scenes, tiny_vlm

CONFIG = ComparisonConfig(max_image_size=(128, 128), processing_timeout=60)
BATCH = 4


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.build(tmp_path_factory.mktemp("random-vlm"))


@pytest.fixture(scope="module")
def comparator(random_model: Path, offline: None) -> Iterator[VLComparator]:
    vl = VLComparator(Settings(model=str(random_model), device="cpu", vl_batch_size=BATCH))
    vl.wait_ready()
    yield vl
    vl.close()


@pytest.fixture(autouse=True)
def _no_fault_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "comparator" in request.fixturenames:
        request.getfixturevalue("comparator").fault = None


def _pairs(count: int) -> list[tuple[PreparedImage, PreparedImage]]:
    """Distinct random-noise pairs: never skipped as identical, each with its own answer."""
    pairs = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        a, b = (
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(2)
        )
        pairs.append(
            (prepare(scenes.encode(a), (128, 128), 85), prepare(scenes.encode(b), (128, 128), 85))
        )
    return pairs


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released at the same instant; exceptions are returned."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        try:
            return call()
        except PairError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_batched_answers_equal_unbatched_ones_and_all_are_valid(
    comparator: VLComparator,
) -> None:
    pairs = _pairs(BATCH)
    alone = [comparator.compare(a, b, CONFIG) for a, b in pairs]
    together = _together([lambda a=a, b=b: comparator.compare(a, b, CONFIG) for a, b in pairs])
    assert all(o.vl is not None and o.vl.batch_size == 1 for o in alone)
    sizes = [o.vl.batch_size for o in together]
    assert max(sizes) > 1, sizes  # they really shared a generate
    assert [o.vl.raw_text for o in together] == [o.vl.raw_text for o in alone]
    # Different images, different answers: the comparison above is not between constants.
    assert len({o.vl.raw_text for o in alone}) > 1
    for outcome in alone + together:
        assert outcome.vl.constrained is True
        answer = json.loads(outcome.vl.raw_text, strict=False)  # complete JSON, not repaired
        assert list(answer) == ["similarity", "summary", "differences"]
        ModelAnswer.model_validate(answer)
        assert 0.0 <= outcome.similarity <= 1.0


def test_a_pair_past_its_deadline_times_out_while_its_batch_mates_finish(
    comparator: VLComparator,
) -> None:
    pairs = _pairs(3)
    pid = comparator.worker_pid
    started = time.monotonic()
    for _ in range(3):  # under heavy load a caller can miss the batch: form it again
        # The deadline must fall mid-answer on this machine as loaded as it is now: a share of
        # what one whole comparison takes (a fixed 0.4 s was sometimes a whole answer).
        solo = time.monotonic()
        comparator.compare(*pairs[0], CONFIG)
        timeout = round(max(0.1, (time.monotonic() - solo) * 0.4), 2)
        short = CONFIG.model_copy(update={"processing_timeout": timeout})
        first, *mates = _together(
            [
                lambda a=a, b=b, c=c: comparator.compare(a, b, c)
                for (a, b), c in zip(pairs, [short, CONFIG, CONFIG], strict=True)
            ]
        )
        if isinstance(first, PairError) and first.details["vl"].batch_size >= 2:
            break
    assert isinstance(first, PairError) and first.status == "timeout", first
    assert f"did not finish its answer within {timeout:g} s" in first.message
    # The metrics pre-gate runs in the callers' threads first, so on a loaded machine a caller
    # can miss the batch: the short pair must share its generate with at least one mate.
    assert first.details["vl"].batch_size >= 2 and first.details["vl"].raw_text
    assert first.details["vl"].raw_text.startswith("{")
    for outcome in mates:
        assert not isinstance(outcome, Exception), outcome
        assert outcome.vl.constrained
    assert time.monotonic() - started < 90
    assert comparator.worker_pid == pid  # stopped between tokens, not killed


def test_out_of_memory_in_a_batch_splits_it_until_the_pairs_fit(
    comparator: VLComparator,
) -> None:
    """A real impossible allocation whenever more than one pair shares a generate: the batch
    of four is split into halves, then single pairs, which fit (three attempts each)."""
    comparator.fault = Fault(oom_above_batch=1)
    pid = comparator.worker_pid
    outcomes = _together(
        [lambda a=a, b=b: comparator.compare(a, b, CONFIG) for a, b in _pairs(BATCH)]
    )
    for outcome in outcomes:
        assert not isinstance(outcome, Exception), outcome
        assert outcome.vl.batch_size == 1
    # Up to 3 attempts for the pairs of a full batch (4 -> 2 -> 1), 2 for a pair of a batch of 2.
    assert max(o.vl.attempts for o in outcomes) >= 2
    assert comparator.worker_pid == pid


def _request(a: PreparedImage, b: PreparedImage, fault: Fault | None = None) -> Request:
    return Request(
        images=(LabelledImage("Image A:", a.jpeg), LabelledImage("Image B:", b.jpeg)),
        prompt=build_prompt(CONFIG),
        max_pixels=128 * 128,
        timeout_s=60,
        expires_at=time.monotonic() + 60,
        schema=answer_schema(),
        fault=fault,
    )


def test_a_crash_fails_only_its_batch_and_queued_pairs_go_to_the_new_worker(
    random_model: Path, offline: None
) -> None:
    backend = LocalBackend(Settings(model=str(random_model), device="cpu", vl_batch_size=2))
    try:
        backend.wait_ready()
        pid = backend.worker_pid
        (a1, b1), (a2, b2), (a3, b3), (a4, b4) = _pairs(4)
        dying = _request(a1, b1, Fault(delay_s=1.5, crash=True))
        results: dict[str, Reply | Exception] = {}

        def ask(name: str, request: Request, wait: float) -> None:
            time.sleep(wait)
            try:
                results[name] = backend.generate(request)
            except PairError as exc:
                results[name] = exc

        threads = [
            threading.Thread(target=ask, args=("crash", dying, 0.0)),
            threading.Thread(target=ask, args=("mate", _request(a2, b2), 0.0)),
            # Queued while the first batch runs: they wait for the next worker.
            threading.Thread(target=ask, args=("queued1", _request(a3, b3), 0.5)),
            threading.Thread(target=ask, args=("queued2", _request(a4, b4), 0.5)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        crashed = [name for name, r in results.items() if isinstance(r, ModelCrashed)]
        assert sorted(crashed) == ["crash", "mate"], results
        for name in ("queued1", "queued2"):
            reply = results[name]
            assert isinstance(reply, Reply) and reply.kind == "ok" and reply.text, reply
        assert backend.worker_pid not in (None, pid)
    finally:
        backend.close()
