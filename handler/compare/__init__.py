"""Comparators. ``create_comparator`` picks one from the settings (``auto``: vl iff a model)."""

from __future__ import annotations

import os

from handler.compare.base import Comparator, Verdict
from handler.config import Settings

__all__ = [
    "Comparator",
    "Verdict",
    "create_comparator",
    "resolve_comparator_name",
    "resolve_concurrency",
]

#: Pairs in flight when ``concurrency`` is unset for the VL comparator, which batches
#: concurrent pairs into its worker. The CPU metrics comparator runs one pair per usable core
#: (``usable_cores``): decoding and detection release the GIL, and the decode budget, not the
#: number of pairs, bounds their memory.
VL_CONCURRENCY = 8


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_comparator_name(settings: Settings) -> str:
    if settings.comparator == "auto":
        return "vl" if settings.model else "metrics"
    return settings.comparator


def resolve_concurrency(settings: Settings) -> int:
    """How many pairs may compare at once (``concurrency``, else the comparator's default)."""
    if settings.concurrency is not None:
        return settings.concurrency
    return VL_CONCURRENCY if resolve_comparator_name(settings) == "vl" else usable_cores()


def create_comparator(settings: Settings) -> Comparator:
    """Build the configured comparator. The VL stack (torch, transformers) is imported lazily."""
    if resolve_comparator_name(settings) == "vl":
        from handler.compare.vl import VLComparator

        return VLComparator(settings)
    from handler.compare.metrics import MetricsComparator

    return MetricsComparator()
