"""Comparators. ``create_comparator`` picks one from the settings (``auto``: vl iff a model)."""

from __future__ import annotations

from handler.compare.base import Comparator, Verdict
from handler.config import Settings

__all__ = [
    "Comparator",
    "Verdict",
    "create_comparator",
    "resolve_comparator_name",
    "resolve_concurrency",
]

#: Pairs in flight when ``concurrency`` is unset: the VL comparator batches concurrent pairs
#: into its worker, the CPU metrics comparator gains nothing from more than one at a time.
DEFAULT_CONCURRENCY = {"vl": 8, "metrics": 1}


def resolve_comparator_name(settings: Settings) -> str:
    if settings.comparator == "auto":
        return "vl" if settings.model else "metrics"
    return settings.comparator


def resolve_concurrency(settings: Settings) -> int:
    """How many pairs may compare at once (``concurrency``, else the comparator's default)."""
    if settings.concurrency is not None:
        return settings.concurrency
    return DEFAULT_CONCURRENCY[resolve_comparator_name(settings)]


def create_comparator(settings: Settings) -> Comparator:
    """Build the configured comparator. The VL stack (torch, transformers) is imported lazily."""
    if resolve_comparator_name(settings) == "vl":
        from handler.compare.vl import VLComparator

        return VLComparator(settings)
    from handler.compare.metrics import MetricsComparator

    return MetricsComparator()
