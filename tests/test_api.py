"""``handler.compare_files``: the Python API runs ``pairwatch compare``'s pipeline, on real
files and bytes, and never raises for a bad input."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import handler
import handler.api
from handler import ComparisonConfig, ComparisonResult, Settings, compare_files
from tests.support import scenes
from tests.support.png import flat_png, png_header_only

pytestmark = pytest.mark.usefixtures("no_pairwatch_env")

#: What differs between two runs of the same comparison (or is named after the input).
_PER_RUN = {"timings_ms", "created_at", "pair_id"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A photo and the same photo with another pasted over a few percent of it."""
    folder = tmp_path_factory.mktemp("api")
    img = scenes.photo("chelsea")
    a, b = folder / "a.jpg", folder / "b.jpg"
    a.write_bytes(scenes.encode(img))
    b.write_bytes(scenes.pasted_object(img, 0.05))
    return a, b


def _cli(a: Path, b: Path) -> ComparisonResult:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "compare", str(a), str(b)],
        capture_output=True,
        text=True,
        env={**env, "PAIRWATCH_LOG_FORMAT": "json"},
        timeout=120,
    )
    return ComparisonResult.model_validate_json(proc.stdout)


def _fields(result: ComparisonResult) -> dict[str, Any]:
    """The result without what changes from run to run, and without the inputs' names."""
    fields = result.model_dump(mode="json", exclude=_PER_RUN)
    for info in fields["inputs"]:
        info.pop("name")
    return fields


def test_import_handler_stays_light() -> None:
    code = (
        "import sys, handler\n"
        "heavy = [m for m in ('numpy', 'PIL', 'pyvips', 'pydantic') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from handler import compare_files\n"
        "assert 'PIL' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert handler.compare_files is handler.api.compare_files
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = handler.no_such_name  # type: ignore[attr-defined]


def test_the_docstring_example_runs() -> None:
    outcome = doctest.testmod(handler.api, raise_on_error=False)
    assert outcome.attempted >= 10
    assert outcome.failed == 0


def test_paths_and_bytes_give_what_pairwatch_compare_gives(pair: tuple[Path, Path]) -> None:
    a, b = pair
    expected = _cli(a, b)
    assert expected.status == "ok" and not expected.is_similar and expected.changed_regions

    from_paths = compare_files(a, str(b))
    from_bytes = compare_files(a.read_bytes(), b.read_bytes())

    assert from_paths.pair_id == expected.pair_id == "a.jpg~b.jpg"
    assert [i.name for i in from_paths.inputs] == ["a.jpg", "b.jpg"]
    assert from_bytes.pair_id == "a~b"
    assert [i.name for i in from_bytes.inputs] == ["a", "b"]
    assert _fields(from_paths) == _fields(expected)
    assert _fields(from_bytes) == _fields(expected)


def test_identical_bytes_are_answered_without_decoding(pair: tuple[Path, Path]) -> None:
    result = compare_files(pair[0], pair[0].read_bytes())
    assert (result.status, result.is_similar, result.similarity) == ("ok", True, 1.0)
    assert "detect" not in result.timings_ms  # the shortcut: nothing was decoded


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_bad_inputs_give_error_results(
    pair: tuple[Path, Path], tmp_path: Path, as_bytes: bool
) -> None:
    good = pair[0].read_bytes()
    cases = {
        "truncated.jpg": (good[: len(good) // 3], "invalid_image"),
        "notes.jpg": (b"just some text, not an image\n", "invalid_image"),
        "empty.png": (b"", "invalid_image"),
        "bomb.png": (png_header_only(30_000, 30_000), "image_too_large"),
    }
    for name, (data, error_type) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = compare_files(pair[0], data if as_bytes else path)
        assert result.status == "error", name
        assert result.error is not None
        assert (result.error.type, result.error.input) == (error_type, "b"), name
        assert result.inputs[0].format == "JPEG"
        assert path.read_bytes() == data  # inputs are never altered


def test_a_missing_file_and_a_folder_give_error_results(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    missing = compare_files(tmp_path / "nope.jpg", pair[1])
    assert missing.error is not None
    assert (missing.error.type, missing.error.input) == ("input_not_found", "a")
    folder = compare_files(pair[0], tmp_path)
    assert folder.error is not None
    assert (folder.error.type, folder.error.input) == ("input_unreadable", "b")


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_the_settings_limits_hold(pair: tuple[Path, Path], as_bytes: bool) -> None:
    a, b = (p.read_bytes() if as_bytes else p for p in pair)
    size = min(p.stat().st_size for p in pair)  # both over it: the first fails
    by_bytes = compare_files(a, b, settings=Settings(max_input_bytes=size - 1))
    assert by_bytes.error is not None
    assert (by_bytes.error.type, by_bytes.error.input) == ("image_too_large", "a")
    assert by_bytes.inputs[0].sha256 is None  # refused before it was read into the pipeline
    by_pixels = compare_files(a, b, settings=Settings(max_input_pixels=1000))
    assert by_pixels.error is not None
    assert (by_pixels.error.type, by_pixels.error.input) == ("image_too_large", "a")


def test_a_config_is_honoured(pair: tuple[Path, Path]) -> None:
    x, y, width, height = scenes.pasted_box(scenes.photo("chelsea"), 0.05)
    box = {"x": x - 8, "y": y - 8, "width": width + 16, "height": height + 16}
    ignored = ComparisonConfig(ignore_regions=[box])
    result = compare_files(*pair, ignored)
    assert result.status == "ok" and result.is_similar and not result.changed_regions
    assert result.config == ignored
    as_region = ComparisonConfig(regions=[{**box, "match_level": "ignore"}])
    assert compare_files(*pair, as_region).is_similar
    # The settings' comparison is the default config.
    strict = compare_files(*pair, settings=Settings(comparison=ignored))
    assert strict.is_similar and strict.config == ignored


def test_a_wrong_argument_is_the_callers_mistake(pair: tuple[Path, Path]) -> None:
    with pytest.raises(TypeError, match="b must be a path or bytes"):
        compare_files(pair[0], 42)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def large_pair() -> tuple[bytes, bytes]:
    """Two flat 6000 x 6000 PNGs, black and white: every pixel differs (a second or more)."""
    return flat_png(6000, 6000, 0), flat_png(6000, 6000, 255)


def test_processing_timeout_bounds_it(large_pair: tuple[bytes, bytes]) -> None:
    """The config's timeout stops the pair, and the settings' is a ceiling a config cannot
    raise (as in ``serve`` and the watchers)."""
    short = compare_files(*large_pair, ComparisonConfig(processing_timeout=0.05))
    ceiling = compare_files(
        *large_pair,
        ComparisonConfig(processing_timeout=600),
        Settings(comparison=ComparisonConfig(processing_timeout=0.05)),
    )
    for result in (short, ceiling):
        assert result.status == "timeout"
        assert result.error is not None and result.error.type == "timeout"
        assert result.error.stage in ("prepare", "detect", "compare")
        # Stopped within a second or so of its deadline, not after the whole detection.
        assert result.timings_ms["total"] < 2000
