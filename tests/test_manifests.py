"""``handler.manifests``: which manifests read a file (the index, learned from their jobs) and
the one router from a changed file to the pairs it touches."""

from __future__ import annotations

from pathlib import Path

from handler.disposition import done
from handler.jobs import JobReport
from handler.manifests import ManifestIndex, manifests_beside, pairs_touched
from handler.pairs import PairSpec
from handler.storage import LocalStorage

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


def test_a_changed_image_touches_its_folder_then_manifests_beside_then_its_readers_once() -> None:
    index = ManifestIndex()
    index.learn(_report(CAMERA, "a/x.jpg"))
    index.learn(_report(SHARED, "a/x.jpg"))
    touched = pairs_touched("a/x.jpg", index.readers, beside=[SHARED])
    assert touched == [PairSpec("folder", "a"), SHARED, CAMERA]


def test_a_manifest_touches_itself_and_a_hidden_file_nothing() -> None:
    assert pairs_touched("a/shared.pair.json") == [SHARED]
    assert pairs_touched("a/.x.jpg.tmp", lambda _: [CAMERA]) == [CAMERA]
    assert pairs_touched("top.jpg") == []  # the root is never a pair folder


def test_manifests_beside_an_image_are_the_pair_json_files_in_its_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "shared.pair.json", "notes.txt", ".hidden.pair.json"):
        (tmp_path / "a" / name).write_bytes(b"{}")
    (tmp_path / "a" / "sub.pair.json").mkdir()  # a folder is never a manifest
    assert manifests_beside(LocalStorage(tmp_path), "a/x.jpg") == [SHARED]
    assert manifests_beside(LocalStorage(tmp_path), "gone/x.jpg") == []
