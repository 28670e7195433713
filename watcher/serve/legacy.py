"""The original service's API (``POST /compare``): its envelope and its form fields.

Its clients send ``files`` (two uploads) and the ``ComparisonConfig`` fields as plain form
fields, and read ``{"code", "msg", "data"}``. Lists and the size pair arrive as text: a JSON
array (``["text","logos"]``, ``[800,600]``) or comma-separated (``text,logos``, ``800,600``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from handler.config import ComparisonConfig, apply_overrides
from handler.result import ComparisonResult

_LIST_FIELDS = ("focus_elements", "comparison_aspects", "max_image_size", "ignore_regions")
_CONFIG_FIELDS = frozenset(ComparisonConfig.model_fields)


class CompatRequestError(ValueError):
    """A request the original API answered with 400 (the message is the envelope's ``msg``)."""


def compat_envelope(code: int, msg: str, data: Any = None) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}


def compat_status(result: ComparisonResult, input_error_types: Collection[str]) -> int:
    """200 ok; 400 an image that cannot be processed; 500 timeouts and model failures."""
    if result.status == "ok":
        return 200
    error = result.error
    if error is not None and (error.type in input_error_types or error.input is not None):
        return 400
    return 500


def compat_config(fields: Mapping[str, str], base: ComparisonConfig) -> ComparisonConfig:
    """The deployment's config with the original API's form fields applied. Other fields are
    ignored, as the original ignored them."""
    overrides: dict[str, Any] = {}
    for name, text in fields.items():
        if name not in _CONFIG_FIELDS or text.strip() == "":
            continue
        overrides[name] = _list_value(text) if name in _LIST_FIELDS else text.strip()
    try:
        return apply_overrides(base, overrides)
    except ValueError as exc:
        raise CompatRequestError(str(exc)) from None


def _list_value(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except ValueError:
            raise CompatRequestError(f"{text!r} is not a JSON array") from None
    return [part.strip() for part in stripped.split(",") if part.strip()]
