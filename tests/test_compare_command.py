"""``pairwatch compare`` and ``pairwatch schema`` through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.result import ComparisonResult
from tests.support import scenes
from tests.support.logs import json_events
from watcher.cli import main

PAIRWATCH = [sys.executable, "-m", "watcher.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PAIRWATCH_LOG_FORMAT": "json", **(env or {})}
    full_env.pop("PAIRWATCH_MODEL", None)
    return subprocess.run(
        [*PAIRWATCH, *args], capture_output=True, text=True, env=full_env, timeout=120
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    img = scenes.photo("chelsea")
    a, b = folder / "a.jpg", folder / "b.png"
    a.write_bytes(scenes.encode(img))
    b.write_bytes(scenes.as_png(img))
    return a, b


def test_compare_prints_a_valid_result(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = _run("compare", str(pair[0]), str(pair[1]), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = ComparisonResult.model_validate_json(proc.stdout)
    assert result.status == "ok" and result.is_similar
    assert result.comparator.name == "metrics"
    assert [i.format for i in result.inputs] == ["JPEG", "PNG"]
    assert result.inputs[0].sha256 != result.inputs[1].sha256
    assert {"prepare", "compare", "total"} <= set(result.timings_ms)
    assert ComparisonResult.model_validate_json(out.read_text()) == result
    events = [e["event"] for e in json_events(proc.stderr, strict=True)]
    assert events.count("image_prepared") == 2 and "pair_compared" in events


def test_a_bad_input_gives_an_error_result_and_exit_1(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(pair[0].read_bytes()[:500])
    proc = _run("compare", str(pair[0]), str(broken))
    assert proc.returncode == 1
    result = ComparisonResult.model_validate_json(proc.stdout)
    assert result.status == "error"
    assert result.error is not None
    assert (result.error.type, result.error.input) == ("invalid_image", "b")
    assert result.inputs[0].format == "JPEG"
    assert any(e["event"] == "pair_failed" for e in json_events(proc.stderr, strict=True))


def test_a_missing_input(pair: tuple[Path, Path], tmp_path: Path) -> None:
    proc = _run("compare", str(tmp_path / "nope.jpg"), str(pair[1]))
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert (error["type"], error["input"]) == ("input_not_found", "a")


@pytest.mark.usefixtures("no_pairwatch_env")
def test_usage_errors_exit_2(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in ([str(pair[0])], [str(pair[0]), str(pair[1]), "--comparator", "gpu"]):
        with pytest.raises(SystemExit) as exit_:
            main(["compare", *args])
        assert exit_.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[comparison]\nimage_quality = 0\n")
    capsys.readouterr()
    assert main(["compare", str(pair[0]), str(pair[1]), "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "comparison.image_quality" in captured.err
    assert captured.out == ""


def test_config_file_reaches_the_comparison(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"comparison": {"max_image_size": [200, 200]}}))
    proc = _run("compare", str(pair[0]), str(pair[1]), "--config", str(config))
    result = ComparisonResult.model_validate_json(proc.stdout)
    assert result.config.max_image_size == (200, 200)
    assert result.inputs[0].processed_size == (200, 133)


def test_schema_describes_the_result() -> None:
    proc = _run("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    for field in ("pair_id", "status", "similarity", "changed_regions", "inputs", "error"):
        assert field in schema["properties"]
    # What each region is and where it lies in each image; how B lines up with A.
    region = schema["$defs"]["Region"]["properties"]
    assert region["kind"]["enum"] == ["changed", "added", "removed", "moved"]
    assert {"a", "b", "shift", "x", "y", "width", "height"} <= set(region)
    assert "alignment" in schema["properties"]
    alignment = schema["$defs"]["AlignmentInfo"]["properties"]
    assert {"offset", "bands"} <= set(alignment)
    band = schema["$defs"]["BandInfo"]["properties"]
    assert band["kind"]["enum"] == ["matched", "inserted", "removed"]
    config = schema["$defs"]["ComparisonConfig"]["properties"]
    assert config["match_level"]["enum"] == ["strict", "ignore_moves", "exact", "ignore_colors"]
    assert "regions" in config


def test_output_never_replaces_an_input(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before comparing (exit 2): as A itself, through ``..``, through a symlink, as B."""
    a = tmp_path / "a.jpg"
    a.write_bytes(pair[0].read_bytes())
    link = tmp_path / "link.jpg"
    link.symlink_to(a)
    (tmp_path / "sub").mkdir()
    for output in (a, tmp_path / "sub" / ".." / "a.jpg", link, pair[1]):
        assert main(["compare", str(a), str(pair[1]), "-o", str(output)]) == 2
        captured = capsys.readouterr()
        assert "is one of the inputs" in captured.err and captured.out == ""
    assert a.read_bytes() == pair[0].read_bytes() and link.is_symlink()
    assert main(["compare", str(a), str(pair[1]), "-o", str(tmp_path / "no" / "r.json")]) == 2
    assert "is not in an existing folder" in capsys.readouterr().err
    assert main(["compare", str(a), str(pair[1]), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_output_is_replaced_atomically(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")
    proc = _run("compare", str(pair[0]), str(pair[1]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert ComparisonResult.model_validate_json(out.read_text()).status == "ok"
    # The temporary file was renamed over the result: none is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
