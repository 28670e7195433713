"""Screenshots rendered with Pillow's own font: long text pages, UI labels, timestamps.

Real rendered text (FreeType, anti-aliased), so the detection tests and the benchmark see the
same kind of pixels a browser screenshot holds.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse"
)
WORDS = tuple(_TEXT.split())


@dataclass(frozen=True)
class Page:
    """A rendered page and where each word's ink sits: (x, y, width, height) per word."""

    image: Image.Image
    words: list[tuple[str, tuple[int, int, int, int]]]


def font(size: int = 18) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_page(
    size: tuple[int, int],
    *,
    seed: int = 1,
    font_size: int = 18,
    replace: dict[int, str] | None = None,
) -> Page:
    """A page of text lines; ``replace`` swaps the word at an index for another one."""
    rng = random.Random(seed)
    face = font(font_size)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    words: list[tuple[str, tuple[int, int, int, int]]] = []
    line = font_size + font_size // 2
    for y in range(24, size[1] - line, line):
        x = 32
        while True:
            word = rng.choice(WORDS)
            index = len(words)
            shown = (replace or {}).get(index, word)
            width = int(face.getlength(word))
            if x + max(width, int(face.getlength(shown))) > size[0] - 32:
                break
            draw.text((x, y), shown, fill=(20, 20, 20), font=face)
            left, top, right, bottom = draw.textbbox((x, y), shown, font=face)
            words.append((shown, (int(left), int(top), int(right - left), int(bottom - top))))
            x += width + int(face.getlength(" ")) + 2
    return Page(image, words)


def png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def label_card(
    text: str,
    offset: tuple[int, int] = (0, 0),
    *,
    size: tuple[int, int] = (480, 320),
    antialias: bool = True,
) -> Image.Image:
    """A small UI card: a title bar, a button, and a label at (40, 120) + ``offset``."""
    image = Image.new("RGB", size, (245, 246, 250))
    draw = ImageDraw.Draw(image)
    if not antialias:
        draw.fontmode = "1"
    draw.rectangle((0, 0, size[0], 48), fill=(40, 80, 160))
    draw.text((16, 12), "Settings", fill="white", font=font(22))
    draw.rounded_rectangle((300, 240, 440, 290), radius=8, fill=(30, 140, 70))
    draw.text((330, 252), "Save", fill="white", font=font(20))
    draw.text((40 + offset[0], 120 + offset[1]), text, fill=(30, 30, 30), font=font(16))
    return image


def replace_words(page: Page, replacements: dict[int, str], font_size: int = 18) -> Page:
    """``page`` with some words painted over and others written in their place: much faster
    than rendering a long page again."""
    face = font(font_size)
    image = page.image.copy()
    draw = ImageDraw.Draw(image)
    words = list(page.words)
    for index, new in replacements.items():
        old, (x, y, width, height) = words[index]
        draw.rectangle((x - 1, y - 1, x + width + 1, y + height + 1), fill="white")
        origin = _origin(draw, old, (x, y), face)
        draw.text(origin, new, fill=(20, 20, 20), font=face)
        left, top, right, bottom = draw.textbbox(origin, new, font=face)
        words[index] = (new, (int(left), int(top), int(right - left), int(bottom - top)))
    return Page(image, words)


def _origin(
    draw: ImageDraw.ImageDraw,
    word: str,
    ink: tuple[int, int],
    face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> tuple[int, int]:
    """The text origin that put ``word``'s ink at ``ink``."""
    left, top, _, _ = draw.textbbox((0, 0), word, font=face)
    return (ink[0] - int(left), ink[1] - int(top))


def smoothed_label(text: str, resample: Image.Resampling) -> Image.Image:
    """``text`` drawn at 4x without anti-aliasing on a 480 x 320 card's background, smoothed
    down by ``resample``: the same label with other smoothing for each filter."""
    big = Image.new("RGB", (1920, 1280), (245, 246, 250))
    draw = ImageDraw.Draw(big)
    draw.fontmode = "1"
    draw.text((160, 480), text, fill=(30, 30, 30), font=font(64))
    return big.resize((480, 320), resample)
