"""One pair job, whatever the source: resolve the pair, skip it if done, compare, write results.

A watcher (local folder, S3, MinIO) only has to notice *which* pair may have changed and call
``run_pair_job``; everything about what a pair is and when it is done lives here, on top of a
small ``PairStorage`` protocol (``handler.storage.LocalStorage`` is one; an S3 prefix is another).

Idempotency: a pair is compared again only when its existing result does not record the same
request: the same input names and sha256 values, the same effective config and the same
comparator. Re-running a job is therefore always safe, which is what lets the watchers rescan
after downtime or a queue overflow instead of keeping state of their own.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from handler.compare.base import Comparator
from handler.config import ComparisonConfig, Settings
from handler.errors import (
    RETRYABLE_ERROR_TYPES,
    AmbiguousPair,
    IncompletePair,
    InputNotFound,
    PairError,
)
from handler.logs import elapsed_ms, get_logger
from handler.pairs import (
    DIFF_NAME,
    RESULT_NAME,
    folder_images,
    is_ignored_name,
    is_image_name,
    is_manifest_name,
    join_relative,
    manifest_diff_name,
    manifest_result_name,
    manifest_stem,
    parse_manifest,
)
from handler.pipeline import ImageInput, compare_pair, failure_result
from handler.result import ComparisonResult, InputInfo

#: Manifests are a few hundred bytes; anything much bigger is not one.
MAX_MANIFEST_BYTES = 1024 * 1024
#: Results hold text and numbers only (the VL raw text is capped by the model's token limit).
MAX_RESULT_BYTES = 16 * 1024 * 1024
#: Name recorded for the partner that never arrived (``incomplete_pair``).
MISSING_INPUT = ""


class PairStorage(Protocol):
    """What a job needs from where the pairs live; paths are POSIX, relative to the root."""

    def read(self, relative: str, max_bytes: int) -> bytes:
        """The whole file; ``PairError`` (``InputNotFound``, ``PathOutsideRoot``...) otherwise."""
        ...

    def write_atomic(self, relative: str, data: bytes) -> object:
        """Replace ``relative`` so that readers see the old file or the new one, never half."""
        ...

    def list_names(self, folder: str) -> list[str]:
        """Sorted file names directly in ``folder`` ("" is the root); [] if it is gone."""
        ...

    def landed_at(self, relative: str) -> float:
        """Unix time ``relative`` arrived (a lone image's partner is awaited from then)."""
        ...


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
    manifest is its own pair. Manifests that *reference* an image are the caller's to track
    (``JobReport.inputs`` tells which files each manifest read).
    """
    if is_ignored_path(relative):
        return []
    if is_manifest_name(relative):
        return [PairSpec("manifest", relative)]
    folder = posixpath.dirname(relative)
    if is_image_name(relative) and folder:
        return [PairSpec("folder", folder)]
    return []


Outcome = Literal["written", "skipped", "waiting", "none", "unwritable"]


@dataclass(frozen=True)
class JobReport:
    """What a job did.

    ``written``: a new result (ok or error) was written · ``skipped``: the existing result
    already answers this request (``result`` is that one) · ``waiting``: a lone image still
    within ``pair_timeout`` (ask again in ``retry_in`` seconds) · ``none``: not a pair (empty
    folder, manifest gone, a folder holding manifests) · ``unwritable``: compared, but the
    result could not be written.
    """

    spec: PairSpec
    outcome: Outcome
    result: ComparisonResult | None = None
    #: Files the pair reads (relative to the root): when one changes, the pair is due again.
    inputs: tuple[str, ...] = ()
    retry_in: float | None = None

    @property
    def failed(self) -> bool:
        if self.outcome == "unwritable":
            return True
        return self.result is not None and self.result.status != "ok"


@dataclass(frozen=True)
class _Plan:
    """A resolved pair: what to read, under which names, with which config."""

    paths: tuple[str, str]
    names: tuple[str, str]
    config: ComparisonConfig


@dataclass(frozen=True)
class _Problem:
    """A pair-level failure found before anything was compared."""

    error: PairError
    names: tuple[str, str]
    config: ComparisonConfig
    inputs: tuple[str, ...] = ()
    failed_input: str | None = None


def run_pair_job(
    storage: PairStorage,
    spec: PairSpec,
    settings: Settings,
    comparator: Comparator,
    *,
    now: float | None = None,
    queued_ms: float | None = None,
) -> JobReport:
    """Bring ``spec``'s result up to date. Per-pair failures become error results, never raise.

    ``now`` (Unix time) is when a lone image's wait is measured to (tests pass it explicitly);
    ``queued_ms``, how long the caller's queue held the pair, is logged with ``pair_started``.
    """
    log = get_logger(pair_id=spec.pair_id)
    started = time.perf_counter()
    resolved = _resolve(storage, spec, settings, time.time() if now is None else now)
    if isinstance(resolved, JobReport):
        return resolved
    if isinstance(resolved, _Problem):
        result = failure_result(
            spec.pair_id,
            resolved.error,
            [InputInfo(name=name) for name in resolved.names],
            resolved.config,
            comparator.info,
            failed_input=resolved.failed_input,
        )
        existing = _existing_result(storage, spec)
        if existing is not None and _same_failure(existing, result):
            return JobReport(spec, "skipped", existing, resolved.inputs)
        log.warning(
            "pair_failed",
            error_type=resolved.error.type,
            error=resolved.error.message,
            input=resolved.failed_input,
            duration_ms=elapsed_ms(started),
        )
        return _write(storage, spec, result, None, resolved.inputs, started, log)

    plan = resolved
    existing = _existing_result(storage, spec)
    if existing is not None and _answers(
        existing, spec.pair_id, plan, comparator, storage, settings
    ):
        log.debug("pair_skipped", reason="result_up_to_date", status=existing.status)
        return JobReport(spec, "skipped", existing, plan.paths)
    log.info("pair_started", kind=spec.kind, inputs=list(plan.paths), queued_ms=queued_ms)
    a, b = (
        ImageInput(
            name, partial(storage.read, path, settings.max_input_bytes), _etag(storage, path)
        )
        for name, path in zip(plan.names, plan.paths, strict=True)
    )
    outcome = compare_pair(
        spec.pair_id,
        a,
        b,
        plan.config,
        comparator,
        max_input_pixels=settings.max_input_pixels,
        diff_image=settings.diff_image,
        cache_mb=settings.cache_mb,
    )
    return _write(storage, spec, outcome.result, outcome.diff_png, plan.paths, started, log)


def pair_files(
    storage: PairStorage, spec: PairSpec, settings: Settings, *, now: float | None = None
) -> tuple[str, ...]:
    """The files ``spec`` consists of right now (a manifest first, then the images it names),
    found without reading any image: a watcher checks that they are all completely written
    before it runs the job."""
    resolved = _resolve(storage, spec, settings, time.time() if now is None else now)
    inputs = resolved.paths if isinstance(resolved, _Plan) else resolved.inputs
    return (spec.path, *inputs) if spec.kind == "manifest" else inputs


def _resolve(
    storage: PairStorage, spec: PairSpec, settings: Settings, now: float
) -> _Plan | _Problem | JobReport:
    if spec.kind == "manifest":
        return _resolve_manifest(storage, spec, settings.comparison)
    return _resolve_folder(storage, spec, settings, now)


def _resolve_folder(
    storage: PairStorage, spec: PairSpec, settings: Settings, now: float
) -> _Plan | _Problem | JobReport:
    config = settings.comparison
    try:
        names = storage.list_names(spec.folder)
    except PairError as exc:
        return _Problem(exc, (spec.folder, MISSING_INPUT), config)
    if any(is_manifest_name(name) for name in names):
        # A folder holding manifests is paired explicitly: its images are not one folder-pair.
        return JobReport(spec, "none")
    images = folder_images(names)
    paths = tuple(posixpath.join(spec.folder, name) for name in images)
    if len(images) == 2:
        return _Plan((paths[0], paths[1]), (images[0], images[1]), config)
    if len(images) > 2:
        error: PairError = AmbiguousPair(
            f"{len(images)} images in {spec.folder}/; a pair folder holds exactly two: "
            + ", ".join(images)
        )
        return _Problem(error, (images[0], images[1]), config, paths)
    if not images:
        return JobReport(spec, "none")
    try:
        waited = now - storage.landed_at(paths[0])
    except InputNotFound:
        return JobReport(spec, "none")
    except PairError as exc:
        return _Problem(exc, (images[0], MISSING_INPUT), config, paths, "a")
    if waited < settings.pair_timeout:
        return JobReport(spec, "waiting", inputs=paths, retry_in=settings.pair_timeout - waited)
    error = IncompletePair(
        f"only one image ({images[0]}) in {spec.folder}/ after waiting "
        f"{settings.pair_timeout:g} s for its partner"
    )
    return _Problem(error, (images[0], MISSING_INPUT), config, paths)


def _resolve_manifest(
    storage: PairStorage, spec: PairSpec, base: ComparisonConfig
) -> _Plan | _Problem | JobReport:
    try:
        manifest = parse_manifest(storage.read(spec.path, MAX_MANIFEST_BYTES))
    except InputNotFound:
        return JobReport(spec, "none")  # deleted (or renamed away) meanwhile: nothing to answer
    except PairError as exc:
        return _Problem(exc, (spec.path, MISSING_INPUT), base)
    names = (manifest.a, manifest.b)
    paths: list[str] = []
    for slot, relative in zip("ab", names, strict=True):
        try:
            paths.append(join_relative(spec.folder, relative))
        except PairError as exc:
            return _Problem(exc, names, base, tuple(paths), slot)
    try:
        config = manifest.config(base)
    except PairError as exc:
        return _Problem(exc, names, base, tuple(paths))
    return _Plan((paths[0], paths[1]), names, config)


def _existing_result(storage: PairStorage, spec: PairSpec) -> ComparisonResult | None:
    """The result already beside the pair, if there is a readable, valid one."""
    try:
        data = storage.read(spec.result_path, MAX_RESULT_BYTES)
        return ComparisonResult.model_validate_json(data)
    except (PairError, ValidationError):
        return None


def _answers(
    existing: ComparisonResult,
    pair_id: str,
    plan: _Plan,
    comparator: Comparator,
    storage: PairStorage,
    settings: Settings,
) -> bool:
    """Does ``existing`` answer this exact request (pair, inputs by content, config, comparator)?"""
    info = comparator.info
    if existing.error is not None and existing.error.type in RETRYABLE_ERROR_TYPES:
        return False
    if (existing.comparator.name, existing.comparator.model) != (info.name, info.model):
        return False
    if existing.pair_id != pair_id:
        return False  # the folder or manifest was renamed: the result must say its new name
    if existing.config != plan.config or tuple(i.name for i in existing.inputs) != plan.names:
        return False
    for info_recorded, path in zip(existing.inputs, plan.paths, strict=True):
        current_etag = _etag(storage, path)
        if info_recorded.etag is not None and current_etag is not None:
            # An object store's ETag names one version: equal tags, same bytes; no download.
            if info_recorded.etag != current_etag:
                return False
            continue
        recorded = info_recorded.sha256
        if recorded is None:
            return False
        try:
            data = storage.read(path, settings.max_input_bytes)
        except PairError:
            return False  # let the comparison meet the problem and report it
        if hashlib.sha256(data).hexdigest() != recorded:
            return False
    return True


@runtime_checkable
class VersionedStorage(Protocol):
    """A storage whose files carry a version tag (S3's ETag), recorded in results."""

    def etag(self, relative: str) -> str | None: ...


def _etag(storage: PairStorage, path: str) -> str | None:
    if not isinstance(storage, VersionedStorage):
        return None
    try:
        return storage.etag(path)
    except PairError:
        return None  # missing or unreadable: the comparison meets the problem and reports it


def _same_failure(existing: ComparisonResult, new: ComparisonResult) -> bool:
    """A pair-level failure that is already reported, word for word."""
    return (
        existing.pair_id == new.pair_id
        and existing.status == new.status
        and existing.error == new.error
        and existing.config == new.config
        and [i.name for i in existing.inputs] == [i.name for i in new.inputs]
    )


def _write(
    storage: PairStorage,
    spec: PairSpec,
    result: ComparisonResult,
    diff_png: bytes | None,
    inputs: tuple[str, ...],
    started: float,
    log: Any,
) -> JobReport:
    """Diff image first, then the result that names it: a result never points at nothing."""
    write_start = time.perf_counter()
    try:
        if diff_png is not None:
            storage.write_atomic(spec.diff_path, diff_png)
            result = result.model_copy(update={"diff_image": posixpath.basename(spec.diff_path)})
        text = result.to_json().encode()
        storage.write_atomic(spec.result_path, text)
    except (OSError, PairError, PydanticSerializationError) as exc:  # the last: non-UTF-8 names
        log.error(
            "pair_failed",
            error_type="output_unwritable",
            error=str(exc),
            path=spec.result_path,
            duration_ms=elapsed_ms(started),
        )
        return JobReport(spec, "unwritable", result, inputs)
    log.info(
        "result_written",
        status=result.status,
        path=spec.result_path,
        bytes=len(text),
        diff_image=result.diff_image,
        write_ms=elapsed_ms(write_start),
        duration_ms=elapsed_ms(started),
    )
    return JobReport(spec, "written", result, inputs)
