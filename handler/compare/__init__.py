"""Comparators. ``create_comparator`` picks one from the settings (``auto``: vl iff a model)."""

from __future__ import annotations

from handler.compare.base import Comparator, Verdict
from handler.config import Settings

__all__ = ["Comparator", "Verdict", "create_comparator", "resolve_comparator_name"]


def resolve_comparator_name(settings: Settings) -> str:
    if settings.comparator == "auto":
        return "vl" if settings.model else "metrics"
    return settings.comparator


def create_comparator(settings: Settings) -> Comparator:
    """Build the configured comparator. The VL stack (torch, transformers) is imported lazily."""
    if resolve_comparator_name(settings) == "vl":
        from handler.compare.vl import VLComparator

        return VLComparator(settings)
    from handler.compare.metrics import MetricsComparator

    return MetricsComparator()
