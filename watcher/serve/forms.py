"""The compare endpoints' forms: what each accepts, as a ``PairRequest`` and as OpenAPI.

A form is parsed by ``watcher.serve.uploads`` as it streams in; here its fields are checked
(a mistake is a ``RequestError`` naming the field) and turned into the pair to compare.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from handler.config import ComparisonConfig, InvalidConfig, apply_overrides
from watcher.serve.errors import RequestError
from watcher.serve.legacy import CompatRequestError, compat_config
from watcher.serve.uploads import Upload, UploadedFile

MAX_PAIR_ID_CHARS = 200
TWO_FILES_MESSAGE = "exactly two files are required"


@dataclass(frozen=True)
class PairRequest:
    """What an endpoint makes of a form: the two files, the config and the pair id."""

    files: tuple[UploadedFile, UploadedFile]
    config: ComparisonConfig
    pair_id: str


#: Turns a parsed form into a ``PairRequest``; raises ``RequestError`` for a bad one.
Select = Callable[[Upload, ComparisonConfig], PairRequest]


def check_pair_id(raw: str | None) -> str:
    """The client's ``pair_id`` (short, printable), or a fresh one that tells requests apart."""
    if raw is None or raw == "":
        return f"http-{uuid.uuid4().hex[:12]}"
    if len(raw) > MAX_PAIR_ID_CHARS or not raw.isprintable():
        raise RequestError(
            422,
            "invalid_field",
            f"pair_id must be 1-{MAX_PAIR_ID_CHARS} printable characters",
            "pair_id",
        )
    return raw


def v1_config(raw: str | None, base: ComparisonConfig) -> ComparisonConfig:
    """``config`` form field: JSON of ``ComparisonConfig`` fields over the deployment's own.
    A mistake in it is a 422 naming the field (``config.image_quality``)."""
    if raw is None or raw.strip() == "":
        return base
    try:
        overrides = json.loads(raw)
    except ValueError as exc:
        message = f"config is not valid JSON: {exc}"
        raise RequestError(422, "invalid_config", message, "config") from None
    if not isinstance(overrides, dict):
        raise RequestError(422, "invalid_config", "config must be a JSON object", "config")
    try:
        return apply_overrides(base, overrides)
    except InvalidConfig as exc:
        raise RequestError(422, "invalid_config", str(exc), exc.field) from None


def v1_request(upload: Upload, base: ComparisonConfig) -> PairRequest:
    """Files ``a`` and ``b``, optional ``config`` (JSON) and ``pair_id``; nothing else."""
    by_name = {f.field_name: f for f in upload.files}
    unknown = sorted(set(upload.fields) - {"config", "pair_id"})
    if unknown or set(by_name) != {"a", "b"} or len(upload.files) != 2:
        raise RequestError(
            400,
            "bad_request",
            "expected files a and b and optional fields config, pair_id"
            + (f"; unknown fields: {', '.join(unknown)}" if unknown else ""),
        )
    return PairRequest(
        (by_name["a"], by_name["b"]),
        v1_config(upload.fields.get("config"), base),
        check_pair_id(upload.fields.get("pair_id")),
    )


def compat_request(upload: Upload, base: ComparisonConfig) -> PairRequest:
    """Two ``files`` and the original config fields (others ignored, as the original did)."""
    files = [f for f in upload.files if f.field_name == "files"]
    if len(files) != 2 or len(upload.files) != 2:
        raise RequestError(400, "bad_request", TWO_FILES_MESSAGE)
    try:
        config = compat_config(upload.fields, base)
    except CompatRequestError as exc:
        raise RequestError(400, "bad_request", str(exc)) from None
    return PairRequest((files[0], files[1]), config, check_pair_id(None))


def _multipart_body(required: list[str], properties: dict[str, object]) -> dict[str, object]:
    """OpenAPI for a form the endpoint streams itself (FastAPI's ``File()`` would spool it)."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


_BINARY = {"type": "string", "format": "binary"}
V1_BODY = _multipart_body(
    ["a", "b"],
    {
        "a": {**_BINARY, "description": "image A"},
        "b": {**_BINARY, "description": "image B"},
        "config": {"type": "string", "description": "JSON object of ComparisonConfig fields"},
        "pair_id": {"type": "string", "maxLength": MAX_PAIR_ID_CHARS},
    },
)
COMPAT_BODY = _multipart_body(
    ["files"],
    {
        "files": {"type": "array", "items": _BINARY, "description": "exactly two images"},
        "focus_elements": {"type": "string"},
        "comparison_aspects": {"type": "string"},
        "similarity_threshold": {"type": "number"},
        "max_image_size": {"type": "string"},
        "image_quality": {"type": "integer"},
        "processing_timeout": {"type": "number"},
    },
)
