"""Build one static HTML page (report.html) showing every pair result under a folder.

The page is a single file: A/B previews are small JPEGs embedded as data URIs, the diff images
and full-size inputs are relative links (lazy-loaded), so it opens from ``file://`` with no
server and no network. Everything taken from results (file names, model output, error messages)
is HTML-escaped by the template engine, and a Content-Security-Policy that only allows the
page's own script and style (by hash) backs that up.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import get_args
from urllib.parse import quote

import jinja2
from pydantic import ValidationError

from handler.config import Settings
from handler.errors import PairError
from handler.jobs import MAX_RESULT_BYTES
from handler.logs import elapsed_ms, get_logger
from handler.pairs import RESULT_NAME, RESULT_SUFFIX, is_ignored_name
from handler.result import ComparisonResult, RegionKind
from handler.storage import LocalStorage
from handler.thumbnails import DEFAULT_EDGE, thumbnail
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE

DEFAULT_OUTPUT = "report.html"
#: Row kinds, the status filter's values: an ok result is "similar" or "different".
KINDS = ("similar", "different", "error", "timeout", "unreadable")
#: Region kinds, in the order a row lists them (the result's own order).
REGION_KINDS: tuple[str, ...] = get_args(RegionKind)


def run(args: argparse.Namespace, settings: Settings) -> int:
    root: Path = args.dir
    if not root.is_dir():
        print(f"pairwatch report: {root} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.thumb_size < 0 or args.thumb_size > 1024:
        print("pairwatch report: --thumb-size must be between 0 and 1024", file=sys.stderr)
        return EXIT_USAGE
    output: Path = args.output or root / DEFAULT_OUTPUT
    try:
        report = build_report(
            root,
            output,
            title=args.title,
            thumb_size=args.thumb_size,
            max_input_bytes=settings.max_input_bytes,
            max_input_pixels=settings.max_input_pixels,
        )
    except (OSError, PairError) as exc:
        # Reading is failure-proof (unreadable results and inputs become rows and notes), so
        # this is the page's own write: a missing or read-only folder, a folder named as output.
        reason = exc.message if isinstance(exc, PairError) else exc.strerror or str(exc)
        print(f"pairwatch report: cannot write {output}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts.items() if n)
    print(f"{output}: {report.pairs} pairs ({counts or 'none found'})")
    return EXIT_OK


@dataclass(frozen=True)
class HtmlReport:
    """The page ``build_report`` wrote: where, how many pairs, how many of each kind, its size.

    Not a pair job's outcome (``handler.jobs.JobReport``) nor a bucket event's
    (``handler.bucket_jobs.EventReport``)."""

    path: Path
    pairs: int
    counts: dict[str, int]
    bytes: int


@dataclass
class Preview:
    """One input as the page shows it: a link to the file and an embedded thumbnail."""

    label: str
    name: str
    path: Path | None = None
    href: str | None = None
    data_uri: str | None = None
    width: int = 0
    height: int = 0
    note: str | None = None


@dataclass
class Entry:
    """One row of the report: a parsed result, or why its file could not be parsed."""

    source: str
    href: str | None = None
    result: ComparisonResult | None = None
    problem: str | None = None
    previews: list[Preview] = field(default_factory=list)
    diff_href: str | None = None

    @property
    def kind(self) -> str:
        if self.result is None:
            return "unreadable"
        if self.result.status != "ok":
            return self.result.status
        return "similar" if self.result.is_similar else "different"

    @property
    def name(self) -> str:
        return self.result.pair_id if self.result else self.source

    @property
    def region_kinds(self) -> dict[str, int]:
        """How many regions of each kind (changed, added, removed, moved), in that order."""
        if self.result is None:
            return {}
        found: Counter[str] = Counter(region.kind for region in self.result.changed_regions)
        return {kind: found[kind] for kind in REGION_KINDS if found[kind]}

    @property
    def similarity(self) -> float:
        """For sorting; failures sort as -1 so "most different first" puts them on top."""
        if self.result is None or self.result.similarity is None:
            return -1.0
        return self.result.similarity

    @property
    def created(self) -> str:
        return self.result.created_at.isoformat() if self.result else ""


def is_result_name(name: str) -> bool:
    """A result the handler wrote, matched case-blind like ``handler.pairs.is_output_name``."""
    base = posixpath.basename(name).lower()
    return not is_ignored_name(base) and (base == RESULT_NAME or base.endswith(RESULT_SUFFIX))


def find_results(root: Path) -> Iterator[Path]:
    """Every ``result.json`` and ``NAME.result.json`` under ``root``, skipping the folders and
    files the watchers ignore (hidden, temporary)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_ignored_name(d))
        for name in sorted(files):
            if is_result_name(name):
                yield Path(folder, name)


def build_report(
    root: Path,
    output: Path,
    *,
    title: str | None = None,
    thumb_size: int = DEFAULT_EDGE,
    max_input_bytes: int,
    max_input_pixels: int,
) -> HtmlReport:
    """Write the report for every result under ``root`` to ``output`` (atomically)."""
    started = time.perf_counter()
    log = get_logger()
    storage = LocalStorage(root)
    out_dir = output.parent.resolve()
    entries = [_load_entry(storage, path, out_dir) for path in find_results(storage.root)]
    if thumb_size:
        jobs = [p for e in entries for p in e.previews if p.path is not None]

        def fill(preview: Preview) -> None:
            _fill_thumbnail(preview, thumb_size, max_input_bytes, max_input_pixels)

        # Pillow releases the GIL while decoding: threads give real parallelism here.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, jobs))
    entries.sort(key=lambda e: (e.similarity, e.name))
    counts = Counter(e.kind for e in entries)
    html = render_html(
        entries,
        title=title or storage.root.name or str(storage.root),
        counts={kind: counts.get(kind, 0) for kind in KINDS},
    )
    data = html.encode("utf-8")
    LocalStorage(out_dir).write_atomic(output.name, data)
    log.info(
        "report_written",
        path=str(output),
        pairs=len(entries),
        bytes=len(data),
        duration_ms=elapsed_ms(started),
        **{kind: counts.get(kind, 0) for kind in KINDS},
    )
    return HtmlReport(output, len(entries), {k: counts.get(k, 0) for k in KINDS}, len(data))


def _load_entry(storage: LocalStorage, path: Path, out_dir: Path) -> Entry:
    source = storage.relative(path)
    entry = Entry(source=source)
    try:
        # Through the storage layer: a result.json symlinked from outside the root is refused.
        data = storage.read(source, MAX_RESULT_BYTES)
        entry.href = _href(path, out_dir)
        entry.result = ComparisonResult.model_validate_json(data)
    except PairError as exc:
        entry.problem = exc.message
        return entry
    except ValidationError as exc:
        entry.problem = "not a pairwatch result: " + _validation_summary(exc)
        return entry
    folder = posixpath.dirname(source)
    for label, info in zip("AB", entry.result.inputs, strict=True):
        preview = Preview(label=label, name=info.name)
        found = _resolve(storage, folder, info.name)
        if isinstance(found, Path):
            preview.path, preview.href = found, _href(found, out_dir)
        else:
            preview.note = found
        entry.previews.append(preview)
    if entry.result.diff_image:
        diff = _resolve(storage, folder, entry.result.diff_image)
        if isinstance(diff, Path):
            entry.diff_href = _href(diff, out_dir)
    return entry


def _validation_summary(exc: ValidationError, limit: int = 3) -> str:
    problems = [
        f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
        for err in exc.errors()[:limit]
    ]
    more = exc.error_count() - limit
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _resolve(storage: LocalStorage, folder: str, name: str) -> Path | str:
    """The file a result names (beside the result, else from the root), or why there is none.

    Names come from result files, i.e. untrusted: the storage layer refuses any that lead
    outside the root (``..``, absolute paths, symlinks).
    """
    reason = "file not found"
    for relative in dict.fromkeys((posixpath.join(folder, name), name)):
        try:
            path = storage.path(relative)
        except PairError as exc:
            reason = exc.message
            continue
        if path.is_file():
            return path
    return reason


def _fill_thumbnail(preview: Preview, edge: int, max_bytes: int, max_pixels: int) -> None:
    assert preview.path is not None
    try:
        thumb = thumbnail(preview.path, edge=edge, max_bytes=max_bytes, max_pixels=max_pixels)
    except PairError as exc:
        preview.note = f"no preview: {exc.message}"
        return
    except Exception as exc:
        # A preview is cosmetic: a decoder bug on one odd file must not cost the whole report.
        get_logger().warning("preview_failed", path=str(preview.path), error=repr(exc))
        preview.note = f"no preview: {type(exc).__name__}"
        return
    preview.data_uri = "data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode("ascii")
    preview.width, preview.height = thumb.width, thumb.height


def _href(path: Path, out_dir: Path) -> str:
    """A relative URL from the report to ``path``; quoting every ``:`` means no scheme ever."""
    relative = Path(os.path.relpath(path, out_dir)).as_posix()
    return quote(relative, safe="/")


@cache
def _environment() -> jinja2.Environment:
    # autoescape=True for every template: all text from results is escaped unless marked safe.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("watcher", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _asset(name: str) -> str:
    return resources.files("watcher").joinpath("templates", name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def render_html(entries: list[Entry], *, title: str, counts: dict[str, int]) -> str:
    style, script = _asset("report.css"), _asset("report.js")
    csp = (
        "default-src 'none'; img-src 'self' data: file:; "
        f"style-src {_csp_hash(style)}; script-src {_csp_hash(script)}; "
        "base-uri 'none'; form-action 'none'"
    )
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            entries=entries,
            title=title,
            counts=counts,
            total=len(entries),
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            csp=csp,
            style=style,
            script=script,
        )
    )
