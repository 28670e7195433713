"""Serve's admission (``watcher.serve.admission``) in front of a real ``Runner``: one bound of
``concurrency + queue_size`` over requests still reading and the runner's work, the gauges it
moves, and a waiter that leaves giving its place back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from handler.compare.metrics import MetricsComparator
from handler.disposition import Disposition, done
from watcher.runner import Runner, Submitted
from watcher.serve.admission import Admission, Busy
from watcher.shutdown import StopFlag

pytestmark = pytest.mark.timeout(30)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def runner() -> Iterator[Runner[Any]]:
    running: Runner[Any] = Runner(
        MetricsComparator(), concurrency=2, queue_size=1, wait_ready=False
    )
    stop = StopFlag()
    loop = threading.Thread(target=running.run, args=(stop, Submitted()))
    loop.start()
    yield running
    stop.request()
    loop.join(10)


def test_admission_refuses_beyond_concurrency_plus_queue(runner: Runner[Any]) -> None:
    release = threading.Event()
    entered: list[int] = []

    def blocking(n: int) -> Any:
        def work(queued_ms: float) -> Disposition:
            entered.append(n)
            release.wait(10)
            return done()

        return work

    async def scenario() -> None:
        admission = Admission(runner, queue_size=1)

        async def hold(n: int) -> None:
            async with admission.admit() as ticket:
                await asyncio.wrap_future(ticket.submit(n, blocking(n)))

        tasks = [asyncio.create_task(hold(n)) for n in range(3)]
        await asyncio.sleep(0.2)
        assert (admission.admitted, sorted(entered)) == (3, [0, 1])
        assert _value("pairwatch_queue_depth") == 1 and _value("pairwatch_in_flight") == 2
        with pytest.raises(Busy) as busy:
            async with admission.admit():
                pass
        assert busy.value.retry_after >= 1
        tasks[2].cancel()  # a waiter that goes away gives its queue place back
        await asyncio.sleep(0.05)
        assert admission.admitted == 2 and _value("pairwatch_queue_depth") == 0
        async with admission.admit():  # so there is room again
            pass
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert admission.admitted == 0
        assert _value("pairwatch_queue_depth") == 0 and _value("pairwatch_in_flight") == 0
        assert sorted(entered) == [0, 1]  # the one that left never ran

    asyncio.run(scenario())


def test_admission_rejects_nonsense_limits(runner: Runner[Any]) -> None:
    with pytest.raises(ValueError):
        Admission(runner, -1)
