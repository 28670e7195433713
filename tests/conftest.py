"""Shared test set-up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import structlog

from tests.support.clock import Clock

if TYPE_CHECKING:
    from tests.support.rendered import Rendered


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


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Small real photographs: the same picture twice (``a``, and ``a_copy`` re-encoded), the
    same as a PNG (``png``) and a different picture (``other``)."""
    from tests.support import scenes  # scikit-image: only for the tests that use photos

    astronaut = scenes.photo("astronaut").resize((192, 192))
    return {
        "a": scenes.encode(astronaut),
        "a_copy": scenes.encode(astronaut, quality=80),
        "other": scenes.encode(scenes.photo("coffee").resize((192, 128))),
        "png": scenes.as_png(astronaut),
    }


@pytest.fixture(scope="session")
def huge_pair() -> tuple[bytes, bytes]:
    """Two flat 14000 x 14000 PNGs (196 MP, ~0.6 MB each), black and white: every pixel
    differs, so detection has to look at all of them (the issue measured 84 s)."""
    from tests.support.png import flat_png

    return flat_png(14_000, 14_000, 0), flat_png(14_000, 14_000, 255)


@pytest.fixture
def no_pairwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PAIRWATCH_*`` or AWS endpoint variable of the caller's shell reaches an in-process
    CLI run: only the test's own arguments and settings count."""
    for name in list(os.environ):
        if name.startswith(("PAIRWATCH_", "AWS_ENDPOINT_URL")):
            monkeypatch.delenv(name)


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock (``clock.now``), for components with an injectable clock."""
    return Clock()


@pytest.fixture(scope="session")
def pages() -> dict[str, Rendered]:
    """The shop page and its edited versions, each rendered once by headless Chromium as a
    full-page screenshot (``tests.support.rendered``): a few seconds for all of them."""
    from tests.support.browser import require_browser
    from tests.support.rendered import render_all

    require_browser()
    return render_all()
