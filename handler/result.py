"""The result JSON written next to every pair: one pydantic model, its JSON Schema is public.

Field names are a public interface (other tools and the watchers' idempotency checks read them);
add fields, never rename them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from handler.config import ComparisonConfig
from handler.errors import PairError
from handler.version import __version__

Status = Literal["ok", "error", "timeout"]


RegionKind = Literal["changed", "added", "removed", "moved"]
BandKind = Literal["matched", "inserted", "removed"]


class Box(BaseModel):
    """A box in one image's native (EXIF-oriented) pixels."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Region(Box):
    """What happened in one area. ``x/y/width/height`` is its box in image A where it exists
    there, else (``added``) its box in image B."""

    kind: RegionKind = Field(
        "changed",
        description="changed: in both images, different; added: in B only; removed: in A "
        "only; moved: the same content at another place (see shift).",
    )
    a: Box | None = Field(None, description="Its box in image A; null where it is not in A.")
    b: Box | None = Field(None, description="Its box in image B; null where it is not in B.")
    shift: tuple[int, int] | None = Field(
        None,
        description="[dx, dy] from A to B: how far this content lies elsewhere in B (the "
        "alignment's offset where nothing else moved it); null for added and removed.",
    )


class BandInfo(BaseModel):
    """Rows of A and rows of B that the alignment put together (``matched``), or rows that
    exist in one image only (``inserted`` into B, ``removed`` from A)."""

    kind: BandKind
    a: tuple[int, int] | None = Field(None, description="[top, bottom) rows of A; null: none.")
    b: tuple[int, int] | None = Field(None, description="[top, bottom) rows of B; null: none.")
    shift: int = Field(0, description="Matched: how far B's rows lie below A's (negative: up).")
    region: int | None = Field(
        None, ge=0, description="Index into changed_regions of the region this band is."
    )


class AlignmentInfo(BaseModel):
    """How B lines up with A (``null`` on the result when it lines up as it is)."""

    offset: tuple[int, int] = Field(
        description="[dx, dy]: the content's global move from A to B (dy: the largest matched "
        "band's shift)."
    )
    bands: list[BandInfo] = Field(default_factory=list)


class Difference(BaseModel):
    aspect: str = ""
    element: str = ""
    description: str
    region: int | None = Field(
        None, ge=0, description="Index into changed_regions of the region this is about."
    )


class ComparatorInfo(BaseModel):
    name: str
    model: str | None = None
    device: str = "cpu"
    #: VL only: where the model runs, ``local`` (worker process) or ``openai`` (a server).
    backend: str | None = None
    #: VL ``openai`` backend only: the server's base URL, without credentials.
    endpoint: str | None = None


class InputInfo(BaseModel):
    """One input image. ``sha256`` is what idempotency checks compare."""

    name: str
    bytes: int | None = None
    sha256: str | None = None
    etag: str | None = None
    format: str | None = None
    original_size: tuple[int, int] | None = None
    processed_size: tuple[int, int] | None = None


class ErrorInfo(BaseModel):
    type: str
    message: str
    input: Literal["a", "b"] | None = Field(None, description="Which input failed, when one did.")
    field: str | None = Field(
        None,
        description="The request, manifest or config field at fault, when one is (e.g. "
        "config.ignore_regions[0]).",
    )
    stage: str | None = Field(
        None,
        description="timeout: the stage the pair was stopped in (fetch, prepare, detect, "
        "compare, write); timings_ms holds the time spent so far.",
    )


class VLDetails(BaseModel):
    """What the VL model did for this pair (absent for the metrics comparator)."""

    skipped: bool = False
    skip_reason: str | None = None
    raw_text: str | None = None
    visual_tokens: int | None = None
    attempts: int = 0
    max_pixels: int | None = None
    peak_memory_mb: float | None = Field(
        None, description="Peak GPU memory the model allocated for this pair (CUDA only)."
    )
    constrained: bool = Field(
        False, description="Decoding was constrained to the answer's JSON Schema."
    )
    batch_size: int | None = Field(
        None, description="How many pairs shared the model call that answered this one."
    )


class ComparisonResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    pair_id: str
    status: Status
    similarity: float | None = Field(None, ge=0.0, le=1.0)
    is_similar: bool | None = None
    summary: str = ""
    differences: list[Difference] = Field(default_factory=list)
    changed_regions: list[Region] = Field(default_factory=list)
    alignment: AlignmentInfo | None = Field(
        None,
        description="How B lines up with A when content moved (bands inserted or removed, a "
        "global offset); null when it lines up as it is.",
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    comparator: ComparatorInfo
    inputs: list[InputInfo] = Field(min_length=2, max_length=2)
    config: ComparisonConfig
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    vl: VLDetails | None = None
    diff_image: str | None = Field(None, description="File name of the diff image beside this.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    version: str = __version__

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @property
    def input_digests(self) -> tuple[str | None, str | None]:
        """The inputs' sha256 values, for "same inputs, already done" checks."""
        return (self.inputs[0].sha256, self.inputs[1].sha256)


def result_json_schema() -> dict[str, Any]:
    return ComparisonResult.model_json_schema()


def failure_result(
    pair_id: str,
    error: PairError,
    inputs: list[InputInfo],
    config: ComparisonConfig,
    comparator: ComparatorInfo,
    *,
    timings: dict[str, float] | None = None,
    failed_input: str | None = None,
) -> ComparisonResult:
    """An error/timeout result; also used by the watchers for pair-level problems."""
    vl_details = error.details.get("vl")
    return ComparisonResult(
        pair_id=pair_id,
        status="timeout" if error.status == "timeout" else "error",
        summary=f"Comparison failed: {error.message}",
        comparator=comparator,
        inputs=inputs,
        config=config,
        timings_ms=timings or {"total": 0.0},
        error=ErrorInfo(
            type=error.type,
            message=error.message,
            input="a" if failed_input == "a" else "b" if failed_input == "b" else None,
            field=error.details.get("field"),
            stage=error.details.get("stage") if error.status == "timeout" else None,
        ),
        vl=vl_details,
        metrics=error.details.get("metrics", {}),
    )
