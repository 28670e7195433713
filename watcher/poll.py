"""(placeholder: being implemented)"""

from __future__ import annotations

import argparse

from handler.config import Settings


def configure_parser(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, settings: Settings) -> int:
    raise NotImplementedError
