"""A seeded corpus of small, odd and broken image files: every size from 1 to 64 px, every mode
each format can store, lossless and lossy, truncated, with flipped bytes, and pairs of them.

Deterministic (one ``random.Random(seed)``), so a failure names a case that can be rerun.
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.support.png import png_chunk

#: The modes each format writes (Pillow converts nothing silently here).
MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "F", "CMYK"),
}


@dataclass(frozen=True)
class FuzzPair:
    """Two encoded inputs and how they were made (for a failure message)."""

    name: str
    a: bytes
    b: bytes


def encoded(fmt: str, mode: str, size: tuple[int, int], seed: int, **params: object) -> bytes:
    """Noise, or a flat image with a few dots (seed-dependent), in ``mode``, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    width, height = size
    if seed % 3:
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    else:
        pixels = np.full((height, width, 4), 255, np.uint8)
        for _ in range(1 + seed % 4):
            pixels[rng.integers(height), rng.integers(width)] = rng.integers(0, 256, 4)
    image = Image.fromarray(pixels, "RGBA")
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def corrupt_idat_png(size: tuple[int, int] = (32, 32)) -> bytes:
    """A PNG whose chunks are all well formed (valid CRCs) but whose compressed pixel stream is
    not: Pillow reads its header fine and fails only when it decodes."""
    raw = b"".join(b"\0" + bytes(range(3 * size[0])) for _ in range(size[1]))
    stream = bytearray(zlib.compress(raw))
    for index in range(2, min(len(stream), 40)):
        stream[index] ^= 0x5A
    ihdr = size[0].to_bytes(4, "big") + size[1].to_bytes(4, "big") + bytes((8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", bytes(stream))
        + png_chunk(b"IEND", b"")
    )


def _damaged(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.25:
        cut = rng.randrange(len(data))
        return f"truncated at {cut}", data[:cut]
    if roll < 0.4:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return "bytes flipped", bytes(flipped)
    return "intact", data


def _one(rng: random.Random, seed: int, size: tuple[int, int]) -> tuple[str, bytes]:
    fmt = rng.choice(sorted(MODES))
    mode = rng.choice(MODES[fmt])
    params: dict[str, object] = {}
    if fmt == "WEBP":
        params["lossless"] = rng.random() < 0.5
    return f"{fmt}/{mode} {size[0]}x{size[1]}", encoded(fmt, mode, size, seed, **params)


def fuzz_pairs(seed: int, count: int) -> Iterator[FuzzPair]:
    """``count`` pairs: random formats, modes and sizes (1..64 px, half of them the same size
    in A and B), B damaged in about 40 % of them."""
    rng = random.Random(seed)
    for index in range(count):
        size_a = (rng.randint(1, 64), rng.randint(1, 64))
        size_b = size_a if rng.random() < 0.5 else (rng.randint(1, 64), rng.randint(1, 64))
        what_a, a = _one(rng, seed * 100_000 + index, size_a)
        what_b, b = _one(rng, seed * 100_000 + index + 50_000, size_b)
        damage, b = _damaged(b, rng)
        yield FuzzPair(f"#{index}: A {what_a}, B {what_b} ({damage})", a, b)


def tiny_differing_pairs() -> Iterator[FuzzPair]:
    """Lossless pairs of at most 16 x 16 px that differ in one pixel (the 1 x 1 cell map)."""
    for width, height in ((1, 1), (1, 5), (7, 1), (3, 3), (16, 16), (16, 1)):
        a = Image.new("RGB", (width, height), "white")
        b = a.copy()
        b.putpixel((width // 2, height // 2), (0, 0, 0))
        yield FuzzPair(f"{width}x{height}", _png(a), _png(b))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
