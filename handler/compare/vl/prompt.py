"""What we ask the VL model, and how its answer is read back.

Pure functions, no torch: the comparator builds the prompt in the service process, the worker
only runs the model, and the answer is parsed back in the service process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import json_repair
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from handler.config import ComparisonConfig
from handler.result import Box, Difference, Region

#: The answer shape the prompt shows the model, verbatim.
_ANSWER_SHAPE = (
    '{"similarity": <number from 0.0 (unrelated) to 1.0 (identical)>, '
    '"summary": "<one sentence>", '
    '"differences": [{"aspect": "<one of the aspects>", "element": "<what differs>", '
    '"description": "<how it differs between image A and image B>", "region": null}]}'
)


#: Bounds of the answer's JSON Schema. They bound the tokens a constrained answer can take (a
#: random-weight model fills every string to its limit), so keep them within what
#: ``vl_max_new_tokens`` (512 by default) allows; a real model's answers stay well inside them.
MAX_DIFFERENCES = 3
MAX_ASPECT_CHARS = 16
MAX_ELEMENT_CHARS = 24
MAX_DESCRIPTION_CHARS = 80
MAX_SUMMARY_CHARS = 100
MAX_REGION_INDEX = 999


def answer_schema() -> dict[str, Any]:
    """The answer's JSON Schema: what the local worker constrains decoding to (xgrammar) and
    what an OpenAI-compatible server gets as ``response_format``. Every property is required
    and no other is allowed (OpenAI's strict mode demands both); ``region`` is an index into
    the result's ``changed_regions`` or null."""

    def text(max_length: int, min_length: int = 0) -> dict[str, Any]:
        # A pattern rather than minLength/maxLength (xgrammar takes one or the other): it
        # bounds the length the same way and also rules out escapes and control characters,
        # so a character is never six tokens (``\u0000``).
        return {"type": "string", "pattern": f'^[^"\\\\\\x00-\\x1f]{{{min_length},{max_length}}}$'}

    difference = {
        "type": "object",
        "properties": {
            "aspect": text(MAX_ASPECT_CHARS),
            "element": text(MAX_ELEMENT_CHARS),
            "description": text(MAX_DESCRIPTION_CHARS, min_length=1),
            "region": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": MAX_REGION_INDEX},
                    {"type": "null"},
                ]
            },
        },
        "required": ["aspect", "element", "description", "region"],
        "additionalProperties": False,
    }
    return {
        "title": "ComparisonAnswer",
        "type": "object",
        "properties": {
            "similarity": {"type": "number", "minimum": 0.0, "maximum": 1.0},
            "summary": text(MAX_SUMMARY_CHARS),
            "differences": {"type": "array", "items": difference, "maxItems": MAX_DIFFERENCES},
        },
        # This order is the answer's: an answer cut off by the token limit keeps the verdict.
        "required": ["similarity", "summary", "differences"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class CropView:
    """What one region's close-ups show: region ``region`` (its index in ``changed_regions``),
    found as ``found`` (its kind, its boxes in A and in B), seen through the cuts ``shown_a``
    and ``shown_b`` (each image's native pixels; None where that image has no close-up)."""

    region: int
    found: Region
    shown_a: Box | None
    shown_b: Box | None

    @property
    def pictures(self) -> int:
        return (self.shown_a is not None) + (self.shown_b is not None)


def build_prompt(
    config: ComparisonConfig, crops: Sequence[CropView] = (), moves: Sequence[str] = ()
) -> str:
    """The instruction that follows the pictures: image A, image B, then each of ``crops``'
    close-ups (of A, then of B, where the region is in that image). ``moves``: how B's content
    lies against A's, in words ("a band 74 px high was added at the top of B")."""
    focus = ", ".join(config.focus_elements) or "anything visible"
    aspects = ", ".join(config.comparison_aspects) or "any"
    moved = (
        f"Compared with A, B's content is moved: {'; '.join(moves)}. Judge the content, not the "
        "move.\n"
        if moves
        else ""
    )
    return (
        "The first picture is image A, the second is image B. Compare them carefully.\n"
        f"{moved}"
        f"{_crop_lines(crops)}"
        f"Pay attention to: {focus}.\n"
        f"Report differences in these aspects: {aspects}.\n"
        "Answer with one JSON object and nothing else, in exactly this shape:\n"
        f"{_ANSWER_SHAPE}\n"
        'If the images show no differences, answer with "differences": [] and a similarity '
        "of 1.0."
    )


def _crop_lines(crops: Sequence[CropView]) -> str:
    if not crops:
        return ""
    lines = [
        "A pixel comparison found regions where A and B differ: changed (in both images, "
        "different), added (only in B), removed (only in A) or moved (the same content at "
        "another place in B). The next pictures are close-ups of them at full resolution, in "
        "image A and then in image B where the region is in that image (boxes in each "
        "image's own pixels):"
    ]
    number = 3
    for crop in crops:
        first, number = number, number + crop.pictures
        pictures = f"picture {first}" if crop.pictures == 1 else f"pictures {first} and {first + 1}"
        lines.append(f"- {pictures}: region {crop.region}, {_what(crop)}")
    lines.append(
        'Set "region" of a difference to the number of the region it lies in, or to null if it '
        "lies in none of them."
    )
    return "\n".join(lines) + "\n"


def _what(crop: CropView) -> str:
    found = crop.found
    where = (
        "; ".join(
            f"in {which} {_box(box)}" for which, box in (("A", found.a), ("B", found.b)) if box
        )
        or f"box {_box(found)}"
    )
    kind: str = found.kind
    if kind == "moved" and found.shift is not None:
        kind = f"moved by ({found.shift[0]}, {found.shift[1]}) px"
    elif kind == "added":
        kind = "added (only in B)"
    elif kind == "removed":
        kind = "removed (only in A)"
    close = " and ".join(
        f"of {which} {_box(box)}"
        for which, box in (("A", crop.shown_a), ("B", crop.shown_b))
        if box
    )
    return f"{kind}, {where}; close-up {close}"


def _box(box: Box) -> str:
    return f"x={box.x} y={box.y} {box.width}x{box.height}"


class ModelAnswer(BaseModel):
    """The model's answer after validation; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    similarity: float = Field(ge=0.0, le=1.0)
    differences: list[Difference] = Field(default_factory=list)
    summary: str = ""

    @field_validator("similarity", mode="before")
    @classmethod
    def _percent_to_fraction(cls, value: Any) -> Any:
        """Models regularly answer 85 or "85%" where 0.85 was asked for."""
        if isinstance(value, str):
            value = value.strip().rstrip("%").strip()
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value
        return number / 100.0 if 1.0 < number <= 100.0 else number

    @field_validator("differences", mode="before")
    @classmethod
    def _loose_differences(cls, value: Any) -> Any:
        """Accept a bare string per difference, and drop entries without any text."""
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        items: list[Any] = []
        for item in value:
            if isinstance(item, str) and item.strip():
                items.append({"description": item.strip()})
            elif isinstance(item, dict):
                fields: dict[str, Any] = {
                    k: str(v) for k, v in item.items() if v is not None and k != "region"
                }
                fields.setdefault("description", fields.get("element", ""))
                region = item.get("region")
                # A region is an index or nothing: a model's odd value there costs only it.
                if isinstance(region, int) and not isinstance(region, bool) and region >= 0:
                    fields["region"] = region
                if any(fields.get(k) for k in ("aspect", "element", "description")):
                    items.append(fields)
        return items

    @field_validator("summary", mode="before")
    @classmethod
    def _none_summary(cls, value: Any) -> Any:
        return "" if value is None else value


class AnswerInvalid(ValueError):
    """The text holds no JSON object with a usable ``similarity``."""


def parse_answer(text: str) -> ModelAnswer:
    """Read the model's JSON answer out of ``text``, tolerating what chat models add to it.

    ``json_repair`` strips code fences and chatter around the object and completes a truncated
    one (closing open strings, lists and objects), so an answer cut off in its summary still
    counts; pydantic then decides whether what is left is an answer at all.
    """
    try:
        decoded = json_repair.loads(text)
    except Exception as exc:  # the repairer is lenient, but never let it take a pair down
        raise AnswerInvalid(f"the answer could not be read as JSON: {exc}") from exc
    candidates = decoded if isinstance(decoded, list) else [decoded]
    errors: list[str] = []
    for candidate in candidates:
        if not isinstance(candidate, dict):
            continue
        try:
            return ModelAnswer.model_validate(candidate)
        except ValidationError as exc:
            errors.append("; ".join(_short(e) for e in exc.errors()))
    if errors:
        raise AnswerInvalid(f"the answer's JSON is not a valid comparison: {errors[0]}")
    raise AnswerInvalid("the answer holds no JSON object")


def _short(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "answer"
    return f"{where}: {error['msg']}"
