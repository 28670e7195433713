"""The ``pairwatch`` command line.

``pairwatch compare A B`` · ``pairwatch schema`` · ``pairwatch watch DIR`` ·
``pairwatch watch sqs QUEUE_URL`` · ``pairwatch watch minio s3://BUCKET/PREFIX`` ·
``pairwatch watch poll s3://BUCKET/PREFIX`` · ``pairwatch report DIR`` · ``pairwatch serve``
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from handler.config import ConfigFileError, Settings, load_settings
from handler.logs import configure_logging
from watcher.args import EXIT_OK, EXIT_USAGE, port_number

#: Sub-commands implemented in their own modules: each has ``configure_parser(parser)`` and
#: ``run(args, settings) -> int``. ``watch sqs|minio|poll`` are spelled ``watch-<source>`` here.
SUBCOMMAND_MODULES = {
    "compare": "watcher.compare_command",
    "watch": "watcher.local",
    "watch-sqs": "watcher.sqs",
    "watch-minio": "watcher.minio_listen",
    "watch-poll": "watcher.poll",
    "report": "watcher.report",
    "serve": "watcher.serve",
}
_WATCH_SOURCES = ("sqs", "minio", "poll")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="pairwatch",
        description="Compare image pairs with bounded memory and hard timeouts.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    for name, module_name in SUBCOMMAND_MODULES.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        doc = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=doc, description=module.__doc__)
        _add_common_options(sub)
        if name.startswith("watch"):
            sub.add_argument(
                "--metrics-port",
                type=port_number,
                metavar="PORT",
                help="serve Prometheus metrics on PORT (metrics_port; on serve_host)",
            )
        module.configure_parser(sub)
    schema = subparsers.add_parser("schema", help="Print the result JSON Schema.")
    schema.set_defaults(command="schema")
    return parser, modules


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="settings file (TOML or JSON)")
    parser.add_argument(
        "--comparator", choices=("auto", "metrics", "vl"), help="override PAIRWATCH_COMPARATOR"
    )
    parser.add_argument("--model", help="VL model: Hugging Face id or local folder")
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _normalise_argv(argv: list[str]) -> list[str]:
    """``watch sqs URL`` -> ``watch-sqs URL``; ``watch DIR`` stays the local-folder watcher."""
    if len(argv) >= 2 and argv[0] == "watch" and argv[1] in _WATCH_SOURCES:
        return [f"watch-{argv[1]}", *argv[2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser, modules = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "schema":
        from handler.result import result_json_schema

        print(json.dumps(result_json_schema(), indent=2))
        return EXIT_OK
    try:
        settings = _settings_from_args(args)
    except ConfigFileError as exc:
        print(f"pairwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    if args.command.startswith("watch") and settings.metrics_port is not None:
        from watcher.metrics import start_metrics_server

        start_metrics_server(settings.metrics_port, settings.serve_host)
    code: int = modules[args.command].run(args, settings)
    return code


def _settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config,
        comparator=args.comparator,
        model=args.model,
        log_format=args.log_format,
        log_level=args.log_level,
        metrics_port=getattr(args, "metrics_port", None),
    )


if __name__ == "__main__":
    raise SystemExit(main())
