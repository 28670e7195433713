"""Which manifests read this file: the one answer for every source in a long-running process.

The runner learns each manifest's inputs from its ``JobReport`` (``inputs``) and a source asks
which manifests read a changed file, beyond the naming rules (``handler.pairs.pairs_for_name``:
a file's own pair folder, a manifest itself) and, on S3, the manifests beside an image, which
``handler.bucket_jobs`` always re-runs. The index lives in memory: after a restart it is
rebuilt as manifests are run (the folder source's start-up scan runs every one). Stateless or
multi-worker consumers (the Lambda, several ``watch sqs`` workers) see only what they handled
themselves: a manifest naming an image in *another* prefix is then re-run by its own event only.
"""

from __future__ import annotations

import threading

from handler.jobs import JobReport
from handler.pairs import PairSpec


class ManifestIndex:
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
