"""``handler.jobs``: one pair job over a real folder (``LocalStorage``) and the metrics comparator.

Where a test must prove that nothing outside the root is *read*, the outside file is a FIFO:
a plain ``open`` of one blocks until a writer appears (the test would hang into its timeout),
and ``read_file`` refuses it as ``input_unreadable`` — either way not ``path_outside_root``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from handler.compare.metrics import MetricsComparator
from handler.config import Settings
from handler.disposition import done
from handler.jobs import MISSING_INPUT, JobReport, Plan, run_pair_job
from handler.pairs import PairSpec, is_ignored_path, pairs_for_name
from handler.result import ComparisonResult, ErrorInfo
from handler.storage import LocalStorage, PairStorage
from tests.support.png import png_header_only

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def comparator() -> MetricsComparator:
    return MetricsComparator()


@pytest.fixture
def settings() -> Settings:
    return Settings(pair_timeout=60, diff_image=True)


def _job(
    root: Path, spec: PairSpec, settings: Settings, comparator: MetricsComparator, **kw: Any
) -> JobReport:
    storage: PairStorage = LocalStorage(root)  # LocalStorage is one PairStorage
    kw.setdefault("now", time.time())
    return run_pair_job(storage, spec, settings, comparator, **kw)


def _result(path: Path) -> ComparisonResult:
    return ComparisonResult.model_validate_json(path.read_bytes())


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- naming conventions --------------------------------------------------------------------------


def test_which_pairs_a_file_belongs_to() -> None:
    assert pairs_for_name("p1/a.JPG") == [PairSpec("folder", "p1")]
    assert pairs_for_name("x/y/m.pair.json") == [PairSpec("manifest", "x/y/m.pair.json")]
    assert pairs_for_name("a.jpg") == []  # the root itself is never a pair folder
    for ignored in ("p1/result.json", "p1/diff.png", "p1/m.result.json", "p1/.a.jpg.Xy12"):
        assert pairs_for_name(ignored) == []
    assert pairs_for_name(".git/p/a.jpg") == [] and is_ignored_path("p/x.part/a.jpg")
    spec = PairSpec("manifest", "x/y/m.pair.json")
    assert (spec.pair_id, spec.result_path, spec.diff_path) == (
        "x/y/m",
        "x/y/m.result.json",
        "x/y/m.diff.png",
    )


# -- folder pairs ---------------------------------------------------------------------------------


def test_folder_pair_writes_result_and_diff_image(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "p1" / "b.png", photos["png"])
    _put(tmp_path / "p1" / "a.jpg", photos["a"])
    report = _job(tmp_path, PairSpec("folder", "p1"), settings, comparator)
    assert report.action == "written" and not report.failed
    result = _result(tmp_path / "p1" / "result.json")
    assert result.pair_id == "p1" and result.status == "ok" and result.is_similar
    assert [i.name for i in result.inputs] == ["a.jpg", "b.png"]  # A is the first by name
    assert result.input_digests == (
        hashlib.sha256(photos["a"]).hexdigest(),
        hashlib.sha256(photos["png"]).hexdigest(),
    )
    assert result.diff_image == "diff.png"
    assert (tmp_path / "p1" / "diff.png").read_bytes().startswith(b"\x89PNG")
    assert report.inputs == ("p1/a.jpg", "p1/b.png")
    # Inputs are never touched; no temporary files are left behind.
    assert (tmp_path / "p1" / "a.jpg").read_bytes() == photos["a"]
    assert sorted(os.listdir(tmp_path / "p1")) == ["a.jpg", "b.png", "diff.png", "result.json"]


def test_no_diff_image_when_disabled(
    tmp_path: Path, photos: dict[str, bytes], comparator: MetricsComparator
) -> None:
    _put(tmp_path / "p" / "a.jpg", photos["a"])
    _put(tmp_path / "p" / "b.jpg", photos["other"])
    _job(tmp_path, PairSpec("folder", "p"), Settings(diff_image=False), comparator)
    result = _result(tmp_path / "p" / "result.json")
    assert result.diff_image is None and not (tmp_path / "p" / "diff.png").exists()
    assert result.is_similar is False


def test_same_inputs_are_not_compared_again_and_a_replaced_one_is(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    spec = PairSpec("folder", "p")
    _put(tmp_path / "p" / "a.jpg", photos["a"])
    _put(tmp_path / "p" / "b.jpg", photos["a_copy"])
    first = _job(tmp_path, spec, settings, comparator)
    result_file = tmp_path / "p" / "result.json"
    before = (result_file.read_bytes(), result_file.stat().st_mtime_ns)

    again = _job(tmp_path, spec, settings, comparator)
    assert again.action == "skipped" and again.result == first.result
    assert (result_file.read_bytes(), result_file.stat().st_mtime_ns) == before

    _put(tmp_path / "p" / "b.jpg", photos["other"])  # same name, new content
    replaced = _job(tmp_path, spec, settings, comparator)
    assert replaced.action == "written"
    new = _result(result_file)
    assert new.inputs[1].sha256 == hashlib.sha256(photos["other"]).hexdigest()
    assert new.is_similar is False and first.result is not None and first.result.is_similar


def test_a_different_config_or_pair_name_compares_again(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    spec = PairSpec("folder", "p")
    _put(tmp_path / "p" / "a.jpg", photos["a"])
    _put(tmp_path / "p" / "b.jpg", photos["a_copy"])
    _job(tmp_path, spec, settings, comparator)
    stricter = settings.model_copy(
        update={"comparison": settings.comparison.model_copy(update={"similarity_threshold": 1})}
    )
    report = _job(tmp_path, spec, stricter, comparator)
    assert report.action == "written"
    assert _result(tmp_path / "p" / "result.json").config.similarity_threshold == 1
    (tmp_path / "p").rename(tmp_path / "renamed")  # the result must carry the new pair_id
    assert _job(tmp_path, PairSpec("folder", "renamed"), stricter, comparator).action == "written"
    assert _result(tmp_path / "renamed" / "result.json").pair_id == "renamed"


def test_lone_image_waits_then_becomes_incomplete_pair(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    spec = PairSpec("folder", "lone")
    image = _put(tmp_path / "lone" / "a.jpg", photos["a"])
    landed = image.stat().st_ctime
    waiting = _job(tmp_path, spec, settings, comparator, now=landed + 10)
    assert waiting.action == "waiting" and waiting.disposition.kind == "retry"
    assert waiting.disposition.at == pytest.approx(landed + 60)
    assert not (tmp_path / "lone" / "result.json").exists()

    expired = _job(tmp_path, spec, settings, comparator, now=landed + 61)
    assert expired.action == "written" and expired.failed
    result = _result(tmp_path / "lone" / "result.json")
    assert result.status == "error" and result.error is not None
    assert result.error.type == "incomplete_pair" and "a.jpg" in result.error.message
    assert [i.name for i in result.inputs] == ["a.jpg", MISSING_INPUT]
    # Reported once: asking again does not rewrite the same failure.
    assert _job(tmp_path, spec, settings, comparator, now=landed + 99).action == "skipped"

    _put(tmp_path / "lone" / "b.jpg", photos["a_copy"])  # the partner arrives after all
    assert _job(tmp_path, spec, settings, comparator).action == "written"
    assert _result(tmp_path / "lone" / "result.json").status == "ok"


def test_three_images_are_an_ambiguous_pair_listing_them(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    for name in ("c.jpg", "a.jpg", "b.png"):
        _put(tmp_path / "many" / name, photos["a"])
    _put(tmp_path / "many" / ".hidden.jpg", photos["a"])  # ignored, not a fourth image
    report = _job(tmp_path, PairSpec("folder", "many"), settings, comparator)
    assert report.failed
    result = _result(tmp_path / "many" / "result.json")
    assert result.error is not None and result.error.type == "ambiguous_pair"
    assert "3 images" in result.error.message
    assert "a.jpg, b.png, c.jpg" in result.error.message


def test_empty_folder_and_folder_with_manifests_are_not_pairs(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    (tmp_path / "empty").mkdir()
    assert _job(tmp_path, PairSpec("folder", "empty"), settings, comparator).action == "none"
    assert _job(tmp_path, PairSpec("folder", "gone"), settings, comparator).action == "none"
    _put(tmp_path / "m" / "a.jpg", photos["a"])
    _put(tmp_path / "m" / "b.jpg", photos["a"])
    _put(tmp_path / "m" / "x.pair.json", b'{"a": "a.jpg", "b": "b.jpg"}')
    assert _job(tmp_path, PairSpec("folder", "m"), settings, comparator).action == "none"
    assert not (tmp_path / "m" / "result.json").exists()


@pytest.mark.parametrize(
    ("make", "error_type"),
    [
        (lambda p: b"", "invalid_image"),
        (lambda p: b"hello, not an image\n" * 10, "invalid_image"),
        (lambda p: p["a"][: len(p["a"]) // 2], "invalid_image"),
        (lambda p: png_header_only(40_000, 40_000), "image_too_large"),
    ],
    ids=["zero_bytes", "text", "truncated", "decompression_bomb"],
)
def test_hostile_images_give_error_results(
    tmp_path: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
    make: Callable[[dict[str, bytes]], bytes],
    error_type: str,
) -> None:
    _put(tmp_path / "bad" / "a.jpg", photos["a"])
    hostile = make(photos)
    _put(tmp_path / "bad" / "b.png", hostile)
    report = _job(tmp_path, PairSpec("folder", "bad"), settings, comparator)
    result = _result(tmp_path / "bad" / "result.json")
    assert report.failed and result.error is not None
    assert result.error.type == error_type and result.error.input == "b"
    assert (tmp_path / "bad" / "b.png").read_bytes() == hostile


def test_vanished_input_is_reported_for_that_pair(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "v" / "a.jpg", photos["a"])
    (tmp_path / "v" / "b.jpg").symlink_to("deleted-meanwhile.jpg")
    _job(tmp_path, PairSpec("folder", "v"), settings, comparator)
    result = _result(tmp_path / "v" / "result.json")
    assert result.error is not None
    assert (result.error.type, result.error.input) == ("input_not_found", "b")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_input_is_reported_for_that_pair(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "u" / "a.jpg", photos["a"])
    _put(tmp_path / "u" / "b.jpg", photos["a"]).chmod(0)
    _job(tmp_path, PairSpec("folder", "u"), settings, comparator)
    result = _result(tmp_path / "u" / "result.json")
    assert result.error is not None and result.error.type == "input_unreadable"


def test_a_planted_result_symlink_is_replaced_not_followed(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "p" / "a.jpg", photos["a"])
    _put(tmp_path / "p" / "b.jpg", photos["other"])
    (tmp_path / "p" / "result.json").symlink_to("a.jpg")
    _job(tmp_path, PairSpec("folder", "p"), settings, comparator)
    assert (tmp_path / "p" / "a.jpg").read_bytes() == photos["a"]
    assert not (tmp_path / "p" / "result.json").is_symlink()
    assert _result(tmp_path / "p" / "result.json").status == "ok"


# -- manifests ------------------------------------------------------------------------------------


def test_manifest_pair_with_config_override(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "imgs" / "one.jpg", photos["a"])
    _put(tmp_path / "imgs" / "two.jpg", photos["a_copy"])
    manifest = {"a": "../imgs/one.jpg", "b": "../imgs/two.jpg", "config": {"image_quality": 50}}
    _put(tmp_path / "jobs" / "check.pair.json", json.dumps(manifest).encode())
    report = _job(tmp_path, PairSpec("manifest", "jobs/check.pair.json"), settings, comparator)
    assert report.action == "written" and report.inputs == ("imgs/one.jpg", "imgs/two.jpg")
    result = _result(tmp_path / "jobs" / "check.result.json")
    assert result.pair_id == "jobs/check" and result.status == "ok"
    assert result.config.image_quality == 50
    assert [i.name for i in result.inputs] == ["../imgs/one.jpg", "../imgs/two.jpg"]
    assert result.diff_image == "check.diff.png" and (tmp_path / "jobs/check.diff.png").exists()
    again = _job(tmp_path, PairSpec("manifest", "jobs/check.pair.json"), settings, comparator)
    assert again.action == "skipped"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"ignore_regions": [{"x": 0, "y": 0, "width": 9000, "height": 5}]}, "ignore_regions[0]"),
        ({"image_quality": 500}, "image_quality"),
    ],
)
def test_a_mistake_in_a_manifest_s_config_names_the_field(
    tmp_path: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
    config: dict[str, Any],
    field: str,
) -> None:
    """A box outside image A (known only once A's size is) or an invalid value: a final
    ``invalid_manifest`` result whose ``error.field`` says which field."""
    _put(tmp_path / "m" / "a.jpg", photos["a"])
    _put(tmp_path / "m" / "b.jpg", photos["other"])
    manifest = {"a": "a.jpg", "b": "b.jpg", "config": config}
    _put(tmp_path / "m" / "x.pair.json", json.dumps(manifest).encode())
    report = _job(tmp_path, PairSpec("manifest", "m/x.pair.json"), settings, comparator)
    assert report.disposition.is_done
    result = _result(tmp_path / "m" / "x.result.json")
    assert result.error is not None and result.error.type == "invalid_manifest"
    assert result.error.field == f"config.{field}" and result.error.input is None


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (b"{not json", "invalid_manifest"),
        (b'{"a": "x.jpg"}', "invalid_manifest"),
        (b'{"a": "x.jpg", "b": "y.jpg", "config": {"image_quality": 500}}', "invalid_manifest"),
        (b'{"a": "x.jpg", "b": "missing.jpg"}', "input_not_found"),
    ],
    ids=["not_json", "no_b", "bad_config", "missing_input"],
)
def test_bad_manifests_give_error_results(
    tmp_path: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
    body: bytes,
    error_type: str,
) -> None:
    _put(tmp_path / "x.jpg", photos["a"])
    _put(tmp_path / "y.jpg", photos["a"])
    _put(tmp_path / "m.pair.json", body)
    report = _job(tmp_path, PairSpec("manifest", "m.pair.json"), settings, comparator)
    assert report.failed
    result = _result(tmp_path / "m.result.json")
    assert result.error is not None and result.error.type == error_type


@pytest.fixture
def outside_fifo(tmp_path: Path) -> Path:
    """A root inside tmp_path and, beside it, a FIFO that no read can pass quietly."""
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    fifo = tmp_path / "outside" / "secret.jpg"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_manifest_escaping_the_root_is_refused_without_reading(
    tmp_path: Path,
    outside_fifo: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
    how: str,
) -> None:
    root = tmp_path / "root"
    _put(root / "sub" / "ok.jpg", photos["a"])
    (root / "sub" / "link.jpg").symlink_to(outside_fifo)
    (root / "sub" / "out").symlink_to(outside_fifo.parent, target_is_directory=True)
    a = {
        "dotdot": "../../outside/secret.jpg",
        "absolute": str(outside_fifo),
        "symlink": "link.jpg",
        "symlinked_folder": "out/secret.jpg",
    }[how]
    _put(root / "sub" / "m.pair.json", json.dumps({"a": a, "b": "ok.jpg"}).encode())
    report = _job(root, PairSpec("manifest", "sub/m.pair.json"), settings, comparator)
    assert report.failed
    result = _result(root / "sub" / "m.result.json")
    assert result.error is not None
    assert (result.error.type, result.error.input) == ("path_outside_root", "a")


def test_symlink_out_of_a_pair_folder_is_refused(
    tmp_path: Path,
    outside_fifo: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
) -> None:
    root = tmp_path / "root"
    _put(root / "p" / "b.jpg", photos["a"])
    (root / "p" / "a.jpg").symlink_to(outside_fifo)
    _job(root, PairSpec("folder", "p"), settings, comparator)
    result = _result(root / "p" / "result.json")
    assert result.error is not None
    assert (result.error.type, result.error.input) == ("path_outside_root", "a")


def test_manifest_that_vanished_is_nothing_to_do(
    tmp_path: Path, settings: Settings, comparator: MetricsComparator
) -> None:
    report = _job(tmp_path, PairSpec("manifest", "gone.pair.json"), settings, comparator)
    assert report == JobReport(PairSpec("manifest", "gone.pair.json"), "none", done("not a pair"))
    assert os.listdir(tmp_path) == []


def test_a_fifo_named_like_an_image_is_an_error_not_a_hang(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    _put(tmp_path / "p" / "b.jpg", photos["a"])
    os.mkfifo(tmp_path / "p" / "a.jpg")  # nobody will ever write to it
    report = _job(tmp_path, PairSpec("folder", "p"), settings, comparator)
    assert report.failed
    result = _result(tmp_path / "p" / "result.json")
    assert result.error is not None
    assert (result.error.type, result.error.input) == ("input_unreadable", "a")
    assert "not a regular file" in result.error.message


@pytest.mark.parametrize(
    ("error_type", "retried"),
    [
        ("timeout", True),
        ("out_of_memory", True),
        ("model_unavailable", True),
        ("invalid_image", False),
    ],
)
def test_failures_of_the_moment_are_retried_failures_of_the_inputs_are_not(
    tmp_path: Path,
    photos: dict[str, bytes],
    settings: Settings,
    comparator: MetricsComparator,
    error_type: str,
    retried: bool,
) -> None:
    spec = PairSpec("folder", "p")
    _put(tmp_path / "p" / "a.jpg", photos["a"])
    _put(tmp_path / "p" / "b.jpg", photos["a_copy"])
    _job(tmp_path, spec, settings, comparator)
    result_file = tmp_path / "p" / "result.json"
    failed = _result(result_file).model_copy(
        update={
            "status": "timeout" if error_type == "timeout" else "error",
            "error": ErrorInfo(type=error_type, message="recorded by an earlier run"),
        }
    )
    result_file.write_text(failed.to_json())
    again = _job(tmp_path, spec, settings, comparator)
    assert again.action == ("written" if retried else "skipped")
    assert (_result(result_file).status == "ok") is retried


def test_a_failure_of_the_moment_is_written_but_never_final(
    tmp_path: Path, settings: Settings, comparator: MetricsComparator, photos: dict[str, bytes]
) -> None:
    """Fault 8: an unreadable input (here a FIFO under an image's name) is shown to users as
    an error result, and the job asks to be retried; a bad image is written and done."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.jpg").write_bytes(photos["a"])
    os.mkfifo(tmp_path / "p" / "b.jpg")
    report = _job(tmp_path, PairSpec("folder", "p"), settings, comparator)
    assert report.action == "written" and report.result is not None
    assert report.result.error is not None and report.result.error.type == "input_unreadable"
    assert report.disposition.kind == "retry" and report.disposition.at is None
    (tmp_path / "p" / "b.jpg").unlink()
    (tmp_path / "p" / "b.jpg").write_bytes(b"not an image")
    final = _job(tmp_path, PairSpec("folder", "p"), settings, comparator)
    assert final.result is not None and final.result.error is not None
    assert final.result.error.type == "invalid_image" and final.disposition.kind == "done"


def test_a_pair_in_hand_in_another_process_is_busy_and_retried_soon(
    tmp_path: Path, settings: Settings, comparator: MetricsComparator, photos: dict[str, bytes]
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.jpg").write_bytes(photos["a"])
    (tmp_path / "p" / "b.jpg").write_bytes(photos["a_copy"])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
         str(tmp_path / "p" / ".result.json.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    now = time.time()
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        report = _job(tmp_path, PairSpec("folder", "p"), settings, comparator, now=now)
    finally:
        holder.kill()
        holder.wait()
    assert report.action == "busy" and report.disposition.at == pytest.approx(now + 1)
    assert not (tmp_path / "p" / "result.json").exists()  # nothing was compared
    assert _job(tmp_path, PairSpec("folder", "p"), settings, comparator).action == "written"


# -- ends decided once (issue 19, point 9) ---------------------------------------------------


class _FolderRemoved(MetricsComparator):
    """The metrics comparator, while which the pair's folder is deleted (the user cleaning up)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def compare(self, *args: Any, **kwargs: Any) -> Any:
        shutil.rmtree(self.folder)
        return super().compare(*args, **kwargs)


def test_a_pair_whose_folder_vanishes_while_it_is_compared_is_done_and_says_so(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings
) -> None:
    """Once an ``output_unwritable`` error and a retry that found nothing and said nothing."""
    _put(tmp_path / "gone" / "a.jpg", photos["a"])
    _put(tmp_path / "gone" / "b.jpg", photos["other"])
    with capture_logs() as logs:
        report = _job(
            tmp_path, PairSpec("folder", "gone"), settings, _FolderRemoved(tmp_path / "gone")
        )
    assert (report.action, report.disposition) == ("vanished", done("pair vanished"))
    assert not report.failed
    events = [e["event"] for e in logs]
    assert "pair_vanished" in events and "output_unwritable" not in str(logs)
    assert not (tmp_path / "gone").exists()  # nothing was recreated


def test_a_result_the_process_may_not_write_is_a_final_failure(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    """An immutable folder refuses even root (EPERM): compared once, not retried."""
    folder = tmp_path / "locked"
    _put(folder / "a.jpg", photos["a"])
    _put(folder / "b.jpg", photos["other"])
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        with capture_logs() as logs:
            report = _job(tmp_path, PairSpec("folder", "locked"), settings, comparator)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert report.action == "unwritable" and report.failed
    assert report.disposition.is_done and "final failure" in report.disposition.reason
    (failed,) = [e for e in logs if e.get("error_type") == "output_unwritable"]
    assert failed["final"] is True


def test_a_gate_that_holds_the_plan_back_defers_it_before_anything_is_read(
    tmp_path: Path, photos: dict[str, bytes], settings: Settings, comparator: MetricsComparator
) -> None:
    """The folder watcher's settle gate sits inside the job: it sees the resolved plan (a
    manifest and its images), and holding it back writes nothing and reads no image."""
    _put(tmp_path / "imgs" / "one.jpg", photos["a"])
    _put(tmp_path / "imgs" / "two.jpg", photos["other"])
    manifest = {"a": "../imgs/one.jpg", "b": "../imgs/two.jpg"}
    _put(tmp_path / "jobs" / "m.pair.json", json.dumps(manifest).encode())
    spec = PairSpec("manifest", "jobs/m.pair.json")
    seen: list[tuple[str, ...]] = []

    def gate(plan: Plan) -> bool:
        seen.append(plan.files)
        return len(seen) == 1  # held back once, let through the next time

    held = _job(tmp_path, spec, settings, comparator, gate=gate)
    assert held.action == "deferred" and held.disposition.is_done
    assert held.inputs == ("imgs/one.jpg", "imgs/two.jpg")  # learned, so a change brings it back
    assert seen == [("jobs/m.pair.json", "imgs/one.jpg", "imgs/two.jpg")]
    assert not (tmp_path / "jobs" / "m.result.json").exists()
    passed = _job(tmp_path, spec, settings, comparator, gate=gate)
    assert (
        passed.action == "written" and _result(tmp_path / "jobs" / "m.result.json").status == "ok"
    )
