"""Pair conventions shared by every source (local folder, S3, MinIO): pure functions on names.

1. Pair folder/prefix ``<pair-id>/`` holding exactly two images -> ``<pair-id>/result.json``.
2. Manifest ``NAME.pair.json`` = ``{"a": path, "b": path, "config": {...}}``
   -> ``NAME.result.json`` (a shortened NAME where that would not fit in a file name).

Names with control characters or bytes that are not UTF-8 are not handled (``check_name``).

The handler's own outputs (results, diff images, temporary files) are recognised here so that no
source ever mistakes them for inputs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from handler.config import ComparisonConfig, InvalidConfig, apply_overrides
from handler.errors import InvalidManifest, PathOutsideRoot, UnsupportedName

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)
RESULT_NAME = "result.json"
DIFF_NAME = "diff.png"
MANIFEST_SUFFIX = ".pair.json"
RESULT_SUFFIX = ".result.json"
DIFF_SUFFIX = ".diff.png"
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
#: The longest file name (one path segment) Linux filesystems accept, in bytes.
NAME_MAX_BYTES = 255
#: Hex digits of the full stem's sha256 that keep shortened output names apart.
_SHORT_NAME_DIGITS = 8


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary files (rsync's ``.name.XXXXXX``, ``*.part``, editors' ``*~``)."""
    base = posixpath.basename(name)
    return not base or base.startswith(".") or base.lower().endswith(_TEMP_SUFFIXES)


def is_output_name(name: str) -> bool:
    """Files the handler writes itself: they must never trigger a comparison."""
    base = posixpath.basename(name).lower()
    return base in (RESULT_NAME, DIFF_NAME) or base.endswith((RESULT_SUFFIX, DIFF_SUFFIX))


def is_image_name(name: str) -> bool:
    if is_ignored_name(name) or is_output_name(name):
        return False
    return posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES


def is_manifest_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not is_ignored_name(base) and base.lower().endswith(MANIFEST_SUFFIX)


def is_relevant_name(name: str) -> bool:
    """Could a new object with this name complete a pair?"""
    return is_image_name(name) or is_manifest_name(name)


def folder_images(names: Iterable[str]) -> list[str]:
    """The candidate images of a pair folder, in pair order (image A is the first by name)."""
    return sorted(n for n in names if is_image_name(n))


def manifest_stem(name: str) -> str:
    base = posixpath.basename(name)
    return base[: -len(MANIFEST_SUFFIX)]


def manifest_result_name(name: str) -> str:
    return _output_stem(name) + RESULT_SUFFIX


def manifest_diff_name(name: str) -> str:
    return _output_stem(name) + DIFF_SUFFIX


def _output_stem(name: str) -> str:
    """The manifest's stem, shortened where ``STEM.result.json`` would exceed NAME_MAX_BYTES.

    A manifest name is legal up to 255 bytes but its result name is 2 bytes longer, so a stem
    over 243 bytes is cut and tagged with a digest of the whole stem: two long manifests that
    share their first bytes still get results of their own, and the same manifest always maps
    to the same names (results and diff images stay beside each other, on every source).
    """
    stem = manifest_stem(name)
    longest = max(len(RESULT_SUFFIX), len(DIFF_SUFFIX))
    if encoded_size(stem) + longest <= NAME_MAX_BYTES:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()
    tag = "~" + digest[:_SHORT_NAME_DIGITS]
    return truncate_to_bytes(stem, NAME_MAX_BYTES - longest - len(tag)) + tag


def encoded_size(text: str) -> int:
    """Bytes ``text`` takes as a UTF-8 file name (a lone surrogate counts 3: never too few)."""
    return len(text.encode("utf-8", "surrogatepass"))


def truncate_to_bytes(text: str, limit: int) -> str:
    """The longest start of ``text`` that takes at most ``limit`` bytes, whole characters only."""
    size = 0
    for index, char in enumerate(text):
        size += encoded_size(char)
        if size > limit:
            return text[:index]
    return text


def check_name(path: str) -> str:
    """Refuse names pairwatch does not handle; returns ``path`` unchanged.

    Control characters (a newline, a tab, ESC...) are legal in Linux names but break every
    line-based consumer of results and logs, and S3 keys refuse them; bytes that are not UTF-8
    (Python's surrogate escapes) cannot be written into a JSON result at all.
    """
    for char in path:
        category = unicodedata.category(char)
        if category == "Cc":
            raise UnsupportedName(
                f"{path!r} contains a control character ({char!r}); rename it without one"
            )
        if category == "Cs":
            raise UnsupportedName(f"{path!r} is not valid UTF-8; rename it")
    return path


@dataclass(frozen=True, order=True)
class PairSpec:
    """A pair folder (``path`` = the folder) or a manifest (``path`` = the ``.pair.json``)."""

    kind: Literal["folder", "manifest"]
    path: str

    @property
    def folder(self) -> str:
        """Where the pair's results go."""
        return self.path if self.kind == "folder" else posixpath.dirname(self.path)

    @property
    def pair_id(self) -> str:
        if self.kind == "folder":
            return self.path
        return posixpath.join(self.folder, manifest_stem(self.path))

    @property
    def result_path(self) -> str:
        name = RESULT_NAME if self.kind == "folder" else manifest_result_name(self.path)
        return posixpath.join(self.folder, name)

    @property
    def diff_path(self) -> str:
        name = DIFF_NAME if self.kind == "folder" else manifest_diff_name(self.path)
        return posixpath.join(self.folder, name)


def is_ignored_path(relative: str) -> bool:
    """Hidden or temporary, itself or any folder above it (``.git/``, ``.Trash/``, ``x.part/``)."""
    return any(is_ignored_name(part) for part in relative.split("/"))


def pairs_for_name(relative: str) -> list[PairSpec]:
    """The pairs a new, changed or deleted file may affect, by the naming conventions alone.

    An image belongs to the pair folder it sits in (the root itself is never a pair folder); a
    manifest is its own pair. Manifests that *reference* an image are ``handler.manifests``'
    (``pairs_touched``: this, the manifests beside it, those known to read it).
    """
    if is_ignored_path(relative):
        return []
    if is_manifest_name(relative):
        return [PairSpec("manifest", relative)]
    folder = posixpath.dirname(relative)
    if is_image_name(relative) and folder:
        return [PairSpec("folder", folder)]
    return []


@dataclass(frozen=True)
class Manifest:
    a: str
    b: str
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, base: ComparisonConfig) -> ComparisonConfig:
        """The deployment's config with this pair's overrides applied (validated)."""
        if not self.config_overrides:
            return base
        try:
            return apply_overrides(base, self.config_overrides)
        except InvalidConfig as exc:
            raise InvalidManifest(str(exc), details={"field": exc.field}) from exc


def parse_manifest(data: bytes) -> Manifest:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidManifest('manifest must be an object {"a": ..., "b": ...}')
    a, b, overrides = doc.get("a"), doc.get("b"), doc.get("config", {})
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        raise InvalidManifest('manifest needs string paths "a" and "b"')
    if not isinstance(overrides, dict):
        raise InvalidManifest('manifest "config" must be an object')
    return Manifest(a=a, b=b, config_overrides=overrides)


def join_relative(base: str, relative: str, *, check_names: bool = True) -> str:
    """Join ``relative`` (from a manifest) onto the folder/prefix ``base``, staying inside it.

    Works on POSIX-style strings for both paths and keys. Absolute paths, ``..`` that climbs out
    of the root and backslashes raise ``PathOutsideRoot``; then, unless ``check_names`` is off,
    names ``check_name`` refuses raise ``UnsupportedName``. Symlinks are the storage layer's
    business (it resolves them against the real root).
    """
    if not relative or relative.startswith("/") or "\\" in relative:
        raise PathOutsideRoot(f"{relative!r} is not a relative path inside the watched root")
    joined = posixpath.normpath(posixpath.join(base or ".", relative))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise PathOutsideRoot(f"{relative!r} leads outside the watched root")
    if check_names:
        check_name(relative)
    return joined


def check_key(key: str) -> str:
    """Refuse keys that are not plain relative paths; returns ``key`` unchanged."""
    if key.startswith("/"):
        raise PathOutsideRoot(f"key {key!r} starts with '/'")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise PathOutsideRoot(f"key {key!r} contains control characters")
    if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        raise PathOutsideRoot(f"key {key!r} has an empty, '.' or '..' segment")
    return key


def normalise_prefix(prefix: str | None) -> str:
    """``"a/b"`` and ``"a/b/"`` both mean the folder ``a/b/``; ``""``/None is the whole bucket."""
    prefix = (prefix or "").strip("/")
    if prefix:
        check_key(prefix)
        return prefix + "/"
    return ""
