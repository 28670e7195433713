"""Which manifests read this file, and so which pairs a changed file touches: one module.

A changed file touches, each once and in this order:

1. the pairs its name alone says (``handler.pairs.pairs_for_name``: its own pair folder, a
   manifest itself);
2. on S3, the manifests beside an image (``manifests_beside``), which ``handler.bucket_jobs``
   always re-runs: the image may be one of their inputs, and a re-run that finds its recorded
   inputs unchanged is cheap;
3. the manifests known to read it (``Readers``): a long-running process's ``ManifestIndex``,
   learned from each manifest's ``JobReport.inputs``.

``pairs_touched`` is that router, for the folder source and the bucket jobs alike. The index
lives in memory: after a restart it is rebuilt as manifests are run (the folder source's
start-up scan runs every one). Stateless or multi-worker consumers (the Lambda, several
``watch sqs`` workers) see only what they handled themselves: a manifest naming an image in
*another* prefix is then re-run by its own event only.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from handler.pairs import PairSpec, is_manifest_name, pairs_for_name

if TYPE_CHECKING:
    from handler.jobs import JobReport
    from handler.storage import PairStorage

#: Manifests known to read a path (relative to the root or prefix).
Readers = Callable[[str], Iterable[PairSpec]]


def no_readers(relative: str) -> Iterable[PairSpec]:
    """What a stateless caller knows of who reads ``relative``: nothing."""
    del relative
    return ()


def pairs_touched(
    relative: str, readers: Readers = no_readers, beside: Iterable[PairSpec] = ()
) -> list[PairSpec]:
    """The pairs a new, changed or deleted file at ``relative`` touches, each once: its own
    (by name), then ``beside`` (the manifests next to it, where the caller listed them), then
    the manifests ``readers`` knows to read it."""
    found = dict.fromkeys(pairs_for_name(relative))
    found.update(dict.fromkeys(beside))
    found.update(dict.fromkeys(readers(relative)))
    return list(found)


def manifests_beside(storage: PairStorage, image: str) -> list[PairSpec]:
    """The manifests in ``image``'s folder: it may be one of their inputs. (May raise what the
    storage's listing raises: the caller decides what an unlisted folder means.)"""
    folder = posixpath.dirname(image)
    return [
        PairSpec("manifest", posixpath.join(folder, name))
        for name in storage.list_names(folder)
        if is_manifest_name(name)
    ]


class ManifestIndex:
    """Which manifests read which files, learned from their jobs (one per process: the runner's)."""

    def __init__(self) -> None:
        self._readers: dict[str, set[PairSpec]] = {}
        self._inputs: dict[PairSpec, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def learn(self, report: JobReport) -> None:
        """Record what ``report``'s manifest reads now (nothing for pair folders)."""
        if report.spec.kind == "manifest":
            self.track(report.spec, report.inputs)

    def track(self, manifest: PairSpec, inputs: tuple[str, ...]) -> None:
        with self._lock:
            for path in self._inputs.pop(manifest, ()):
                readers = self._readers.get(path)
                if readers is not None:
                    readers.discard(manifest)
                    if not readers:
                        del self._readers[path]
            if inputs:
                self._inputs[manifest] = inputs
                for path in inputs:
                    self._readers.setdefault(path, set()).add(manifest)

    def readers(self, path: str) -> list[PairSpec]:
        """The manifests known to read ``path``, in name order."""
        with self._lock:
            return sorted(self._readers.get(path, ()))
