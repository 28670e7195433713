"""Watch a folder: every image pair dropped into it gets a result.json beside it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO, cast

import structlog
from tqdm import tqdm

from handler.compare import create_comparator
from handler.config import Settings
from handler.errors import PairError
from handler.jobs import JobReport
from handler.logs import get_logger
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, positive_seconds, seconds
from watcher.folder_watch import FolderWatcher
from watcher.shutdown import stop_on_signals


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to watch (recursively)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="process every pending pair, then exit (status 1 if any pair failed)",
    )
    parser.add_argument(
        "--polling",
        action="store_true",
        help="poll for changes instead of inotify (network filesystems: NFS, SMB, sshfs)",
    )
    parser.add_argument(
        "--pair-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long a lone image waits for its partner (default 600; PAIRWATCH_PAIR_TIMEOUT)",
    )
    parser.add_argument(
        "--settle-time",
        type=seconds,
        metavar="SECONDS",
        help="how long a file written in place must stay unchanged before it is read "
        "(default 0.5; PAIRWATCH_SETTLE_TIME)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    log = get_logger()
    updates = {"pair_timeout": args.pair_timeout, "settle_time": args.settle_time}
    settings = settings.model_copy(update={k: v for k, v in updates.items() if v is not None})
    if not args.dir.is_dir():
        print(f"pairwatch: {args.dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        comparator = create_comparator(settings)
    except PairError as exc:
        log.error("comparator_unavailable", error_type=exc.type, error=exc.message)
        return EXIT_FAILED
    try:
        watcher = FolderWatcher(
            args.dir, settings, comparator, polling=args.polling, once=args.once
        )
        with stop_on_signals() as stop, _progress(watcher, args.once and sys.stderr.isatty()):
            try:
                summary = watcher.run(stop)
            except OSError as exc:
                # e.g. the inotify watch limit (fs.inotify.max_user_watches) is reached.
                print(f"pairwatch: cannot watch {args.dir}: {exc}", file=sys.stderr)
                return EXIT_FAILED
    finally:
        comparator.close()
    if args.once and not stop.requested and summary.any_failed:
        return EXIT_FAILED
    return EXIT_OK


@contextmanager
def _progress(watcher: FolderWatcher, enabled: bool) -> Iterator[None]:
    """A progress bar for ``--once`` on a terminal; log lines are printed above it."""
    if not enabled:
        yield
        return
    bar = tqdm(total=len(watcher.queue), unit="pair", file=sys.stderr, dynamic_ncols=True)

    def advance(report: JobReport) -> None:
        del report
        bar.total = max(bar.total or 0, bar.n + 1 + len(watcher.queue))
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
