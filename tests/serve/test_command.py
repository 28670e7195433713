"""The settings ``pairwatch serve`` adds, and its command line's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from handler.compare import resolve_concurrency
from handler.config import ConfigFileError, load_settings
from tests.support.s3_servers import ROOT
from watcher.cli import build_parser, main, settings_from_args
from watcher.serve import command

OPENAI = ["--model", "m", "--vl-endpoint", "http://127.0.0.1:9/v1"]


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
    # The metrics comparator: one pair per core this process may use (its affinity mask).
    assert resolve_concurrency(load_settings(comparator="metrics")) == len(os.sched_getaffinity(0))
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
        # An empty secret, in any form, never means "no authentication" (issue 19).
        ([], {"PAIRWATCH_EVENTS_TOKEN": ""}, "events_token: Value error, is empty"),
        ([], {"PAIRWATCH_EVENTS_TOKEN": "   "}, "events_token: Value error, is empty"),
        ([], {"PAIRWATCH_EVENTS_TOKEN_FILE": "/dev/null"}, "events_token_file: secret file"),
        (OPENAI, {"PAIRWATCH_VL_API_KEY": ""}, "vl_api_key: Value error, is empty"),
        (OPENAI, {"PAIRWATCH_VL_API_KEY_FILE": "/dev/null"}, "vl_api_key_file: secret file"),
        (
            ["--model", "m", "--vl-endpoint", "http://user:s3cret@127.0.0.1:9/v1"],
            {},
            "vl_endpoint: Value error, credentials in the URL are not used",
        ),
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
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "s3cret" not in done.stderr  # the refusal does not repeat the credentials


def test_serve_host_and_port_flags_become_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--host``/``--port`` go through the one flags->Settings path: over the config file,
    validated with it, and what ``serve`` binds."""
    config = tmp_path / "pairwatch.toml"
    config.write_text('serve_host = "127.0.0.2"\nserve_port = 9001\n')
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--host", "0.0.0.0", "--port", "9000"]
    )
    settings = settings_from_args(args)
    assert (settings.serve_host, settings.serve_port) == ("0.0.0.0", 9000)
    plain = settings_from_args(build_parser().parse_args(["serve", "--config", str(config)]))
    assert (plain.serve_host, plain.serve_port) == ("127.0.0.2", 9001)

    bound: dict[str, object] = {}
    monkeypatch.setattr(
        command._Server,
        "run",
        lambda self: bound.update(host=self.config.host, port=self.config.port),
    )
    command.run(args, settings)
    assert bound == {"host": "0.0.0.0", "port": 9000}


def test_a_bad_serve_port_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--port", "70000"])
    assert usage.value.code == 2
    assert "--port: 70000 is not a port number" in capsys.readouterr().err
    config = tmp_path / "pairwatch.toml"
    config.write_text("serve_port = 70000\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "serve_port" in capsys.readouterr().err
