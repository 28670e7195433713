"""The settings ``pairwatch serve`` adds, and its command line's refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from handler.compare import resolve_concurrency
from handler.config import ConfigFileError, load_settings
from tests.support.s3_servers import ROOT


def test_events_token_comes_from_a_file_and_never_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("  s3cr3t-token\n")
    monkeypatch.setenv("PAIRWATCH_EVENTS_TOKEN_FILE", str(secret))
    settings = load_settings()
    assert settings.events_token is not None
    assert settings.events_token.get_secret_value() == "s3cr3t-token"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings.model_dump())


def test_events_token_beats_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file")
    settings = load_settings(events_token="direct", events_token_file=secret)
    assert settings.events_token is not None
    assert settings.events_token.get_secret_value() == "direct"


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_a_missing_or_empty_token_file_is_a_configuration_error(
    tmp_path: Path, content: str | None
) -> None:
    secret = tmp_path / "token"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigFileError, match="secret file"):
        load_settings(events_token_file=secret)


def test_concurrency_defaults_by_comparator() -> None:
    assert resolve_concurrency(load_settings(comparator="metrics")) == 1
    assert resolve_concurrency(load_settings(comparator="vl", model="/m")) == 8
    assert resolve_concurrency(load_settings(comparator="vl", model="/m", concurrency=3)) == 3
    with pytest.raises(ConfigFileError, match="concurrency"):
        load_settings(concurrency=0)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "not a port number"),
        (["--port", "http"], {}, "not a port number"),
        ([], {"PAIRWATCH_SERVE_PORT": "-1"}, "serve_port"),
        ([], {"PAIRWATCH_EVENTS_TOKEN_FILE": "/nonexistent/token"}, "cannot read secret file"),
    ],
)
def test_serve_refuses_bad_options_with_status_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "serve", *args],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert message in done.stderr
