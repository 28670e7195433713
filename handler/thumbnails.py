"""Small JPEG previews of input images, for the HTML report.

Built by ``handler.images.prepare`` so a preview gets the same guards as a comparison (pixel
budget checked from the header, JPEG draft decoding, EXIF orientation applied): a report over a
folder full of 48-megapixel photos or decompression bombs stays fast and bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from handler.images import prepare
from handler.storage import read_file

DEFAULT_EDGE = 128
DEFAULT_QUALITY = 65


@dataclass(frozen=True, slots=True)
class Thumbnail:
    jpeg: bytes
    width: int
    height: int


def thumbnail(
    path: Path,
    *,
    edge: int = DEFAULT_EDGE,
    quality: int = DEFAULT_QUALITY,
    max_bytes: int,
    max_pixels: int,
) -> Thumbnail:
    """A JPEG that fits ``edge`` x ``edge``; raises ``PairError`` subclasses like a comparison."""
    data = read_file(path, max_bytes)
    prepared = prepare(data, (edge, edge), quality, max_pixels=max_pixels)
    return Thumbnail(prepared.jpeg, *prepared.size)
