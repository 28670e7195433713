"""One pair job, whatever the source: resolve the pair once into a ``Plan``, then run it.

A source (local folder, S3, MinIO, SQS, the Lambda) only notices *which* pair may have changed;
everything about what a pair is and when it is done lives here, on top of the small
``handler.storage.PairStorage`` protocol (``LocalStorage`` is one; an S3 prefix is another).

The job is pure with respect to time: ``now`` is passed in, nothing sleeps. It returns a
``JobReport`` carrying its ``Disposition`` (``handler.disposition``), which is what the source
acts on:

* ``done``: the result is up to date (written now, already there, written by another worker),
  or a *final* failure is written (a bad image, a bad manifest, ``incomplete_pair``...);
* ``retry``: a failure of the moment (``RETRYABLE_ERROR_TYPES``: the error result is written
  so that users see the state, but it never counts as final), the store unavailable, the result
  unwritable for the moment (a full disk, a read-only remount, a throttled store), the pair
  busy in another process, or a lone image (``at`` = when its partner is due,
  ``incomplete_pair`` then) or a manifest whose images have not all arrived;
* and two ends decided once: a pair whose folder (or inputs) vanished while it was compared is
  ``done`` (``pair_vanished``: nothing is left to answer); a result the process may not write
  (a folder's or a bucket's permissions) is ``done`` too, logged as a final
  ``output_unwritable`` failure: comparing it again would meet the same refusal;
* ``reject`` is decided by the sources (a hostile key, a malformed event): a job never rejects.

Time: one ``handler.deadline.Deadline`` per pair (``processing_timeout``, the deployment's a
ceiling a manifest may lower), started by whoever took the pair (the runner, ``serve``; else
when the job starts), over resolving, fetching, preparing, detecting, comparing and writing; a
pair past it gets a ``timeout`` result naming its stage. The result of a pair that used its
time up is still written, within ``WRITE_GRACE_S``.

Idempotency: a pair is compared again only when its existing result does not record the same
request: the same input names and sha256 values (ETags on S3), the same effective config and
the same comparator. Re-running a job is therefore always safe, which is what lets the watchers
rescan after downtime or a queue overflow instead of keeping state of their own. The check runs
under the pair's lock (``handler.locks``), so of two runners only one compares.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from handler import disposition
from handler.compare.base import Comparator
from handler.config import ComparisonConfig, Settings
from handler.deadline import Deadline, current_or_new
from handler.disposition import Disposition
from handler.errors import (
    RETRYABLE_ERROR_TYPES,
    AmbiguousPair,
    IncompletePair,
    InputNotFound,
    PairError,
    ResultConflict,
    StorageUnavailable,
)
from handler.locks import pair_lock
from handler.logs import elapsed_ms, get_logger
from handler.pairs import (
    PairSpec,
    folder_images,
    is_manifest_name,
    join_relative,
    parse_manifest,
)
from handler.pipeline import ImageInput, compare_pair_with_settings, pair_deadline
from handler.result import ComparisonResult, InputInfo, failure_result
from handler.storage import HashingStorage, PairStorage, VersionedStorage

#: Manifests are a few hundred bytes; anything much bigger is not one.
MAX_MANIFEST_BYTES = 1024 * 1024
#: Results hold text and numbers only (the VL raw text is capped by the model's token limit).
MAX_RESULT_BYTES = 16 * 1024 * 1024
#: Name recorded for the partner that never arrived (``incomplete_pair``).
MISSING_INPUT = ""
#: A pair busy in another process is looked at again this soon (it is usually done by then).
BUSY_RETRY_S = 1.0
#: A result is written within this much time even when the comparison used the pair's time up
#: (a timeout result above all): the write is bounded, but never left without a chance.
WRITE_GRACE_S = 5.0

#: What a job did: ``written`` a new result (ok or error) · ``skipped`` the existing result
#: already answers (``result`` is that one) · ``waiting`` a lone image within ``pair_timeout``
#: · ``none`` not a pair (empty folder, manifest gone, a folder holding manifests) ·
#: ``unwritable`` compared, but the result could not be stored · ``vanished`` its folder or
#: inputs were removed while it was compared · ``busy`` the pair is in hand in another process
#: · ``unavailable`` the store failed for the moment · ``deferred`` the caller's gate held it
#: back (a watched folder's files still being written: they bring the pair back once settled).
Action = Literal[
    "written",
    "skipped",
    "waiting",
    "none",
    "unwritable",
    "vanished",
    "busy",
    "unavailable",
    "deferred",
]
#: A caller's check of a resolved plan before anything is read: True holds the pair back
#: (``deferred``). The folder watcher's is "are all of ``plan.files`` completely written?".
Gate = Callable[["Plan"], bool]


@dataclass(frozen=True)
class JobReport:
    """What a job did (logs, ``--once`` summaries) and what should happen next."""

    spec: PairSpec
    action: Action
    disposition: Disposition
    result: ComparisonResult | None = None
    #: Files the pair reads (relative to the root): when one changes, the pair is due again.
    inputs: tuple[str, ...] = ()
    #: Seconds spent in the stages the result does not time: ``fetch`` (reading both inputs
    #: from the store) and ``write`` (storing the diff image and the result), where they ran.
    stages: Mapping[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        if self.action in ("unwritable", "unavailable"):
            return True
        return self.result is not None and self.result.status != "ok"


@dataclass(frozen=True)
class Plan:
    """A pair resolved once: what to read, under which names, with which config.

    Exactly one of: comparable (two ``inputs``), ``problem`` (a pair-level failure found
    before anything was compared), ``partner_due`` (a lone image), or not ``is_pair``.
    """

    spec: PairSpec
    config: ComparisonConfig
    names: tuple[str, str] = (MISSING_INPUT, MISSING_INPUT)
    #: Files the pair reads besides a manifest itself (relative to the root), in pair order.
    inputs: tuple[str, ...] = ()
    problem: PairError | None = None
    failed_input: str | None = None
    #: A lone image: the Unix time its partner is due (``incomplete_pair`` from then).
    partner_due: float | None = None
    is_pair: bool = True
    #: A manifest: the Unix time it landed (its images are awaited until ``pair_timeout``).
    landed: float | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Everything the job reads (a manifest first): a watcher checks they are complete."""
        return (self.spec.path, *self.inputs) if self.spec.kind == "manifest" else self.inputs


def run_pair_job(
    storage: PairStorage,
    spec: PairSpec,
    settings: Settings,
    comparator: Comparator,
    *,
    now: float,
    queued_ms: float | None = None,
    deadline: Deadline | None = None,
    gate: Gate | None = None,
) -> JobReport:
    """Resolve ``spec`` and bring its result up to date (``resolve`` then ``run_plan``), both
    within the pair's ``deadline`` (see ``run_plan``). A ``gate`` that holds the plan back makes
    it ``deferred`` (done for now: whatever holds it back brings it back)."""
    deadline = deadline or current_or_new(settings.comparison.processing_timeout)
    try:
        with deadline.applied():
            plan = resolve(storage, spec, settings, now)
    except StorageUnavailable as exc:
        return _unavailable(spec, exc)
    if gate is not None and gate(plan):
        get_logger(pair_id=spec.pair_id).debug("pair_deferred", reason="being_written")
        deferred = disposition.done("deferred until its files settle")
        return JobReport(spec, "deferred", deferred, None, plan.inputs)
    return run_plan(
        storage, plan, settings, comparator, now=now, queued_ms=queued_ms, deadline=deadline
    )


def run_plan(
    storage: PairStorage,
    plan: Plan,
    settings: Settings,
    comparator: Comparator,
    *,
    now: float,
    queued_ms: float | None = None,
    deadline: Deadline,
) -> JobReport:
    """Bring ``plan``'s result up to date. Per-pair failures become error results, never raise.

    ``now`` (Unix time) is what a lone image's or a manifest's wait is measured to;
    ``queued_ms``, how long the caller's queue held the pair, is logged with ``pair_started``.
    ``deadline``: the pair's (``run_pair_job``'s), shortened to the plan's own
    ``processing_timeout``.
    """
    deadline = pair_deadline(deadline, plan.config)
    spec = plan.spec
    if not plan.is_pair:
        return JobReport(spec, "none", disposition.done("not a pair"))
    if plan.partner_due is not None:
        get_logger(pair_id=spec.pair_id).debug("pair_waiting", partner_due=plan.partner_due)
        wait = disposition.retry("lone image: waiting for its partner", plan.partner_due)
        return JobReport(spec, "waiting", wait, None, plan.inputs)
    with pair_lock(storage, spec.result_path) as held:
        if not held:
            get_logger(pair_id=spec.pair_id).debug("pair_busy", reason="in another process")
            retry = disposition.retry("pair in hand in another process", now + BUSY_RETRY_S)
            return JobReport(spec, "busy", retry, None, plan.inputs)
        try:
            with deadline.applied():
                return _run_locked(storage, plan, settings, comparator, now, queued_ms, deadline)
        except StorageUnavailable as exc:
            return _unavailable(spec, exc)
        except ResultConflict:
            get_logger(pair_id=spec.pair_id).info("pair_skipped", reason="another worker wrote it")
            done = disposition.done("another worker wrote it")
            return JobReport(spec, "skipped", done, None, plan.inputs)


def _unavailable(spec: PairSpec, exc: StorageUnavailable) -> JobReport:
    get_logger(pair_id=spec.pair_id).error(
        "storage_unavailable", error_type=type(exc).__name__, error=str(exc)
    )
    return JobReport(spec, "unavailable", disposition.retry(f"storage unavailable: {exc}"))


def _run_locked(
    storage: PairStorage,
    plan: Plan,
    settings: Settings,
    comparator: Comparator,
    now: float,
    queued_ms: float | None,
    deadline: Deadline,
) -> JobReport:
    spec = plan.spec
    log = get_logger(pair_id=spec.pair_id)
    started = time.perf_counter()
    existing = _existing_result(storage, spec)
    if plan.problem is not None:
        result = failure_result(
            spec.pair_id,
            plan.problem,
            [InputInfo(name=name) for name in plan.names],
            plan.config,
            comparator.info,
            failed_input=plan.failed_input,
        )
        if existing is not None and _same_failure(existing, result):
            return _report(plan, "skipped", existing, settings, now)
        log.warning(
            "pair_failed",
            error_type=plan.problem.type,
            error=plan.problem.message,
            input=plan.failed_input,
            duration_ms=elapsed_ms(started),
        )
        return _write(storage, plan, result, None, started, log, settings, now, {}, deadline)

    if existing is not None and _answers(existing, plan, comparator, storage, settings):
        log.debug("pair_skipped", reason="result_up_to_date", status=existing.status)
        return _report(plan, "skipped", existing, settings, now)
    log.info("pair_started", kind=spec.kind, inputs=list(plan.inputs), queued_ms=queued_ms)
    fetched: list[float] = []
    a, b = (
        ImageInput(
            name,
            _timed(partial(storage.read, path, settings.max_input_bytes), fetched),
            _etag(storage, path),
            partial(storage.digest, path) if isinstance(storage, HashingStorage) else None,
        )
        for name, path in zip(plan.names, plan.inputs, strict=True)
    )
    compared = compare_pair_with_settings(
        settings,
        spec.pair_id,
        a,
        b,
        plan.config,
        comparator,
        diff_image=settings.diff_image,
        deadline=deadline,
    )
    stages = {"fetch": sum(fetched)} if fetched else {}
    return _write(
        storage,
        plan,
        compared.result,
        compared.diff_png,
        started,
        log,
        settings,
        now,
        stages,
        deadline,
    )


def _timed(read: Callable[[], bytes], spent: list[float]) -> Callable[[], bytes]:
    """``read``, adding the seconds each call takes to ``spent``."""

    def load() -> bytes:
        start = time.perf_counter()
        try:
            return read()
        finally:
            spent.append(time.perf_counter() - start)

    return load


def _report(
    plan: Plan,
    action: Action,
    result: ComparisonResult,
    settings: Settings,
    now: float,
    stages: Mapping[str, float] | None = None,
) -> JobReport:
    fate = _fate(plan, result, settings, now)
    return JobReport(plan.spec, action, fate, result, plan.inputs, dict(stages or {}))


def _fate(plan: Plan, result: ComparisonResult, settings: Settings, now: float) -> Disposition:
    """Done unless the result records a failure of the moment, or a manifest's images may still
    be on their way (nothing else re-runs a manifest whose images sit in another prefix)."""
    error = result.error
    if error is None:
        return disposition.done()
    if error.type in RETRYABLE_ERROR_TYPES:
        return disposition.retry(f"{error.type}: {error.message}")
    pending = error.type == "input_not_found" and plan.landed is not None
    if pending and now - (plan.landed or now) < settings.pair_timeout:
        return disposition.retry(f"manifest inputs pending: {error.message}")
    return disposition.done(f"final failure: {error.type}")


def resolve(storage: PairStorage, spec: PairSpec, settings: Settings, now: float) -> Plan:
    """What ``spec`` consists of right now, found without reading any image.

    Raises only ``StorageUnavailable`` (the store failed for the moment).
    """
    if spec.kind == "manifest":
        return _resolve_manifest(storage, spec, settings.comparison)
    return _resolve_folder(storage, spec, settings, now)


def _resolve_folder(storage: PairStorage, spec: PairSpec, settings: Settings, now: float) -> Plan:
    config = settings.comparison
    try:
        names = storage.list_names(spec.folder)
    except PairError as exc:
        return Plan(spec, config, (spec.folder, MISSING_INPUT), problem=exc)
    if any(is_manifest_name(name) for name in names):
        # A folder holding manifests is paired explicitly: its images are not one folder-pair.
        return Plan(spec, config, is_pair=False)
    images = folder_images(names)
    paths = tuple(posixpath.join(spec.folder, name) for name in images)
    if len(images) == 2:
        return Plan(spec, config, (images[0], images[1]), paths)
    if len(images) > 2:
        error: PairError = AmbiguousPair(
            f"{len(images)} images in {spec.folder}/; a pair folder holds exactly two: "
            + ", ".join(images)
        )
        return Plan(spec, config, (images[0], images[1]), paths, problem=error)
    if not images:
        return Plan(spec, config, is_pair=False)
    lone = (images[0], MISSING_INPUT)
    try:
        due = storage.landed_at(paths[0]) + settings.pair_timeout
    except InputNotFound:
        return Plan(spec, config, is_pair=False)
    except PairError as exc:
        return Plan(spec, config, lone, paths, problem=exc, failed_input="a")
    if now < due:
        return Plan(spec, config, lone, paths, partner_due=due)
    error = IncompletePair(
        f"only one image ({images[0]}) in {spec.folder}/ after waiting "
        f"{settings.pair_timeout:g} s for its partner"
    )
    return Plan(spec, config, lone, paths, problem=error)


def _resolve_manifest(storage: PairStorage, spec: PairSpec, base: ComparisonConfig) -> Plan:
    try:
        manifest = parse_manifest(storage.read(spec.path, MAX_MANIFEST_BYTES))
    except InputNotFound:
        return Plan(spec, base, is_pair=False)  # deleted (or renamed away) meanwhile
    except PairError as exc:
        return Plan(spec, base, (spec.path, MISSING_INPUT), problem=exc)
    try:
        landed: float | None = storage.landed_at(spec.path)
    except PairError:
        landed = None
    names = (manifest.a, manifest.b)
    paths: list[str] = []
    for slot, relative in zip("ab", names, strict=True):
        try:
            paths.append(join_relative(spec.folder, relative))
        except PairError as exc:
            return Plan(spec, base, names, tuple(paths), exc, slot, landed=landed)
    try:
        config = manifest.config(base)
    except PairError as exc:
        return Plan(spec, base, names, tuple(paths), exc, landed=landed)
    return Plan(spec, config, names, (paths[0], paths[1]), landed=landed)


def _existing_result(storage: PairStorage, spec: PairSpec) -> ComparisonResult | None:
    """The result already beside the pair, if there is a readable, valid one."""
    try:
        data = storage.read(spec.result_path, MAX_RESULT_BYTES)
        return ComparisonResult.model_validate_json(data)
    except (PairError, ValidationError):
        return None


def _answers(
    existing: ComparisonResult,
    plan: Plan,
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
    if existing.pair_id != plan.spec.pair_id:
        return False  # the folder or manifest was renamed: the result must say its new name
    if existing.config != plan.config or tuple(i.name for i in existing.inputs) != plan.names:
        return False
    for info_recorded, path in zip(existing.inputs, plan.inputs, strict=True):
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
    plan: Plan,
    result: ComparisonResult,
    diff_png: bytes | None,
    started: float,
    log: Any,
    settings: Settings,
    now: float,
    stages: dict[str, float],
    deadline: Deadline,
) -> JobReport:
    """Diff image first, then the result that names it: a result never points at nothing.
    ``stages`` (seconds) gains ``write`` and goes into the report. The write has what is left
    of ``deadline``, at least ``WRITE_GRACE_S``."""
    spec = plan.spec
    write_start = time.perf_counter()
    writing = deadline.extended(WRITE_GRACE_S)
    try:
        with writing.applied():
            writing.enter("write")
            if diff_png is not None:
                storage.write_atomic(spec.diff_path, diff_png)
                named = posixpath.basename(spec.diff_path)
                result = result.model_copy(update={"diff_image": named})
            text = result.to_json().encode()
            storage.write_atomic(spec.result_path, text)
    # PydanticSerializationError: non-UTF-8 names.
    except (OSError, PairError, StorageUnavailable, PydanticSerializationError) as exc:
        return _unwritten(storage, plan, result, exc, started, log, stages)
    stages["write"] = time.perf_counter() - write_start
    log.info(
        "result_written",
        status=result.status,
        path=spec.result_path,
        bytes=len(text),
        diff_image=result.diff_image,
        write_ms=round(stages["write"] * 1000, 2),
        duration_ms=elapsed_ms(started),
    )
    return _report(plan, "written", result, settings, now, stages)


def _unwritten(
    storage: PairStorage,
    plan: Plan,
    result: ComparisonResult,
    exc: Exception,
    started: float,
    log: Any,
    stages: dict[str, float],
) -> JobReport:
    """A result that could not be stored: vanished, final (no permission) or to retry."""
    spec = plan.spec
    if isinstance(exc, FileNotFoundError) and _vanished(storage, plan):
        log.info("pair_vanished", path=spec.result_path, reason="removed while it was compared")
        return JobReport(spec, "vanished", disposition.done("pair vanished"), None, plan.inputs)
    final = isinstance(exc, PermissionError)
    log.error(
        "pair_failed",
        error_type="output_unwritable",
        error=str(exc),
        path=spec.result_path,
        final=final,
        duration_ms=elapsed_ms(started),
    )
    fate = (
        disposition.done(f"final failure: result not writable ({exc})")
        if final
        else disposition.retry(f"result unwritable: {exc}")
    )
    return JobReport(spec, "unwritable", fate, result, plan.inputs, stages)


def _vanished(storage: PairStorage, plan: Plan) -> bool:
    """None of the pair's files is there any more (its folder was removed)."""
    if not plan.files:
        return False
    for path in plan.files:
        try:
            storage.landed_at(path)
        except InputNotFound:
            continue
        except PairError:
            return False
        return False
    return True
