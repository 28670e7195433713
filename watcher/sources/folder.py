"""The local-folder source: filesystem events and a catch-up scan in, pair keys out; and
``pairwatch watch DIR``'s ``run`` (with its ``--once`` progress bar).

Threads: watchdog's observer thread only notes changed paths in the ``Settler``; the runner's
main loop calls ``pump``, which decides which pairs a settled file affects and offers each to
the runner (``watcher.runner``) as one pair job (``handler.jobs.run_pair_job``); the runner's
workers run the jobs, ``concurrency`` at a time, never one pair twice at once, and do the
bookkeeping after each. The job's gate is the settler: before a job reads anything, all of its
plan's files are checked to be completely written; an unsettled one holds the pair back
(``deferred``) until it settles.

Start-up: the observer starts first, then a catch-up scan walks the folder, so nothing dropped
in between is missed. The scan is lazy: it feeds the queue only while there is room (half of it
when events may arrive too), and an event that finds the queue full schedules one more scan
instead of growing a buffer; jobs are idempotent, so scanning again costs reads, not results.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO, cast

import structlog
from tqdm import tqdm
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from handler.config import Settings
from handler.jobs import JobReport, run_pair_job
from handler.logs import elapsed_ms, get_logger
from handler.manifests import pairs_touched
from handler.pairs import (
    PairSpec,
    is_ignored_name,
    is_ignored_path,
    is_manifest_name,
    is_relevant_name,
    pairs_for_name,
)
from handler.storage import LocalStorage, remove_stale_temporaries
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from watcher.runner import Runner
from watcher.shutdown import StopFlag
from watcher.sources.command import CannotWatch, watch
from watcher.sources.settle import Change, Settler

_WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileAttribEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.dir.is_dir():
        print(f"pairwatch: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    # The comparator starts loading now; the folder is watched and scanned meanwhile, and pairs
    # wait in the queue until it is ready. The source logs its own start and stop.
    watched = watch(
        settings,
        lambda runner: FolderSource(
            args.dir, settings, runner, polling=args.polling, once=args.once
        ),
        loop=partial(_watch_folder, folder=args.dir, progress=args.once and sys.stderr.isatty()),
    )
    if watched is None:
        return EXIT_FAILED
    if args.once and not watched.stop.requested and watched.source.summary.any_failed:
        return EXIT_FAILED
    return EXIT_OK


def _watch_folder(
    runner: Runner[PairSpec], watcher: FolderSource, stop: StopFlag, *, folder: Path, progress: bool
) -> None:
    """The folder's loop: its own (it logs its start and stop), under the ``--once`` bar."""
    del runner  # the source holds it
    with _progress(watcher, progress):
        try:
            watcher.run(stop)
        except OSError as exc:
            # e.g. the inotify watch limit (fs.inotify.max_user_watches) is reached.
            print(f"pairwatch: cannot watch {folder}: {exc}", file=sys.stderr)
            raise CannotWatch from exc


@contextmanager
def _progress(watcher: FolderSource, enabled: bool) -> Iterator[None]:
    """A progress bar for ``--once`` on a terminal; log lines are printed above it."""
    if not enabled:
        yield
        return
    queue = watcher.runner.queue
    bar = tqdm(total=len(queue), unit="pair", file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()

    def advance() -> None:
        with lock:  # reports come from the runner's worker threads
            # This pair is still in flight: done (n + 1) + the others in flight + the queue.
            bar.total = max(bar.total or 0, bar.n + len(queue) + watcher.runner.in_flight())
            bar.update(1)

    watcher.summary.on_report = advance
    above_bar = cast(TextIO, _AboveBar())
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=above_bar))
    try:
        yield
    finally:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
        bar.close()


class _AboveBar:
    """A file for structlog that writes through ``tqdm.write`` so the bar is redrawn below."""

    def write(self, text: str) -> int:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass
class Summary:
    """The latest report per pair (kept for ``--once`` runs only) and counters for the log: the
    runner's reporter (``watcher.runner.Reporter``), called from its workers."""

    keep_reports: bool = False
    reports: dict[PairSpec, JobReport] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    crashed: set[PairSpec] = field(default_factory=set)
    #: Called after every job that was not held back (the CLI's progress bar).
    on_report: Callable[[], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, report: JobReport) -> None:
        if report.action == "deferred":
            return  # not a pair done: it comes back once its files settle
        key = "failed" if report.failed else report.action
        if self.on_report is not None:
            self.on_report()
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if self.keep_reports:
                self.reports[report.spec] = report
                self.crashed.discard(report.spec)

    def add_crash(self, spec: PairSpec) -> None:
        with self._lock:
            self.counts["failed"] = self.counts.get("failed", 0) + 1
            if self.keep_reports:
                self.reports.pop(spec, None)
                self.crashed.add(spec)

    @property
    def any_failed(self) -> bool:
        with self._lock:
            return bool(self.crashed) or any(r.failed for r in self.reports.values())


class FolderSource:
    """``DIR`` as a source of pair keys (``PairSpec``) for a ``Runner``."""

    def __init__(
        self,
        root: Path,
        settings: Settings,
        runner: Runner[PairSpec],
        *,
        polling: bool = False,
        once: bool = False,
    ) -> None:
        self.storage = LocalStorage(root)
        self.root = self.storage.root
        self.settings = settings
        self.runner = runner
        self.polling = polling
        self.once = once
        # Polling sees no open/close events, so it relies on the settle time alone.
        self.settler = Settler(settings.settle_time, track_close=not polling)
        self._gate = self.settler.gate(self.root)
        self.summary = Summary(keep_reports=once)
        runner.reporter = self.summary
        #: Set once the start-up scan has queued every pending pair (events are watched by then).
        self.caught_up = threading.Event()
        self._scanner: Iterator[PairSpec] | None = None
        self._rescan = False
        self._observer: BaseObserver | None = None
        self._log = get_logger(root=str(self.root))

    # -- what the runner calls ----------------------------------------------------------------

    def start(self) -> None:
        """Watch first, then scan: nothing dropped in between is missed."""
        if not self.once:
            self._observer = self._start_observer()
        remove_stale_temporaries(self.root)
        self._scanner = self._scan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def finished(self) -> bool:
        """``--once``: the scan is done and no file is still settling."""
        return self.once and self._scanner is None and not len(self.settler)

    def next_wait(self) -> float | None:
        return self.settler.next_due()

    def pump(self) -> None:
        """Offer work: settled files, then the scan (while the queue has room)."""
        for path, waited in self.settler.ready():
            for spec in self._pairs_for(self.storage.relative(path)):
                self._offer(spec, "event", settle_ms=round(waited * 1000, 2))
        if self._scanner is None and self._rescan:
            self._rescan = False
            self._log.warning("rescan_started", reason="queue_was_full")
            self._scanner = self._scan()
        queue = self.runner.queue
        limit = queue.maxsize if self.once else max(1, queue.maxsize // 2)
        while self._scanner is not None and len(queue) < limit:
            found = next(self._scanner, None)
            if found is None:
                self._scanner = None
                self.caught_up.set()
            else:
                self._offer(found, "scan")

    def _offer(self, spec: PairSpec, source: str, **extra: float) -> None:
        if spec in self.runner.queue:
            return  # coalesced with the job already waiting
        # The pair's job, gated on its files being completely written.
        job = partial(
            run_pair_job,
            self.storage,
            spec,
            self.settings,
            self.runner.comparator,
            gate=self._gate,
        )
        if not self.runner.offer_job(spec, job, "folder"):
            if not self._rescan:
                self._log.warning(
                    "queue_full", queue_size=self.runner.queue.maxsize, pair_id=spec.pair_id
                )
            self._rescan = True
            return
        self._log.info(
            "pair_detected",
            pair_id=spec.pair_id,
            kind=spec.kind,
            source=source,
            queued=len(self.runner.queue),
            **extra,
        )

    def run(self, stop: StopFlag) -> Summary:
        """Catch up, then process pairs until ``stop`` (or, with ``once``, until idle)."""
        self._log.info(
            "watch_started",
            once=self.once,
            polling=self.polling,
            comparator=self.runner.comparator.info.name,
            concurrency=self.runner.concurrency,
            settle_time=self.settings.settle_time,
            pair_timeout=self.settings.pair_timeout,
        )
        started = time.perf_counter()
        try:
            self.runner.run(stop, self)
        finally:
            self._log.info(
                "watch_stopped",
                reason=f"signal {stop.signal_name}" if stop.signal_name else "done",
                pending=len(self.runner.queue),
                duration_ms=elapsed_ms(started),
                **self.summary.counts,
            )
        return self.summary

    # -- which pairs a file belongs to ------------------------------------------------------

    def _pairs_for(self, relative: str) -> list[PairSpec]:
        return pairs_touched(relative, self.runner.manifests.readers)

    def _scan(self) -> Iterator[PairSpec]:
        """Every pair under the root, folder by folder, in name order.

        Files still being written are no concern here: the job's settle gate defers any pair whose
        files have not settled.
        """
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._scan_error):
            dirnames[:] = sorted(d for d in dirnames if not is_ignored_name(d))
            found: dict[PairSpec, None] = {}
            for name in sorted(filenames):
                found.update(
                    dict.fromkeys(pairs_for_name(self.storage.relative(Path(dirpath, name))))
                )
            if any(is_manifest_name(name) for name in filenames):
                # Not a pair folder (see handler.jobs): only its manifests are pairs.
                found.pop(PairSpec("folder", self.storage.relative(Path(dirpath))), None)
            yield from found

    def _scan_error(self, exc: OSError) -> None:
        self._log.warning("scan_error", path=exc.filename, error=exc.strerror or str(exc))

    # -- events (observer thread) -------------------------------------------------------------

    def _start_observer(self) -> BaseObserver:
        observer = PollingObserver() if self.polling else Observer()
        observer.schedule(
            _EventHandler(self), str(self.root), recursive=True, event_filter=_WATCHED_EVENTS
        )
        observer.start()
        return observer

    def note(self, path: str, change: Change) -> None:
        """A file changed (called from the observer's thread)."""
        try:
            relative = self.storage.relative(Path(path))
        except ValueError:
            return  # not under the root
        if is_ignored_path(relative) or not is_relevant_name(relative):
            return  # temp files, hidden files and our own outputs never trigger anything
        self.settler.note(Path(path), change)
        self.runner.wake()

    def note_tree(self, path: str) -> None:
        """A folder appeared (created or moved in): what it holds may never get its own events."""
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
            for name in filenames:
                self.note(os.path.join(dirpath, name), "scan")


class _EventHandler(FileSystemEventHandler):
    def __init__(self, watcher: FolderSource) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            self.watcher.note_tree(os.fsdecode(event.dest_path) if event.dest_path else src)
        elif isinstance(event, FileMovedEvent):
            self.watcher.note(src, "delete")
            self.watcher.note(os.fsdecode(event.dest_path), "rename")
        elif isinstance(event, FileDeletedEvent):
            self.watcher.note(src, "delete")
        elif isinstance(event, FileModifiedEvent):
            self.watcher.note(src, "write")
        elif isinstance(event, FileClosedEvent):
            self.watcher.note(src, "close")
        elif isinstance(event, FileAttribEvent):
            self.watcher.note(src, "attrib")
        elif isinstance(event, FileCreatedEvent):
            self.watcher.note(src, "create")
