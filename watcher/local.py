"""Watch a folder: every image pair dropped into it gets a result.json beside it."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO, cast

import structlog
from tqdm import tqdm

from handler.config import Settings
from handler.jobs import JobReport
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from watcher.folder_source import FolderSource
from watcher.runner import ComparatorUnavailable, runner_for
from watcher.shutdown import stop_on_signals


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.dir.is_dir():
        print(f"pairwatch: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    # The comparator starts loading now; the folder is watched and scanned meanwhile, and pairs
    # wait in the queue until it is ready.
    with runner_for(settings) as runner:
        watcher = FolderSource(args.dir, settings, runner, polling=args.polling, once=args.once)
        with stop_on_signals() as stop, _progress(watcher, args.once and sys.stderr.isatty()):
            try:
                summary = watcher.run(stop)
            except ComparatorUnavailable:
                return EXIT_FAILED  # logged as comparator_unavailable
            except OSError as exc:
                # e.g. the inotify watch limit (fs.inotify.max_user_watches) is reached.
                print(f"pairwatch: cannot watch {args.dir}: {exc}", file=sys.stderr)
                return EXIT_FAILED
    if args.once and not stop.requested and summary.any_failed:
        return EXIT_FAILED
    return EXIT_OK


@contextmanager
def _progress(watcher: FolderSource, enabled: bool) -> Iterator[None]:
    """A progress bar for ``--once`` on a terminal; log lines are printed above it."""
    if not enabled:
        yield
        return
    queue = watcher.runner.queue
    bar = tqdm(total=len(queue), unit="pair", file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()

    def advance(report: JobReport) -> None:
        del report
        with lock:  # reports come from the runner's worker threads
            # This pair is still in flight: done (n + 1) + the others in flight + the queue.
            bar.total = max(bar.total or 0, bar.n + len(queue) + watcher.runner.in_flight())
            bar.update(1)

    watcher.on_report = advance
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
