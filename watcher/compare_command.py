"""Compare two image files and print the result JSON on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handler.api import compare_files
from handler.config import Settings
from handler.errors import PairError
from handler.storage import LocalStorage
from watcher.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _same_file(output: Path, image: Path) -> bool:
    """Would writing ``output`` replace ``image``? (same name once folders are resolved, or
    the same file behind a symlink)"""
    entry = output.parent.resolve() / output.name
    return entry == image.parent.resolve() / image.name or output.resolve() == image.resolve()


def _output_problem(output: Path, inputs: tuple[Path, Path]) -> str | None:
    if any(_same_file(output, image) for image in inputs):
        return "is one of the inputs"
    if output.is_dir():
        return "is a folder"
    if not output.parent.is_dir():
        return "is not in an existing folder"
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    output: Path | None = args.output
    # Checked before comparing: with a VL model, the comparison is the expensive part.
    if output is not None:
        problem = _output_problem(output, (args.a, args.b))
        if problem:
            print(f"pairwatch compare: --output {output} {problem}", file=sys.stderr)
            return EXIT_USAGE
    result = compare_files(args.a, args.b, settings=settings)
    text = result.to_json()
    sys.stdout.write(text)
    if output is not None:
        try:
            LocalStorage(output.parent).write_atomic(output.name, text.encode("utf-8"))
        except (OSError, PairError) as exc:
            reason = exc.message if isinstance(exc, PairError) else exc.strerror or str(exc)
            print(f"pairwatch compare: cannot write {output}: {reason}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK if result.status == "ok" else EXIT_FAILED
