"""A bounded in-memory LRU of prepared images that cost a decode of their own, so such an input
compared with many others is decoded once per process for its prepared image.

Most prepared images cost none: detection decodes every input anyway and resizes it to its
prepared size on the way (``handler.pipeline``); those are not kept. What is kept are the
inputs detection makes no copy of: the larger image of a rescaled pair (compared at the smaller
one's size), CMYK images (prepared by Pillow), pages more than 32 times taller than their
prepared height.

Keyed by the input's sha256 and every setting that shapes the prepared image; sized by what
an entry holds (its JPEG plus its RGB pixels), evicting the least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cache

from handler.images import PreparedImage

CacheKey = tuple[str, tuple[int, int], int, int]


def cache_key(sha256: str, max_size: tuple[int, int], quality: int, max_pixels: int) -> CacheKey:
    return (sha256, tuple(max_size), quality, max_pixels)  # type: ignore[return-value]


class PreparedCache:
    """Thread-safe: the runner prepares pairs from several threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, PreparedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> PreparedImage | None:
        with self._lock:
            image = self._entries.get(key)
            if image is not None:
                self._entries.move_to_end(key)
            return image

    def put(self, key: CacheKey, image: PreparedImage) -> None:
        cost = _cost(image)
        if cost > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = image
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _cost(evicted)

    @property
    def size_bytes(self) -> int:
        return self._bytes


def _cost(image: PreparedImage) -> int:
    """Its JPEG plus its pixels, as Pillow holds them: 4 bytes a pixel (RGB is stored as RGBX)."""
    width, height = image.size
    return len(image.jpeg) + 4 * width * height


@cache
def process_cache(cache_mb: int) -> PreparedCache | None:
    """The process's cache for ``cache_mb`` (None when 0: caching off)."""
    return PreparedCache(cache_mb * 1024 * 1024) if cache_mb > 0 else None
