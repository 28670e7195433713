"""The comparator seam: two prepared images + a ComparisonConfig (+ the native-resolution
detection, when the pipeline ran it) in, one typed Outcome out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from handler.config import ComparisonConfig
from handler.detect import Detection
from handler.images import PreparedImage
from handler.result import ComparatorInfo, Difference, Region, VLDetails


@dataclass
class Outcome:
    """What a comparator concluded. Failures are raised as ``handler.errors.PairError``."""

    similarity: float
    is_similar: bool
    summary: str
    differences: list[Difference] = field(default_factory=list)
    changed_regions: list[Region] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    vl: VLDetails | None = None


class Comparator(Protocol):
    """Loaded once per process and reused for every pair; ``close`` frees models/workers."""

    @property
    def info(self) -> ComparatorInfo: ...

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
    ) -> Outcome: ...

    def close(self) -> None: ...
