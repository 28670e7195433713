"""Shared test set-up."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _default_logging() -> None:
    """Every test starts on structlog's defaults: an in-process CLI test configures logging for
    the whole process, onto a capture stream that is closed once that test ends."""
    structlog.reset_defaults()
