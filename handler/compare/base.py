"""The comparator seam: two prepared images + a ComparisonConfig (+ the native-resolution
detection, when the pipeline ran it, and crops of its largest regions, when the comparator
wants them) in, one typed Verdict out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from handler.config import ComparisonConfig
from handler.crops import RegionCrop
from handler.deadline import Deadline
from handler.detect import Detection
from handler.images import PreparedImage
from handler.result import ComparatorInfo, Difference, Region, VLDetails


@dataclass
class Verdict:
    """What a comparator concluded. Failures are raised as ``handler.errors.PairError``."""

    similarity: float
    is_similar: bool
    summary: str
    differences: list[Difference] = field(default_factory=list)
    changed_regions: list[Region] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    vl: VLDetails | None = None


class Comparator(Protocol):
    """Loaded once per process and reused for every pair; ``close`` frees models/workers.

    ``compare`` may be called from several threads at once (the runner keeps ``concurrency``
    pairs in flight). ``wait_ready`` blocks until pairs can be taken (a model loaded) and raises
    ``handler.errors.ModelUnavailable`` when they never can: a queue consumer calls it before it
    receives work, so that it holds no message while its model loads.

    ``wants_crops``: the pipeline cuts native-resolution crops of the largest changed regions
    (``handler.crops.cut_crops``, one more streamed pass over both inputs) for this comparator
    and passes them as ``crops``; otherwise they are cut only for a diff image, and ``crops``
    may still hold those.

    ``deadline`` is the pair's (``handler.deadline``): a comparator checks it between its units
    of work, or hands it to where the work runs (the VL model), and raises
    ``ComparisonTimeout`` once it has passed.
    """

    @property
    def info(self) -> ComparatorInfo: ...

    @property
    def wants_crops(self) -> bool: ...

    def wait_ready(self) -> None: ...

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict: ...

    def identical(self, config: ComparisonConfig, detection: Detection) -> Verdict:
        """What ``compare`` concludes for byte-identical inputs, without their pixels: the
        pipeline decodes neither (``detection`` is the identical one, sized from the header)."""
        ...

    def close(self) -> None: ...
