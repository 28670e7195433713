"""Web pages rendered by headless Chromium as full-page PNG screenshots, with the boxes of the
elements that changed between two versions (ground truth from ``getBoundingClientRect``).

The edits are the everyday ones: a cookie banner inserted at the top, a paragraph removed, a
paragraph that grows by one line, a wider left margin, and a word changed below an insertion.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.browser import start_chromium

WIDTH = 800
#: Box (x, y, width, height) in CSS pixels = screenshot pixels (device scale factor 1).
Box = tuple[int, int, int, int]

_STYLE = """
body { margin: 0; background: #fff; font: 16px/24px "DejaVu Sans", sans-serif; color: #222; }
header { background: #24476b; color: #fff; padding: 14px 40px; font-size: 20px; }
main { width: 640px; margin-left: MARGINpx; padding: 8px 0 24px; }
h1 { font-size: 26px; line-height: 32px; margin: 16px 0; }
p { margin: 0 0 16px; }
#banner { background: #fdf1c7; border-bottom: 2px solid #d9b24c; height: 72px;
          padding: 0 40px; display: flex; align-items: center; }
#banner button { margin-left: auto; }
footer { border-top: 1px solid #ccc; padding: 12px 40px; color: #666; font-size: 13px; }
"""

_PARAGRAPHS = (
    "Our spring collection arrives in stores this week, with new colours for the classic "
    "canvas bag and a lighter frame for the folding chair.",
    "Delivery is free for orders over forty euros. Orders placed before noon leave our "
    "warehouse the same day and arrive within two working days.",
    "Returns are accepted for thirty days after delivery, in the original packaging, with the "
    "receipt or the order number from your confirmation email.",
    "Gift cards can be used online and in every store; they never expire and can be topped up "
    "at the checkout at any time.",
    "Questions about an order? Our support team answers by phone and chat from eight in the "
    "morning until eight in the evening, every day of the week.",
    "Sign up for the newsletter to hear about new arrivals first, and to receive a voucher for "
    "your next purchase.",
)


@dataclass
class Version:
    """How one version of the page differs from the base page."""

    banner: bool = False
    margin: int = 40
    removed: int | None = None
    #: paragraph index -> words appended (the paragraph grows by a line)
    extended: dict[int, str] = field(default_factory=dict)
    #: (paragraph index, old word, new word)
    word: tuple[int, str, str] | None = None


@dataclass(frozen=True)
class Rendered:
    png: bytes
    size: tuple[int, int]
    #: element id -> its box in the screenshot
    boxes: dict[str, Box]


VERSIONS: dict[str, Version] = {
    "base": Version(),
    "banner": Version(banner=True),
    "removed": Version(removed=2),
    "wrapped": Version(extended={1: "Express delivery is available too."}),
    "margin": Version(margin=43),
    "banner_word": Version(banner=True, word=(4, "phone", "email")),
}


def html(version: Version) -> str:
    paragraphs = []
    for index, text in enumerate(_PARAGRAPHS):
        if index == version.removed:
            continue
        if index in version.extended:
            text = f"{text} {version.extended[index]}"
        if version.word and version.word[0] == index:
            _, old, new = version.word
            text = text.replace(old, f'<span id="word">{new}</span>', 1)
        paragraphs.append(f'<p id="p{index}">{text}</p>')
    banner = (
        '<div id="banner">We use cookies to remember your basket. <button>Accept</button></div>'
        if version.banner
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><style>"
        + _STYLE.replace("MARGIN", str(version.margin))
        + "</style></head><body>"
        + banner
        + "<header>Canvas &amp; Co.</header><main><h1 id='title'>New this week</h1>"
        + "".join(paragraphs)
        + "</main><footer>Canvas &amp; Co. · 12 Harbour Street</footer></body></html>"
    )


_BOXES = """
const out = {};
for (const el of document.querySelectorAll('[id]')) {
  const r = el.getBoundingClientRect();
  out[el.id] = [Math.round(r.left + scrollX), Math.round(r.top + scrollY),
                Math.round(r.width), Math.round(r.height)];
}
return out;
"""


def render(driver: Any, version: Version, folder: Path) -> Rendered:
    """One version, as a full-page screenshot at device scale 1."""
    page = folder / f"page-{id(version)}.html"
    page.write_text(html(version), encoding="utf-8")
    driver.get(page.as_uri())
    width = int(driver.execute_script("return document.documentElement.scrollWidth"))
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    boxes = {key: tuple(value) for key, value in driver.execute_script(_BOXES).items()}
    return Rendered(base64.b64decode(shot["data"]), (width, height), boxes)


def render_all(names: tuple[str, ...] = tuple(VERSIONS)) -> dict[str, Rendered]:
    """Every named version from one browser session (a second or two in all)."""
    with tempfile.TemporaryDirectory(prefix="pages-") as tmp:
        folder = Path(tmp)
        driver = start_chromium(folder / "profile")
        try:
            driver.set_window_size(WIDTH, 300)
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": 300, "deviceScaleFactor": 1, "mobile": False},
            )
            return {name: render(driver, VERSIONS[name], folder) for name in names}
        finally:
            driver.quit()
