"""When is a file completely written? Files wait here until they are.

- Renamed into place (rsync's ``.name.XXXXXX`` -> ``name``, editors, ``mv`` within one
  filesystem): complete at once, the writer finished before the rename.
- Written in place (``cp``, downloads, slow network writers): complete once its size and mtime
  have not changed for ``settle_time``. A writer that opens, appends and closes per chunk fires
  close-write after every chunk, so a close alone proves nothing; a stall inside one open write
  is caught by also waiting for the close-write when the event source reports closes (inotify
  does, polling does not).
- Deleted or moved away: reported at once, since the pair it belonged to changed.

A pair is more than the file whose event fired: before a pair is read, ``defer_unsettled``
checks *all* its files, so a folder job started by one settled image never reads its partner
half-written (the partner may not even have produced an event yet, with polling).

Thread-safe: the observer's thread notes changes, the watcher's loop collects what is ready.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from handler.jobs import Gate

#: create/scan: appeared (settle only) · attrib: mode/owner changed (a permission fix: look
#: again) · write: data written (and, with ``track_close``, the file is open until its close) ·
#: close: the writer closed it · rename: renamed into place · delete.
Change = Literal["create", "scan", "attrib", "write", "close", "rename", "delete"]

#: A file seen open for writing but stable this long is used even without its close-write event
#: (the event can be lost when a file is written in a folder created a moment before).
CLOSE_WAIT_LIMIT = 30.0
#: How many recently settled files are remembered with their stat (see ``defer_unsettled``).
CONFIRMED_MEMORY = 10_000


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    stat: tuple[int, int] | None
    since: float
    first: float
    writing: bool = False
    complete: bool = False


class Settler:
    def __init__(
        self,
        settle_time: float,
        *,
        track_close: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle_time = settle_time
        self.track_close = track_close
        self._clock = clock
        self._pending: dict[Path, _Pending] = {}
        self._confirmed: OrderedDict[Path, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, path: Path, change: Change) -> None:
        """Record that ``path`` changed (the stat is taken now, outside the lock)."""
        stat = None if change == "delete" else _stat(path)
        now = self._clock()
        with self._lock:
            entry = self._pending.get(path)
            if entry is None and change in ("create", "scan") and self._is_confirmed(path, stat):
                return  # a late echo (the walk of a new folder) of a file already settled
            if entry is None or change in ("rename", "delete"):
                first = entry.first if entry is not None else now
                entry = self._pending[path] = _Pending(stat, now, first)
            elif stat != entry.stat:
                entry.stat, entry.since, entry.complete = stat, now, False
            if change == "rename":
                entry.complete = True
            elif change == "write":
                # A late scan or attribute event of a renamed file changes nothing; a write does.
                entry.complete = False
                entry.writing = self.track_close
            elif change == "close":
                entry.writing = False

    def ready(self) -> list[tuple[Path, float]]:
        """Pop every path that is complete, or gone, with seconds since it was first noted."""
        now = self._clock()
        with self._lock:
            candidates = [
                (path, entry)
                for path, entry in self._pending.items()
                if entry.stat is None or entry.complete or now - entry.since >= self.settle_time
            ]
        out = []
        for path, entry in candidates:
            stat = _stat(path)
            with self._lock:
                if self._pending.get(path) is not entry:
                    continue  # noted again meanwhile: it starts over
                if stat is not None and stat != entry.stat:
                    # Changed since it was noted, even if it was renamed into place: settle.
                    entry.stat, entry.since, entry.complete = stat, now, False
                    continue
                if stat is not None and entry.writing and now - entry.since < CLOSE_WAIT_LIMIT:
                    continue
                del self._pending[path]
                if stat is not None:
                    self._confirm(path, stat)
            out.append((path, now - entry.first))
        return out

    def gate(self, root: Path) -> Gate:
        """The folder's pair jobs' gate (``handler.jobs.Gate``): a plan is held back while any
        of its files under ``root`` may still be being written."""
        return lambda plan: self.defer_unsettled(root / path for path in plan.files)

    def defer_unsettled(self, paths: Iterable[Path]) -> bool:
        """Hold back a pair while any of its files may still be being written.

        A file is unsettled while it is pending here, or when it was modified within the settle
        time and has not been seen settled with exactly its current size and mtime (which also
        stops a clock-skewed mtime "in the future" from deferring it forever). Unsettled files
        are noted, so the pair comes back once they settle. True if any was unsettled.
        """
        deferred = False
        for path in paths:
            with self._lock:
                if path in self._pending:
                    deferred = True
                    continue
                confirmed = self._confirmed.get(path)
            try:
                st = path.stat()
            except OSError:
                continue  # vanished or unreadable: the job reports it
            if confirmed == (st.st_size, st.st_mtime_ns):
                continue
            if time.time() - st.st_mtime < self.settle_time:
                self.note(path, "scan")
                deferred = True
        return deferred

    def _is_confirmed(self, path: Path, stat: tuple[int, int] | None) -> bool:
        return stat is not None and self._confirmed.get(path) == stat

    def _confirm(self, path: Path, stat: tuple[int, int]) -> None:
        self._confirmed[path] = stat
        self._confirmed.move_to_end(path)
        while len(self._confirmed) > CONFIRMED_MEMORY:
            self._confirmed.popitem(last=False)

    def next_due(self) -> float | None:
        """Seconds until the next path could be ready (0 if one may be already), None if idle."""
        now = self._clock()
        with self._lock:
            if not self._pending:
                return None
            waits = [
                0.0
                if entry.stat is None or entry.complete
                else (CLOSE_WAIT_LIMIT if entry.writing else self.settle_time) - (now - entry.since)
                for entry in self._pending.values()
            ]
        return max(0.0, min(waits))

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
