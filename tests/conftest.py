"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _default_logging() -> None:
    """Every test starts on structlog's defaults: an in-process CLI test configures logging for
    the whole process, onto a capture stream that is closed once that test ends."""
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """The Hugging Face hub is unreachable here: models load from local folders only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield
