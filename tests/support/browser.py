"""Headless Debian Chromium driven by Selenium, launched the one way this machine allows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

#: Without the background-networking flags Chromium keeps dialling out, and this machine's
#: closed network refuses every attempt; QUIC likewise.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,900",
)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver), or None when they or selenium are not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    return chromium, driver


def start_chromium(profile: Path, *, console_log: bool = False) -> Any:
    """A fresh Chromium on an empty ``profile`` folder; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError("headless Chromium + chromedriver + selenium are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download anything.
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(30)
    return driver


def require_browser() -> None:
    """Skip the calling test (fail it with ``PAIRWATCH_REQUIRE_BROWSER=1``, as CI sets) when
    headless Chromium, chromedriver or selenium is missing."""
    import pytest

    if browser_paths() is None:
        message = "headless Chromium + chromedriver + selenium are not installed"
        if os.environ.get("PAIRWATCH_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (PAIRWATCH_REQUIRE_BROWSER=1)")
        pytest.skip(message)
