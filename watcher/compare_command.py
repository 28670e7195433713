"""Compare two image files and print the result JSON on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handler.compare import create_comparator
from handler.config import Settings
from handler.pipeline import ImageInput, compare_pair
from handler.storage import read_file


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="image A")
    parser.add_argument("b", type=Path, help="image B")
    parser.add_argument("--output", "-o", type=Path, help="also write the result JSON here")


def _file_input(path: Path, max_bytes: int) -> ImageInput:
    return ImageInput(name=path.name, load=lambda: read_file(path, max_bytes))


def run(args: argparse.Namespace, settings: Settings) -> int:
    comparator = create_comparator(settings)
    try:
        result = compare_pair(
            f"{args.a.name}~{args.b.name}",
            _file_input(args.a, settings.max_input_bytes),
            _file_input(args.b, settings.max_input_bytes),
            settings.comparison,
            comparator,
            max_input_pixels=settings.max_input_pixels,
        ).result
    finally:
        comparator.close()
    text = result.to_json()
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0 if result.status == "ok" else 1
