"""Serve's admission control (``watcher.serve.admission``) as a small component: its limits and
the queue-depth and in-flight gauges it moves."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from watcher.serve.admission import Admission, Busy


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_admission_refuses_beyond_concurrency_plus_queue() -> None:
    async def scenario() -> None:
        admission = Admission(concurrency=2, queue_size=1)
        release = asyncio.Event()
        entered: list[int] = []

        async def hold(n: int) -> None:
            async with admission.admit() as ticket, ticket.compare():
                entered.append(n)
                await release.wait()

        tasks = [asyncio.create_task(hold(n)) for n in range(3)]
        await asyncio.sleep(0.01)
        assert (admission.admitted, entered) == (3, [0, 1])
        assert _value("pairwatch_queue_depth") == 1 and _value("pairwatch_in_flight") == 2
        with pytest.raises(Busy) as busy:
            async with admission.admit():
                pass
        assert busy.value.retry_after >= 1
        tasks[2].cancel()  # a waiter that goes away gives its queue place back
        await asyncio.sleep(0.01)
        assert admission.admitted == 2 and _value("pairwatch_queue_depth") == 0
        async with admission.admit():  # so there is room again
            pass
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert admission.admitted == 0
        assert _value("pairwatch_queue_depth") == 0 and _value("pairwatch_in_flight") == 0

    asyncio.run(scenario())


def test_admission_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        Admission(0, 1)
