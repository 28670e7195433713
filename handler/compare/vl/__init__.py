"""The vision-language comparator (``VLComparator``): see ``comparator`` for how a pair flows.

``VLComparator`` is imported lazily: the model worker process imports this package to reach
``worker``, and should not pay for the metrics stack (scikit-image, scipy) it never uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handler.compare.vl.comparator import VLComparator

__all__ = ["VLComparator"]


def __getattr__(name: str) -> Any:
    if name == "VLComparator":
        from handler.compare.vl.comparator import VLComparator

        return VLComparator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
