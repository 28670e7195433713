"""structlog set-up: JSON lines in production, a console renderer for humans; always stderr."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Route every log event to stderr (stdout stays clean for result JSON)."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def elapsed_ms(start: float) -> float:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` reading), as logs report them."""
    return round((time.perf_counter() - start) * 1000, 2)


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger("pairwatch", **initial)
