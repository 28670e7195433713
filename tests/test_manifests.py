"""``watcher.manifests.ManifestIndex``: which manifests read a file, as learned from their jobs."""

from __future__ import annotations

from handler.disposition import done
from handler.jobs import JobReport
from handler.pairs import PairSpec
from watcher.manifests import ManifestIndex

CAMERA = PairSpec("manifest", "camera/mirrored.pair.json")
SHARED = PairSpec("manifest", "a/shared.pair.json")


def _report(spec: PairSpec, *inputs: str) -> JobReport:
    return JobReport(spec, "written", done(), inputs=inputs)


def test_a_manifest_is_a_reader_of_each_of_its_inputs() -> None:
    index = ManifestIndex()
    index.learn(_report(CAMERA, "photos/a.jpg", "other/b.jpg"))
    index.learn(_report(SHARED, "photos/a.jpg", "a/c.png"))
    assert index.readers("photos/a.jpg") == [SHARED, CAMERA]  # in name order
    assert index.readers("other/b.jpg") == [CAMERA]
    assert index.readers("a/c.png") == [SHARED]
    assert index.readers("photos/unknown.jpg") == []


def test_learning_again_replaces_what_a_manifest_reads() -> None:
    index = ManifestIndex()
    index.learn(_report(CAMERA, "photos/a.jpg", "photos/b.jpg"))
    index.learn(_report(CAMERA, "photos/a.jpg", "photos/new.jpg"))  # the manifest was edited
    assert index.readers("photos/b.jpg") == []
    assert index.readers("photos/a.jpg") == index.readers("photos/new.jpg") == [CAMERA]


def test_a_manifest_that_reads_nothing_now_is_forgotten() -> None:
    """An unreadable or deleted manifest reports no inputs: it reads none of its old ones."""
    index = ManifestIndex()
    index.track(CAMERA, ("photos/a.jpg",))
    index.track(SHARED, ("photos/a.jpg",))
    index.learn(_report(CAMERA))
    assert index.readers("photos/a.jpg") == [SHARED]
    index.track(SHARED, ())
    assert index.readers("photos/a.jpg") == []
    assert index._readers == {} and index._inputs == {}  # nothing left behind


def test_pair_folders_are_not_indexed() -> None:
    """A folder pair's inputs are its own folder's files: the naming rules already find it."""
    index = ManifestIndex()
    index.learn(_report(PairSpec("folder", "p1"), "p1/a.jpg", "p1/b.jpg"))
    assert index.readers("p1/a.jpg") == []
