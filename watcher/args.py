"""What every sub-command shares: its exit statuses and the argparse types of its options.

An argparse type that raises ``ArgumentTypeError`` becomes a usage message and exit status 2
before anything is started, which is where a bad duration belongs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from handler.errors import PairError
from handler.pairs import normalise_prefix

#: 0: done (or stopped by a signal) · 1: a pair or the service failed · 2: bad command line.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def seconds(text: str) -> float:
    """A duration in seconds that may be 0 (``--settle-time 0``: read at once)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give seconds >= 0")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds above 0 (a zero interval or pair timeout would spin or misfire)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _finite(text: str) -> float:
    # float() accepts "nan" and "inf": neither is a usable duration (nan compares false to
    # everything, so it would slip past every bound check below).
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return value


@dataclass(frozen=True)
class BucketURL:
    bucket: str
    prefix: str


def parse_s3_url(text: str) -> BucketURL:
    """``s3://BUCKET`` or ``s3://BUCKET/PREFIX`` (the prefix is a folder: ``a/b`` = ``a/b/``)."""
    if not text.startswith("s3://"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an s3://BUCKET/PREFIX URL")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise argparse.ArgumentTypeError(f"{text!r} names no bucket")
    try:
        return BucketURL(bucket, normalise_prefix(prefix))
    except PairError as exc:  # PathOutsideRoot: "..", "." or empty segments, control characters
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port
