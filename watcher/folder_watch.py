"""The local-folder watcher: filesystem events in, one pair job at a time out.

Threads: watchdog's observer thread only notes changed paths in the ``Settler``; everything else
(deciding which pairs a settled file affects, the queue, the jobs, timers for lone images) runs
on the caller's thread, so the pair bookkeeping needs no locks and jobs run strictly one by one
(the GPU constraint of the original service).

Start-up: the observer starts first, then a catch-up scan walks the folder, so nothing dropped
in between is missed. The scan is lazy: it feeds the queue only while there is room (half of it
when events may arrive too), and an event that finds the queue full schedules one more scan
instead of growing a buffer; jobs are idempotent, so scanning again costs reads, not results.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

from handler.compare.base import Comparator
from handler.config import Settings
from handler.jobs import (
    JobReport,
    PairSpec,
    is_ignored_path,
    pair_files,
    pairs_for_name,
    run_pair_job,
)
from handler.logs import elapsed_ms, get_logger
from handler.pairs import is_ignored_name, is_manifest_name, is_relevant_name
from handler.storage import LocalStorage, remove_stale_temporaries
from watcher import metrics
from watcher.jobqueue import CoalescingQueue
from watcher.settle import Change, Settler
from watcher.shutdown import StopFlag

#: The longest the loop sleeps without looking at the stop flag (see watcher.shutdown).
STOP_POLL_S = 0.2

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


@dataclass
class Summary:
    """The latest report per pair (kept for ``--once`` runs only) and counters for the log."""

    keep_reports: bool = False
    reports: dict[PairSpec, JobReport] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    crashed: set[PairSpec] = field(default_factory=set)

    def add(self, report: JobReport) -> None:
        key = "failed" if report.failed else report.outcome
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.keep_reports:
            self.reports[report.spec] = report
            self.crashed.discard(report.spec)

    def add_crash(self, spec: PairSpec) -> None:
        self.counts["failed"] = self.counts.get("failed", 0) + 1
        if self.keep_reports:
            self.reports.pop(spec, None)
            self.crashed.add(spec)

    @property
    def any_failed(self) -> bool:
        return bool(self.crashed) or any(r.failed for r in self.reports.values())


class FolderWatcher:
    def __init__(
        self,
        root: Path,
        settings: Settings,
        comparator: Comparator,
        *,
        polling: bool = False,
        once: bool = False,
    ) -> None:
        self.storage = LocalStorage(root)
        self.root = self.storage.root
        self.settings = settings
        self.comparator = comparator
        self.polling = polling
        self.once = once
        self.queue: CoalescingQueue[PairSpec] = CoalescingQueue(settings.queue_size)
        # Polling sees no open/close events, so it relies on the settle time alone.
        self.settler = Settler(settings.settle_time, track_close=not polling)
        self.summary = Summary(keep_reports=once)
        #: Called after every job (the CLI's progress bar).
        self.on_report: Callable[[JobReport], None] | None = None
        #: Set once the start-up scan has queued every pending pair (events are watched by then).
        self.caught_up = threading.Event()
        self._wake = threading.Event()
        self._scanner: Iterator[PairSpec] | None = None
        self._rescan = False
        self._waiting: dict[PairSpec, float] = {}  # lone-image folders -> when to look again
        self._dependents: dict[str, set[PairSpec]] = {}  # file -> manifests that read it
        self._manifest_inputs: dict[PairSpec, tuple[str, ...]] = {}
        self._log = get_logger(root=str(self.root))

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> Summary:
        """Catch up, then process pairs until ``stop`` (or, with ``once``, until idle)."""
        observer = None if self.once else self._start_observer()
        self._log.info(
            "watch_started",
            once=self.once,
            polling=self.polling,
            comparator=self.comparator.info.name,
            settle_time=self.settings.settle_time,
            pair_timeout=self.settings.pair_timeout,
        )
        started = time.perf_counter()
        remove_stale_temporaries(self.root)
        self._scanner = self._scan()
        try:
            while not stop.requested:
                self._wake.clear()
                self._pump()
                item = self.queue.pop()
                if item is not None:
                    self._process(*item)
                elif self.once and self._scanner is None and not len(self.settler):
                    break
                else:
                    self._wake.wait(self._idle_wait())
        finally:
            if observer is not None:
                observer.stop()
                observer.join()
        self._log.info(
            "watch_stopped",
            reason=f"signal {stop.signal_name}" if stop.signal_name else "done",
            pending=len(self.queue),
            duration_ms=elapsed_ms(started),
            **self.summary.counts,
        )
        return self.summary

    def _pump(self) -> None:
        """Move work into the queue: settled files, due lone-image checks, the scan."""
        for path, waited in self.settler.ready():
            for spec in self._pairs_for(self.storage.relative(path)):
                self._enqueue(spec, "event", settle_ms=round(waited * 1000, 2))
        now = time.monotonic()
        for spec in [s for s, due in self._waiting.items() if due <= now]:
            del self._waiting[spec]
            self._enqueue(spec, "timer")
        if self._scanner is None and self._rescan:
            self._rescan = False
            self._log.warning("rescan_started", reason="queue_was_full")
            self._scanner = self._scan()
        limit = self.queue.maxsize if self.once else max(1, self.queue.maxsize // 2)
        while self._scanner is not None and len(self.queue) < limit:
            found = next(self._scanner, None)
            if found is None:
                self._scanner = None
                self.caught_up.set()
            else:
                self._enqueue(found, "scan")

    def _idle_wait(self) -> float:
        waits = [STOP_POLL_S]
        settle = self.settler.next_due()
        if settle is not None:
            waits.append(settle)
        if self._waiting:
            waits.append(min(self._waiting.values()) - time.monotonic())
        return max(0.005, min(waits))

    def _enqueue(self, spec: PairSpec, source: str, **extra: float) -> None:
        if spec in self.queue:
            return  # coalesced with the job already waiting
        if not self.queue.put(spec):
            if not self._rescan:
                self._log.warning("queue_full", queue_size=self.queue.maxsize, pair_id=spec.pair_id)
            self._rescan = True
            return
        self._log.info(
            "pair_detected",
            pair_id=spec.pair_id,
            kind=spec.kind,
            source=source,
            queued=len(self.queue),
            **extra,
        )

    def _process(self, spec: PairSpec, waited: float) -> None:
        try:
            files = pair_files(self.storage, spec, self.settings)
            if self.settler.defer_unsettled(self.root / path for path in files):
                # The files still being written bring the pair back once they settle.
                if spec.kind == "manifest":
                    self._track_inputs(spec, files[1:])
                self._log.debug("pair_deferred", pair_id=spec.pair_id, reason="being_written")
                return
            report = run_pair_job(
                self.storage,
                spec,
                self.settings,
                self.comparator,
                queued_ms=round(waited * 1000, 2),
            )
        except Exception as exc:
            # A bug (or an OS failure nobody foresaw) must cost this pair, not the watcher.
            self._log.exception(
                "pair_failed", pair_id=spec.pair_id, error_type="internal_error", error=str(exc)
            )
            self.summary.add_crash(spec)
            return
        metrics.record_report(report, "folder")
        if spec.kind == "manifest":
            self._track_inputs(spec, report.inputs)
        if report.outcome == "waiting" and report.retry_in is not None:
            self._waiting[spec] = time.monotonic() + report.retry_in
        else:
            self._waiting.pop(spec, None)
        self.summary.add(report)
        if self.on_report is not None:
            self.on_report(report)

    # -- which pairs a file belongs to --------------------------------------------------------

    def _pairs_for(self, relative: str) -> list[PairSpec]:
        specs = pairs_for_name(relative)
        specs.extend(sorted(self._dependents.get(relative, set()) - set(specs)))
        return specs

    def _track_inputs(self, manifest: PairSpec, inputs: tuple[str, ...]) -> None:
        for path in self._manifest_inputs.pop(manifest, ()):
            readers = self._dependents.get(path)
            if readers is not None:
                readers.discard(manifest)
                if not readers:
                    del self._dependents[path]
        if inputs:
            self._manifest_inputs[manifest] = inputs
            for path in inputs:
                self._dependents.setdefault(path, set()).add(manifest)

    def _scan(self) -> Iterator[PairSpec]:
        """Every pair under the root, folder by folder, in name order.

        Files still being written are no concern here: ``_process`` defers any pair whose
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
        self._wake.set()

    def note_tree(self, path: str) -> None:
        """A folder appeared (created or moved in): what it holds may never get its own events."""
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
            for name in filenames:
                self.note(os.path.join(dirpath, name), "scan")


class _EventHandler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
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
