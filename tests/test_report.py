"""``pairwatch report``: the HTML page over a folder of real results, as HTML and in Chromium.

The results come from the real pipeline (``compare_pair`` with the metrics comparator); the
result and diff image are written beside the pair the way the watchers write them. The browser
tests drive Debian's headless Chromium with Selenium; they skip when it is missing, except in CI
(``PAIRWATCH_REQUIRE_BROWSER=1``), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image, ImageDraw

from handler.compare.metrics import MetricsComparator
from handler.config import ComparisonConfig
from handler.pairs import DIFF_NAME, RESULT_NAME, manifest_diff_name, manifest_result_name
from handler.pipeline import ImageInput, compare_pair
from handler.storage import LocalStorage
from handler.thumbnails import DEFAULT_EDGE
from tests.support import scenes, screens
from tests.support.browser import require_browser, start_chromium
from watcher import report
from watcher.cli import main

HOSTILE = "<img src=x onerror=window.pwned=1>"
HOSTILE_FILE = "<img src=x onerror=window.pwned=2>.png"
#: Stands in for a VL model's free text (model output is outside our control).
HOSTILE_SUMMARY = "</p><script>window.pwned=3</script><img src=x onerror=window.pwned=4>"
HOSTILE_ATTRIBUTE = "\"'><svg onload=window.pwned=5>"
REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 50_000_000


def _compare(root: Path, pair_id: str, a: str, b: str, result_name: str, diff_name: str) -> None:
    """Compare ``a`` with ``b`` (paths under root) and write result + diff as the watchers do."""
    storage = LocalStorage(root)
    folder = posixpath.dirname(result_name)
    outcome = compare_pair(
        pair_id,
        ImageInput(posixpath.relpath(a, folder or "."), lambda: storage.read(a, 1 << 26)),
        ImageInput(posixpath.relpath(b, folder or "."), lambda: storage.read(b, 1 << 26)),
        ComparisonConfig(max_image_size=(384, 384)),
        MetricsComparator(),
        max_input_pixels=MAX_PIXELS,
        diff_image=True,
    )
    result = outcome.result
    if outcome.diff_png is not None:
        storage.write_atomic(posixpath.join(folder, diff_name), outcome.diff_png)
        result.diff_image = diff_name
    storage.write_atomic(result_name, result.to_json().encode())


def _pair_folder(root: Path, folder: str, files: dict[str, bytes]) -> None:
    (root / folder).mkdir(parents=True)
    for name, data in files.items():
        (root / folder / name).write_bytes(data)
    a, b = sorted(files)
    _compare(root, folder, f"{folder}/{a}", f"{folder}/{b}", f"{folder}/{RESULT_NAME}", DIFF_NAME)


@dataclass(frozen=True)
class Results:
    root: Path
    #: pair name (pair_id, or the result path for an unreadable one) -> expected kind
    kinds: dict[str, str]


def build_results(root: Path) -> Results:
    """A folder holding every kind of row the report shows."""
    rocket, coffee = scenes.photo("rocket"), scenes.photo("coffee")
    _pair_folder(root, "same", {"a.jpg": scenes.encode(rocket), "b.jpg": scenes.reencoded(rocket)})
    _pair_folder(
        root, "changed", {"a.jpg": scenes.encode(coffee), "b.jpg": scenes.pasted_object(coffee)}
    )
    _pair_folder(
        root,
        f"nested/{HOSTILE}",
        {HOSTILE_FILE: scenes.encode(coffee), "z.png": scenes.mirrored(coffee)},
    )
    _pair_folder(root, "broken", {"a.jpg": scenes.encode(rocket), "b.jpg": b"GIF89a truncated"})
    # Manifest pair: NAME.pair.json -> NAME.result.json + NAME.diff.png beside it.
    (root / "imgs").mkdir()
    (root / "imgs" / "day.jpg").write_bytes(scenes.encode(rocket))
    (root / "imgs" / "night.jpg").write_bytes(scenes.recoloured(rocket))
    manifest = "night.pair.json"
    (root / manifest).write_text(json.dumps({"a": "imgs/day.jpg", "b": "imgs/night.jpg"}))
    _compare(
        root,
        "night",
        "imgs/day.jpg",
        "imgs/night.jpg",
        manifest_result_name(manifest),
        manifest_diff_name(manifest),
    )
    # Untrusted model text: a real result whose summary/differences carry markup, and whose
    # input name tries to leave the folder (the file it names exists, outside the root).
    hostile = json.loads((root / "changed" / RESULT_NAME).read_text())
    hostile["pair_id"] = f"vl {HOSTILE_ATTRIBUTE}"
    hostile["summary"] = HOSTILE_SUMMARY
    hostile["differences"] = [
        {"aspect": HOSTILE_ATTRIBUTE, "element": "<b>x</b>", "description": HOSTILE_SUMMARY}
    ]
    hostile["inputs"][0]["name"] = "../outside.jpg"
    hostile["vl"] = {"raw_text": HOSTILE_SUMMARY, "attempts": 2}
    hostile["diff_image"] = "../../outside.jpg"
    (root.parent / "outside.jpg").write_bytes(scenes.encode(rocket))
    (root / "vl").mkdir()
    (root / "vl" / "b.jpg").write_bytes(scenes.encode(coffee))
    (root / "vl" / RESULT_NAME).write_text(json.dumps(hostile))
    # A result.json symlinked from outside the root is not followed.
    (root.parent / "outside.result.json").write_text(json.dumps(hostile))
    (root / "linked").mkdir()
    (root / "linked" / RESULT_NAME).symlink_to(root.parent / "outside.result.json")
    # Not a result at all, and a temporary file the report must ignore.
    (root / "corrupt").mkdir()
    (root / "corrupt" / RESULT_NAME).write_text(f"{{not json {HOSTILE}")
    (root / "corrupt" / ".result.json.x1.tmp").write_text("{}")
    return Results(
        root,
        {
            "same": "similar",
            "changed": "different",
            f"nested/{HOSTILE}": "different",
            "broken": "error",
            "night": "different",
            f"vl {HOSTILE_ATTRIBUTE}": "different",
            "corrupt/result.json": "unreadable",
            "linked/result.json": "unreadable",
        },
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return build_results(tmp_path_factory.mktemp("report") / "results")


@pytest.fixture(scope="module")
def page(results: Results) -> Path:
    output = results.root / "report.html"
    report.build_report(results.root, output, max_input_bytes=1 << 26, max_input_pixels=MAX_PIXELS)
    return output


class _Page(HTMLParser):
    """Collects the elements the checks need: cards, images, links, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "article":
            self.cards.append(attributes)
        if tag == "script":
            self.scripts += 1


def _parse(path: Path) -> _Page:
    parsed = _Page()
    parsed.feed(path.read_text(encoding="utf-8"))
    return parsed


def test_every_result_is_a_row_of_the_right_kind(results: Results, page: Path) -> None:
    cards = _parse(page).cards
    assert {c["data-name"]: c["data-kind"] for c in cards} == results.kinds
    # Default order: failures first, then least similar first.
    similarities = [float(c["data-similarity"] or 0) for c in cards]
    assert similarities == sorted(similarities)
    assert cards[0]["data-kind"] in ("error", "unreadable")
    linked = next(c for c in cards if c["data-name"] == "linked/result.json")
    assert linked["data-kind"] == "unreadable"


def test_untrusted_text_is_escaped(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.scripts == 1  # ours, nothing injected
    for tag, attributes in parsed.tags:
        assert tag != "svg"
        assert not any(name.startswith("on") for name in attributes), (tag, attributes)
        assert attributes.get("src") != "x"
    for payload in (HOSTILE, HOSTILE_SUMMARY, HOSTILE_ATTRIBUTE):
        assert payload not in html
    assert "&lt;img src=x onerror=window.pwned=2&gt;.png" in html
    assert "&lt;script&gt;window.pwned=3&lt;/script&gt;" in html


def test_links_stay_inside_the_folder_and_resolve(results: Results, page: Path) -> None:
    parsed = _parse(page)
    targets = [
        value
        for _, attributes in parsed.tags
        for name, value in attributes.items()
        if name in ("src", "href") and value
    ]
    assert targets
    root = results.root.resolve()
    for target in targets:
        if target.startswith("data:image/jpeg;base64,"):
            continue
        assert ":" not in target and not target.startswith(("/", "//")), target
        path = (page.parent / unquote(target)).resolve()
        assert path.is_file() and path.is_relative_to(root), target
    linked = {unquote(t) for t in targets}
    assert f"nested/{HOSTILE}/{HOSTILE_FILE}" in linked
    assert "night.diff.png" in linked and "imgs/night.jpg" in linked
    assert not any("outside" in t for t in linked)


def test_previews_are_small_embedded_jpegs(page: Path) -> None:
    uris = [
        attributes["src"]
        for tag, attributes in _parse(page).tags
        if tag == "img" and (attributes.get("src") or "").startswith("data:")
    ]
    # Two previews per readable pair whose inputs exist and decode.
    # broken: only A decodes; vl: only B is inside the root.
    assert len(uris) == 2 * 4 + 1 + 1
    for uri in uris:
        assert uri is not None
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            assert img.format == "JPEG"
            assert max(img.size) <= DEFAULT_EDGE


def test_no_network_resources_and_a_strict_policy(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    parsed = _parse(page)
    policy = next(a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv"))
    assert policy is not None
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    for _, attributes in parsed.tags:
        for name in ("src", "href"):
            assert not (attributes.get(name) or "").startswith(("http:", "https:", "//"))
    assert "url(" not in html and "@import" not in html


def test_report_written_elsewhere_links_back(results: Results, tmp_path: Path) -> None:
    output = tmp_path / "out" / "r.html"
    output.parent.mkdir()
    report.build_report(
        results.root, output, thumb_size=0, max_input_bytes=1 << 26, max_input_pixels=MAX_PIXELS
    )
    parsed = _parse(output)
    images = [a for t, a in parsed.tags if t == "img"]
    assert images and not any((a.get("src") or "").startswith("data:") for a in images)
    for image in images:
        assert (output.parent / unquote(image["src"] or "")).resolve().is_file()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_cli(results: Results, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli.html"
    before = _snapshot(results.root)
    assert main(["report", str(results.root), "-o", str(output), "--log-level", "ERROR"]) == 0
    assert _snapshot(results.root) == before  # inputs and results untouched
    out = capsys.readouterr().out
    assert "8 pairs" in out and "1 similar" in out and "2 unreadable" in out
    assert len(_parse(output).cards) == 8
    assert main(["report", str(tmp_path / "missing"), "--log-level", "ERROR"]) == 2


def test_unwritable_output_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing" / "report.html"
    assert main(["report", str(tmp_path), "-o", str(missing), "--log-level", "ERROR"]) == 1
    assert f"cannot write {missing}: No such file or directory" in capsys.readouterr().err
    folder = tmp_path / "taken"
    folder.mkdir()
    assert main(["report", str(tmp_path), "-o", str(folder), "--log-level", "ERROR"]) == 1
    assert f"cannot write {folder}: Is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary file left


def test_finds_results_as_the_watchers_name_them(tmp_path: Path) -> None:
    """Result names match case-blind; hidden and temporary folders and files are skipped."""
    for relative in (
        "p/result.json",
        "Q/RESULT.JSON",
        "night.Result.Json",
        ".hidden/result.json",
        "upload.part/result.json",
        "p/.result.json.abc.tmp",
        "p/notresult.json",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("{}")
    found = sorted(p.relative_to(tmp_path).as_posix() for p in report.find_results(tmp_path))
    assert found == ["Q/RESULT.JSON", "night.Result.Json", "p/result.json"]


def test_empty_folder(tmp_path: Path) -> None:
    output = tmp_path / "report.html"
    written = report.build_report(tmp_path, output, max_input_bytes=1, max_input_pixels=1)
    assert written.pairs == 0
    assert "No results" in output.read_text(encoding="utf-8")


# --- in a real browser -------------------------------------------------------------------------

ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_browser()
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), console_log=True)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser: Any, page: Path) -> None:
    browser.set_window_size(1280, 900)
    browser.get(page.resolve().as_uri())
    browser.find_element("id", "controls")  # raises if the page did not load


def _visible(browser: Any) -> list[tuple[str, str, float]]:
    script = (
        "return Array.from(document.querySelectorAll('article.pair'))"
        ".filter(c => !c.hidden && c.offsetParent !== null)"
        ".map(c => [c.dataset.name, c.dataset.kind, parseFloat(c.dataset.similarity)]);"
    )
    return [tuple(row) for row in browser.execute_script(script)]


def _no_script_ran(browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    assert browser.execute_script("return typeof window.pwned") == "undefined"
    assert (
        browser.execute_script("return document.querySelectorAll('img[src=\"x\"], svg').length")
        == 0
    )


def _set(browser: Any, element_id: str, value: str) -> None:
    """Change a control the way a user does (typing/choosing), which fires the input events."""
    from selenium.webdriver.support.ui import Select

    element = browser.find_element("id", element_id)
    if element.tag_name == "select":
        Select(element).select_by_value(value)
    else:
        element.clear()
        element.send_keys(value)


def test_browser_rows_filter_sort_and_no_injected_script(
    browser: Any, results: Results, page: Path
) -> None:
    _open(browser, page)
    _no_script_ran(browser)
    rows = _visible(browser)
    assert {name: kind for name, kind, _ in rows} == results.kinds
    assert browser.find_element("id", "count").text == "8 of 8 shown"
    # The hostile names are shown as text.
    body = browser.find_element("tag name", "body").text
    assert HOSTILE_FILE in body and "<script>window.pwned=3</script>" in body

    _set(browser, "show", "failed")
    assert {kind for _, kind, _ in _visible(browser)} == {"error", "unreadable"}
    _set(browser, "show", "different")
    assert {kind for _, kind, _ in _visible(browser)} == {"different"}
    _set(browser, "show", "all")
    _set(browser, "min", "0.9")
    assert [name for name, _, _ in _visible(browser)] == ["same"]
    _set(browser, "min", "0")
    _set(browser, "find", "NESTED")
    assert [name for name, _, _ in _visible(browser)] == [f"nested/{HOSTILE}"]
    _set(browser, "find", "")

    _set(browser, "sort", "similar-first")
    similarities = [s for _, _, s in _visible(browser)]
    assert similarities == sorted(similarities, reverse=True)
    _set(browser, "sort", "name")
    names = [name for name, _, _ in _visible(browser)]
    assert names == sorted(names)
    _no_script_ran(browser)

    # Every image loads from file:// under the page's CSP: previews and the lazy diff images.
    browser.set_script_timeout(20)
    broken = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const imgs = Array.from(document.querySelectorAll('img'));
        imgs.forEach(i => { i.loading = 'eager'; });
        Promise.all(imgs.map(i => i.decode().catch(() => null))).then(() => done(
            imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)));
        """
    )
    assert broken == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report-desktop.png"))


def test_browser_phone_layout_has_no_sideways_scrolling(browser: Any, page: Path) -> None:
    _open(browser, page)
    browser.set_window_size(390, 844)
    width = browser.execute_script("return document.documentElement.clientWidth")
    scroll = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll <= width, (scroll, width)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report-phone.png"))


def test_browser_missing_is_a_failure_in_ci(tmp_path: Path) -> None:
    """With PAIRWATCH_REQUIRE_BROWSER=1 and no Chromium on PATH the browser tests must fail."""
    env = {**os.environ, "PAIRWATCH_REQUIRE_BROWSER": "1", "PATH": str(tmp_path)}
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"{__file__}::test_browser_phone_layout_has_no_sideways_scrolling",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PAIRWATCH_REQUIRE_BROWSER=1" in run.stdout


def _bannered(card: Image.Image, height: int = 60) -> Image.Image:
    """The card with a coloured band inserted at the top (everything below moves down)."""
    out = Image.new("RGB", (card.width, card.height + height), (253, 241, 199))
    ImageDraw.Draw(out).text((16, 20), "We use cookies", fill=(20, 20, 20), font=screens.font(16))
    out.paste(card, (0, height))
    return out


def test_rows_show_region_kinds_and_the_alignment(tmp_path: Path) -> None:
    card = screens.label_card("Delivery address: 221B Baker Street")
    edited = _bannered(screens.label_card("Delivery address: 10 Downing Street"))
    _pair_folder(tmp_path, "banner", {"a.png": _png(card), "b.png": _png(edited)})
    built = report.build_report(
        tmp_path,
        tmp_path / "report.html",
        thumb_size=0,
        max_input_bytes=1 << 26,
        max_input_pixels=MAX_PIXELS,
    )
    html = built.path.read_text(encoding="utf-8")
    assert '<span class="kind changed">1 changed</span>' in html
    assert '<span class="kind added">1 added</span>' in html
    assert '<span class="kind aligned">moved 0,60</span>' in html
    assert "inserted rows 0–60 of B" in html


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
