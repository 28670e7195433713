"""Every input gets a result: tiny images, corrupt pixel streams and a seeded fuzz corpus (sizes
1..64 px, every mode, lossless and lossy, truncated, bytes flipped) through the shared pipeline,
then through the real ``pairwatch compare``, ``pairwatch watch`` and ``pairwatch serve``
processes: a result (ok, or an error naming its input) for every pair, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.pipeline import ImageInput, compare_pair
from handler.result import ComparisonResult
from tests.support import screens
from tests.support.fuzz_images import FuzzPair, corrupt_idat_png, fuzz_pairs, tiny_differing_pairs
from tests.support.serve_process import ServeProcess, serve_process
from tests.support.watch_run import age, watch_once

PAIRWATCH = [sys.executable, "-m", "watcher.cli"]
#: Errors an input may honestly end in; anything else (internal_error above all) is a bug.
INPUT_ERRORS = {"invalid_image", "unsupported_format", "image_too_large"}
SEED = 18


def _compare(pair: FuzzPair) -> ComparisonResult:
    return compare_pair(
        "fuzz",
        ImageInput("a", lambda: pair.a),
        ImageInput("b", lambda: pair.b),
        ComparisonConfig(),
        MetricsComparator(),
        max_input_pixels=1_000_000,
        diff_image=True,
    ).result


def _acceptable(result: ComparisonResult) -> bool:
    if result.status == "ok":
        return result.similarity is not None and result.is_similar is not None
    return result.error is not None and result.error.type in INPUT_ERRORS


@pytest.mark.parametrize("pair", list(tiny_differing_pairs()), ids=lambda pair: pair.name)
def test_tiny_differing_images_get_a_result(pair: FuzzPair) -> None:
    result = _compare(pair)
    assert result.status == "ok", result.error
    assert result.metrics["pixel_identical"] == 0.0


def test_a_png_with_a_corrupt_pixel_stream_is_an_invalid_image() -> None:
    good = tiny_differing_pairs().__next__().a
    result = _compare(FuzzPair("corrupt IDAT", good, corrupt_idat_png()))
    assert result.status == "error" and result.error is not None
    assert (result.error.type, result.error.input) == ("invalid_image", "b")
    assert "decode" in result.error.message


def test_the_fuzz_corpus_never_escapes_the_pipeline() -> None:
    """Seeded: a failure names the case (format, mode, size, damage) to rerun."""
    for pair in fuzz_pairs(SEED, 160):
        try:
            result = _compare(pair)
        except Exception as exc:  # the point of the test: nothing may get here
            pytest.fail(f"{pair.name}: {type(exc).__name__}: {exc}")
        assert _acceptable(result), (pair.name, result.error)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRWATCH_")}
    return {**env, "PAIRWATCH_LOG_FORMAT": "json", "PAIRWATCH_SETTLE_TIME": "0.1"}


def test_pairwatch_compare_answers_tiny_and_corrupt_inputs(tmp_path: Path) -> None:
    tiny = next(tiny_differing_pairs())
    (tmp_path / "a.png").write_bytes(tiny.a)
    (tmp_path / "b.png").write_bytes(tiny.b)
    (tmp_path / "corrupt.png").write_bytes(corrupt_idat_png())
    for b, status in (("b.png", 0), ("corrupt.png", 1)):
        proc = subprocess.run(
            [*PAIRWATCH, "compare", str(tmp_path / "a.png"), str(tmp_path / b)],
            capture_output=True,
            text=True,
            env=_cli_env(),
            timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.returncode == status, proc.stderr[-2000:]
        assert _acceptable(ComparisonResult.model_validate_json(proc.stdout))


def _sample() -> list[FuzzPair]:
    """A slice of the corpus for the process-level runs, plus the two known offenders."""
    return [
        next(tiny_differing_pairs()),
        FuzzPair("corrupt IDAT", next(tiny_differing_pairs()).a, corrupt_idat_png()),
        *fuzz_pairs(SEED + 1, 14),
    ]


def test_watch_writes_a_result_for_every_fuzzed_pair(tmp_path: Path) -> None:
    folders = []
    for index, pair in enumerate(_sample()):
        folder = tmp_path / f"pair{index:02d}"
        folder.mkdir()
        (folder / "a.png").write_bytes(pair.a)
        (folder / "b.png").write_bytes(pair.b)
        folders.append((folder, pair))
    age(tmp_path)
    run = watch_once(tmp_path, "--comparator", "metrics", timeout=120)
    assert run.returncode in (0, 1), run.stderr[-2000:]  # 1: some pairs failed (on their inputs)
    assert "Traceback" not in run.stderr and not run.named("internal_error")
    for folder, pair in folders:
        result = ComparisonResult.model_validate_json((folder / "result.json").read_text())
        assert _acceptable(result), (pair.name, result.error)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_process(tmp_path_factory.mktemp("serve"), {"PAIRWATCH_COMPARATOR": "metrics"}) as up:
        yield up


def test_serve_takes_a_match_level_per_request(server: ServeProcess) -> None:
    """A moved label: different by default, the same under ``ignore_moves``; a level that
    does not exist is the client's mistake, a 422 naming the field."""
    text = "Delivery address: 221B Baker Street"
    a = screens.png(screens.label_card(text))
    b = screens.png(screens.label_card(text, offset=(3, 2)))

    def post(config: str | None) -> httpx.Response:
        return httpx.post(
            server.url + "/v1/compare",
            files={"a": ("a.png", a, "image/png"), "b": ("b.png", b, "image/png")},
            data={"config": config} if config else {},
            timeout=60,
        )

    strict = ComparisonResult.model_validate(post(None).json())
    assert strict.is_similar is False and [r.kind for r in strict.changed_regions] == ["moved"]
    moves = ComparisonResult.model_validate(post('{"match_level": "ignore_moves"}').json())
    assert moves.is_similar is True and moves.config.match_level == "ignore_moves"
    wrong = post('{"match_level": "loose"}')
    assert wrong.status_code == 422 and "match_level" in wrong.text


def test_serve_answers_every_fuzzed_pair(server: ServeProcess) -> None:
    for pair in _sample():
        response = httpx.post(
            server.url + "/v1/compare",
            files={"a": ("a.png", pair.a, "image/png"), "b": ("b.png", pair.b, "image/png")},
            timeout=60,
        )
        # 422: the result of a pair that failed on its inputs, or the upload's own check of a
        # header it could not read (a detail naming the field).
        assert response.status_code in (200, 422), (pair.name, response.text)
        body = response.json()
        if "pair_id" in body:
            assert _acceptable(ComparisonResult.model_validate(body)), pair.name
        else:
            assert response.status_code == 422 and body["detail"], pair.name
    assert "Traceback" not in server.log_path.read_text()
    assert not server.events("internal_error")
