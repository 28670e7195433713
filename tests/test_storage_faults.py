"""Faults at the storage and naming level (issue 10, faults 3-6), on the real filesystem.

Each fault is first reproduced through the real ``pairwatch watch --once`` CLI where it is about
the watcher, then its rule is pinned down on ``LocalStorage`` and the naming functions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handler.errors import InputUnreadable, PathOutsideRoot, UnsupportedName
from handler.pairs import (
    NAME_MAX_BYTES,
    encoded_size,
    is_output_name,
    join_relative,
    manifest_diff_name,
    manifest_result_name,
    truncate_to_bytes,
)
from handler.result import ComparisonResult
from handler.storage import LocalStorage, is_own_temporary, remove_stale_temporaries
from tests.support import scenes
from tests.support.watch_run import age, cli_env, watch_once

pytestmark = pytest.mark.timeout(120)

MANIFEST = b'{"a": "a.jpg", "b": "b.jpg"}'


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return scenes.encode(scenes.photo("astronaut").resize((64, 64)))


def _pair(folder: Path, a: bytes, b: bytes, names: tuple[str, str] = ("a.jpg", "b.jpg")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_bytes(a)
    (folder / names[1]).write_bytes(b)


def _result(path: Path) -> ComparisonResult:
    return ComparisonResult.model_validate_json(path.read_bytes())


def _error(path: Path) -> tuple[str, str | None, str]:
    result = _result(path)
    assert result.status == "error" and result.error is not None, result
    return result.error.type, result.error.input, result.error.message


# --- fault 3: a symlink loop is an error result, not internal_error ----------------------------


def test_symlink_loops_get_error_results(tmp_path: Path, jpeg: bytes) -> None:
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "a.jpg").write_bytes(jpeg)
    (tmp_path / "loop" / "b.jpg").symlink_to("b.jpg")  # points at itself
    # A manifest whose input sits under a folder that is a loop.
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "v").symlink_to("w")
    (tmp_path / "audit" / "w").symlink_to("v")
    (tmp_path / "audit" / "b.jpg").write_bytes(jpeg)
    (tmp_path / "audit" / "m.pair.json").write_text('{"a": "v/a.jpg", "b": "b.jpg"}')
    _pair(tmp_path / "good", jpeg, jpeg)
    age(tmp_path)

    run = watch_once(tmp_path)

    assert run.returncode == 1, run.stderr
    assert all(e["error_type"] != "internal_error" for e in run.named("pair_failed")), run.stderr
    kind, slot, message = _error(tmp_path / "loop" / "result.json")
    assert (kind, slot) == ("input_unreadable", "b") and "symlink loop" in message
    kind, slot, message = _error(tmp_path / "audit" / "m.result.json")
    assert (kind, slot) == ("input_unreadable", "a") and "symlink loop" in message
    assert _result(tmp_path / "good" / "result.json").status == "ok"


def test_storage_maps_symlink_loops_onto_input_unreadable(tmp_path: Path) -> None:
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    (tmp_path / "d").symlink_to("d")
    storage = LocalStorage(tmp_path)
    for relative in ("self.jpg", "d/x.jpg"):
        with pytest.raises(InputUnreadable, match="symlink loop"):
            storage.read(relative, 1000)
        with pytest.raises(InputUnreadable, match="symlink loop"):
            storage.landed_at(relative)
    # A loop planted under an output's name is replaced, not followed.
    (tmp_path / "result.json").symlink_to("result.json")
    with pytest.raises(InputUnreadable):
        storage.read("result.json", 1000)
    storage.write_atomic("result.json", b"{}")
    assert not (tmp_path / "result.json").is_symlink()
    assert (tmp_path / "result.json").read_bytes() == b"{}"
    # Writing into a folder that is a loop is refused with the same error.
    with pytest.raises(InputUnreadable, match="symlink loop"):
        storage.write_atomic("d/result.json", b"{}")


# --- fault 4: names up to 255 bytes get their results ---------------------------------------


def _manifest_name(size: int, char: str = "m") -> str:
    """A ``*.pair.json`` name of exactly ``size`` bytes (``char`` may take several bytes)."""
    stem_bytes = size - len(".pair.json")
    stem = char * (stem_bytes // encoded_size(char))
    stem += "x" * (stem_bytes - encoded_size(stem))
    name = stem + ".pair.json"
    assert encoded_size(name) == size
    return name


def test_long_manifest_names_get_results_and_diff_images(tmp_path: Path, jpeg: bytes) -> None:
    """240-255 byte manifests, ASCII and multi-byte: every one gets a result that fits."""
    other = scenes.encode(scenes.photo("coffee").resize((64, 64)))
    _pair(tmp_path, jpeg, other)
    names = [_manifest_name(size) for size in (240, 245, 253, 254, 255)]
    names += [_manifest_name(255, "é"), _manifest_name(254, "漢"), _manifest_name(250, "漢")]
    # Two 255-byte names that differ only at their very end still get results of their own.
    names.append(names[4][: -len("m.pair.json")] + "n.pair.json")
    for name in names:
        (tmp_path / name).write_bytes(MANIFEST)
    age(tmp_path)

    run = watch_once(tmp_path)

    assert run.returncode == 0, run.stderr
    assert len(run.named("result_written")) == len(names)
    outputs = sorted(p.name for p in tmp_path.iterdir() if is_output_name(p.name))
    assert len(outputs) == 2 * len(names)  # a result and a diff image each, none shared
    assert all(encoded_size(name) <= NAME_MAX_BYTES for name in outputs)
    for name in names:
        result = _result(tmp_path / manifest_result_name(name))
        assert result.status == "ok" and result.is_similar is False
        assert result.pair_id == name.removesuffix(".pair.json")  # the full name, not cut
        assert result.diff_image == manifest_diff_name(name)
        assert (tmp_path / manifest_diff_name(name)).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_names_are_only_shortened_when_they_would_not_fit() -> None:
    fits = _manifest_name(253)
    assert manifest_result_name(fits) == fits.removesuffix(".pair.json") + ".result.json"
    assert encoded_size(manifest_result_name(fits)) == NAME_MAX_BYTES
    for name in (_manifest_name(254), _manifest_name(255, "漢"), _manifest_name(255, "é")):
        result, diff = manifest_result_name(name), manifest_diff_name(name)
        assert encoded_size(result) <= NAME_MAX_BYTES and encoded_size(diff) <= NAME_MAX_BYTES
        stem = result.removesuffix(".result.json")
        assert diff == stem + ".diff.png" and "~" in stem
        assert name.startswith(stem.rsplit("~", 1)[0])  # cut at a character, never inside one
        assert manifest_result_name(name) == result  # the same manifest, the same name


@pytest.mark.parametrize("char", ["r", "é", "漢", "😀"])
@pytest.mark.parametrize("size", [1, 200, 241, 242, 250, 254, 255])
def test_write_atomic_takes_any_legal_name(tmp_path: Path, char: str, size: int) -> None:
    name = truncate_to_bytes(char * size, size)
    name += "x" * (size - encoded_size(name))
    assert encoded_size(name) == size
    LocalStorage(tmp_path).write_atomic(name, b"data")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"data"


def test_truncate_to_bytes_never_splits_a_character() -> None:
    assert truncate_to_bytes("aé漢", 3) == "aé"
    assert truncate_to_bytes("aé漢", 5) == "aé"
    assert truncate_to_bytes("aé漢", 6) == "aé漢"
    assert truncate_to_bytes("漢", 2) == ""


# --- fault 5: names that cannot be handled get unsupported_name -------------------------------


def test_unsupported_names_get_their_own_error_type(tmp_path: Path, jpeg: bytes) -> None:
    _pair(tmp_path / "new\nline", jpeg, jpeg)  # the pair folder's own name
    _pair(tmp_path / "image", jpeg, jpeg, ("a\n.jpg", "b.jpg"))  # an image's name
    _pair(tmp_path / "audit", jpeg, jpeg)
    (tmp_path / "audit" / "tab.pair.json").write_text('{"a": "a\\t.jpg", "b": "b.jpg"}')
    (tmp_path / "audit" / "out.pair.json").write_text('{"a": "../../x\\n.jpg", "b": "b.jpg"}')
    (tmp_path / "audit" / "bad\nname.pair.json").write_bytes(MANIFEST)  # the manifest's own
    latin_folder = os.path.join(os.fsencode(tmp_path), b"latin\xe9")  # not UTF-8
    _pair(Path(os.fsdecode(latin_folder)), jpeg, jpeg)
    _pair(tmp_path / "good", jpeg, jpeg)
    age(tmp_path)

    run = watch_once(tmp_path)

    assert run.returncode == 1, run.stderr
    kind, slot, message = _error(tmp_path / "new\nline" / "result.json")
    assert (kind, slot) == ("unsupported_name", None) and "control character" in message
    assert _result(tmp_path / "new\nline" / "result.json").pair_id == "new\nline"
    kind, slot, message = _error(tmp_path / "image" / "result.json")
    assert (kind, slot) == ("unsupported_name", "a") and "'\\n'" in message
    assert [i.name for i in _result(tmp_path / "image" / "result.json").inputs] == [
        "a\n.jpg",
        "b.jpg",
    ]
    assert _error(tmp_path / "audit" / "tab.result.json")[:2] == ("unsupported_name", "a")
    assert _error(tmp_path / "audit" / "bad\nname.result.json")[:2] == ("unsupported_name", None)
    # Leaving the root is still the graver fault, whatever the name holds.
    assert _error(tmp_path / "audit" / "out.result.json")[:2] == ("path_outside_root", "a")
    assert _result(tmp_path / "good" / "result.json").status == "ok"
    # A name that is not UTF-8 cannot be written into a JSON result: it is logged instead.
    latin = [e for e in run.named("pair_failed") if e["pair_id"] == "latin\udce9"]
    assert latin[0]["error_type"] == "unsupported_name" and "UTF-8" in latin[0]["error"]
    assert sorted(os.listdir(latin_folder)) == [b"a.jpg", b"b.jpg"]  # nothing left behind
    assert all(e["error_type"] != "internal_error" for e in run.named("pair_failed"))

    # The folder's error result is found again: a second run does not write it anew.
    again = watch_once(tmp_path)
    assert "new\nline" not in {e["pair_id"] for e in again.named("result_written")}


@pytest.mark.parametrize("name", ["a\nb.jpg", "p/\x1b[31m.jpg", "tab\t.png", "del\x7f", "c1\x85"])
def test_control_characters_are_unsupported_names(name: str) -> None:
    with pytest.raises(UnsupportedName, match="control character"):
        join_relative("folder", name)


def test_confinement_is_checked_before_names() -> None:
    with pytest.raises(PathOutsideRoot):
        join_relative("", "../x\n.jpg")
    with pytest.raises(PathOutsideRoot):
        join_relative("", "/abs\n.jpg")
    assert join_relative("p", "ü ä+b.jpg") == "p/ü ä+b.jpg"


def test_storage_refuses_unsupported_input_names_but_writes_outputs_beside_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "new\nline").mkdir()
    (tmp_path / "new\nline" / "a.jpg").write_bytes(b"x")
    storage = LocalStorage(tmp_path)
    with pytest.raises(UnsupportedName):
        storage.read("new\nline/a.jpg", 10)
    with pytest.raises(UnsupportedName):
        storage.list_names("new\nline")
    storage.write_atomic("new\nline/result.json", b"{}")
    assert storage.read("new\nline/result.json", 10) == b"{}"
    with pytest.raises(PathOutsideRoot):
        storage.write_atomic("new\nline/../../result.json", b"{}")


# --- fault 6: stale temporaries are removed at start ------------------------------------------

_HELD_WRITER = """
import os, sys, time
from pathlib import Path
from handler.storage import LocalStorage

def held(fd):
    print("writing", flush=True)
    time.sleep(120)

os.fsync = held
LocalStorage(Path(sys.argv[1])).write_atomic(sys.argv[2], b"half a result")
"""


def _kill_mid_write(root: Path, relative: str) -> Path:
    """A real ``kill -9`` of a process inside ``write_atomic``; returns the temporary it left.

    The child's ``os.fsync`` is swapped for a sleep only to hold it at a known point of the
    write (the kill itself, and everything the kill leaves behind, is real).
    """
    folder = (root / relative).parent
    before = set(os.listdir(folder))
    child = subprocess.Popen(
        [sys.executable, "-c", _HELD_WRITER, str(root), relative],
        stdout=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    (left,) = set(os.listdir(folder)) - before
    return folder / left


def test_kill_9_mid_write_leaves_a_temporary_the_next_start_removes(
    tmp_path: Path, jpeg: bytes
) -> None:
    _pair(tmp_path / "p", jpeg, jpeg)
    long_name = "l" * (NAME_MAX_BYTES - len(".result.json")) + ".result.json"
    stale = [
        _kill_mid_write(tmp_path, "p/result.json"),
        _kill_mid_write(tmp_path, "p/diff.png"),
        _kill_mid_write(tmp_path, f"p/{long_name}"),
    ]
    assert all(is_own_temporary(p.name) and p.read_bytes() == b"half a result" for p in stale)
    age(tmp_path, seconds=3600)
    fresh = _kill_mid_write(tmp_path, "p/x.result.json")  # a write of moments ago: kept
    foreign = [tmp_path / "p" / name for name in (".notes.abcdefgh.tmp", ".result.json.x1.tmp")]
    for path in foreign:
        path.write_text("not ours")
    hidden = tmp_path / ".hidden" / ".result.json.abcdefgh.tmp"
    hidden.parent.mkdir()
    hidden.write_text("never written by pairwatch")
    link = tmp_path / "p" / ".diff.png.abcdefgh.tmp"
    link.symlink_to(tmp_path / "p" / "a.jpg")
    age(tmp_path / ".hidden", seconds=3600)
    os.utime(link, (1e9, 1e9), follow_symlinks=False)

    run = watch_once(tmp_path)

    assert run.returncode == 0, run.stderr
    assert not any(p.exists() for p in stale)
    assert sorted(e["path"] for e in run.named("stale_temporary_removed")) == sorted(
        str(p) for p in stale
    )
    assert all(e["age_s"] >= 3600 for e in run.named("stale_temporary_removed"))
    assert fresh.exists() and hidden.exists() and link.is_symlink()
    assert all(p.read_text() == "not ours" for p in foreign)
    assert _result(tmp_path / "p" / "result.json").status == "ok"
    assert (tmp_path / "p" / "a.jpg").read_bytes() == jpeg


def test_remove_stale_temporaries_stays_inside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for folder in (root, outside):
        (folder / ".result.json.abcdefgh.tmp").write_text("x")
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    past = time.time() - 3600
    for path in (root / ".result.json.abcdefgh.tmp", outside / ".result.json.abcdefgh.tmp"):
        os.utime(path, (past, past))

    assert remove_stale_temporaries(root, older_than_s=3599) == [root / ".result.json.abcdefgh.tmp"]
    assert (outside / ".result.json.abcdefgh.tmp").exists()
    assert remove_stale_temporaries(root) == []


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        (".result.json.abcd_123.tmp", True),
        (".shop.diff.png.a1b2c3d4.tmp", True),
        (".x.result.json.abcdefgh.tmp", True),
        (".result.json.abcdefg.tmp", False),  # 7 random characters: not tempfile's
        (".result.json.ABCDEFGH.tmp", False),
        (".photo.jpg.abcdefgh.tmp", False),  # not an output of ours
        ("result.json.abcdefgh.tmp", False),
        (".result.json.abcdefgh.part", False),
    ],
)
def test_own_temporaries_are_recognised_by_their_pattern(name: str, ours: bool) -> None:
    assert is_own_temporary(name) is ours
