"""The ``pairwatch`` command line.

``pairwatch compare A B`` · ``pairwatch schema`` · ``pairwatch watch DIR`` ·
``pairwatch watch sqs QUEUE_URL`` · ``pairwatch watch minio s3://BUCKET/PREFIX`` ·
``pairwatch watch poll s3://BUCKET/PREFIX`` · ``pairwatch report DIR`` · ``pairwatch serve``
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from watcher.args import EXIT_OK, EXIT_USAGE
from watcher.commands import COMMANDS

_WATCH_SOURCES = ("sqs", "minio", "poll")


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command's options; no implementation is imported (see watcher.commands)."""
    parser = argparse.ArgumentParser(
        prog="pairwatch",
        description="Compare image pairs with bounded memory and hard timeouts.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        _add_common_options(sub)
        command.configure(sub)
    schema = subparsers.add_parser("schema", help="Print the result JSON Schema.")
    schema.set_defaults(command="schema")
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="settings file (TOML or JSON)")
    parser.add_argument(
        "--comparator", choices=("auto", "metrics", "vl"), help="override PAIRWATCH_COMPARATOR"
    )
    parser.add_argument("--model", help="VL model: Hugging Face id or local folder")
    parser.add_argument(
        "--vl-endpoint",
        metavar="URL",
        help="OpenAI-compatible server for the VL model (sets vl_backend=openai)",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _normalise_argv(argv: list[str]) -> list[str]:
    """``watch sqs URL`` -> ``watch-sqs URL``; ``watch DIR`` stays the local-folder watcher."""
    if len(argv) >= 2 and argv[0] == "watch" and argv[1] in _WATCH_SOURCES:
        return [f"watch-{argv[1]}", *argv[2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(args_list)
    if args.command == "schema":
        import json

        from handler.result import result_json_schema

        print(json.dumps(result_json_schema(), indent=2))
        return EXIT_OK
    from handler.config import ConfigFileError
    from handler.logs import configure_logging

    try:
        settings = settings_from_args(args)
    except ConfigFileError as exc:
        print(f"pairwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    if args.command.startswith("watch") and settings.metrics_port is not None:
        from watcher.prometheus import start_metrics_server

        start_metrics_server(settings.metrics_port, settings.serve_host)
    code: int = _implementation(args.command)(args, settings)
    return code


def settings_from_args(args: argparse.Namespace) -> Any:
    """The one way flags become ``Settings``: every option whose ``dest`` names a settings
    field overrides it (validated; ``ConfigFileError`` names the field and the allowed range)."""
    from handler.config import Settings, load_settings

    flags = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    if flags.get("vl_endpoint"):
        flags["vl_backend"] = "openai"  # --vl-endpoint means: the model runs on that server
    return load_settings(args.config, **flags)


def _implementation(command: str) -> Callable[[argparse.Namespace, Any], int]:
    module_name, _, function = COMMANDS[command].run.partition(":")
    run: Callable[[argparse.Namespace, Any], int] = getattr(
        importlib.import_module(module_name), function
    )
    return run


def run_command() -> NoReturn:
    """The ``pairwatch`` executable: ``main``, then exit with its code.

    The objects every imported module made (numpy, scipy, scikit-image: ~70,000) are frozen
    first, so the interpreter's last garbage collection does not walk them on the way out:
    ~0.1 s of a one-shot ``pairwatch compare``. (Not in ``main``: tests call it in-process.)
    """
    code = main()
    gc.freeze()
    raise SystemExit(code)


if __name__ == "__main__":
    run_command()
