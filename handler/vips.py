"""libvips, set up once for the process: streamed decoding with bounded memory.

Pillow decodes a PNG, WebP or TIFF whole before it can shrink it (111 MB for a 37-megapixel
screenshot); libvips decodes in strips and shrinks as it goes. Its operation cache is turned off:
it would keep whole decoded images alive (measured: ~590 MB instead of ~50 MB on a long page).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import numpy as np

# libvips reads this once, at start-up: an input that needs random access (an EXIF-rotated one)
# is decoded to a temporary file rather than to memory once it is over this size.
os.environ.setdefault("VIPS_DISC_THRESHOLD", "32m")

import pyvips  # (after the environment it reads)
from PIL import Image

__all__ = [
    "LOADERS",
    "Expired",
    "kill_when",
    "open_header",
    "pyvips",
    "release_after",
    "release_freed_memory",
    "thumbnail_rgb",
]

#: "Is the pair's time up?" (``handler.deadline.Deadline.expired``).
Expired = Callable[[], bool]

pyvips.cache_set_max(0)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to release
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the memory libvips has freed back to the system (glibc's ``malloc_trim``).

    libvips allocates and frees its strip buffers on its own threads; glibc keeps what they
    free in those threads' heaps, so a streamed image's footprint keeps growing with its width
    (measured: a 100 MP JPEG streamed in strips peaked ~80 MB above the interpreter, ~40 MB
    when this runs every few MB of decoded pixels; ``handler.scan`` does so every 8 MB,
    which cost no measurable time there, where every 2 MB slowed a 48 MP pair by half).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


#: Bytes of pixels the process decodes between two trims after decodes that end.
TRIM_AFTER_BYTES = 32 << 20
_untrimmed = 0
_untrimmed_lock = threading.Lock()


def release_after(decoded: int) -> None:
    """``release_freed_memory`` once the process has decoded ``TRIM_AFTER_BYTES`` since this
    last trimmed: a decode that large trims at once, small ones (1 MP pairs, several at a
    time) share a trim. Each trim hands the pages back and the next allocations fault them in
    again: measured ~20 ms of system time per 1 MP pair when every pair trimmed."""
    global _untrimmed
    with _untrimmed_lock:
        _untrimmed += decoded
        if _untrimmed < TRIM_AFTER_BYTES:
            return
        _untrimmed = 0
    release_freed_memory()


#: libvips loaders reachable from untrusted input (the formats ``handler.images`` opens).
LOADERS = frozenset(
    {
        "jpegload_source",
        "pngload_source",
        "webpload_source",
        "gifload_source",
        "tiffload_source",
        "heifload_source",
    }
)


def open_header(data: bytes) -> pyvips.Image | None:
    """The lazily decoded image when libvips can stream it here, else None (no pixels read).

    None for formats outside ``LOADERS`` and for HEVC-coded HEIC (the bundled libheif decodes
    AVIF only).
    """
    try:
        # A source over the bytes, not ``new_from_buffer``: measured on a 100 MP JPEG streamed
        # in strips, the buffer loader's process peaked ~45 MB higher.
        image = pyvips.Image.new_from_source(
            pyvips.Source.new_from_memory(data), "", access="sequential", fail_on="error"
        )
    except pyvips.Error:
        return None
    if not image.get_typeof("vips-loader") or image.get("vips-loader") not in LOADERS:
        return None
    if image.get_typeof("heif-compression") and image.get("heif-compression") == "hevc":
        return None
    return image


def header_orientation(image: pyvips.Image) -> int:
    """The EXIF orientation libvips read from the header (1 when there is none)."""
    return int(image.get("orientation")) if image.get_typeof("orientation") else 1


def kill_when(image: pyvips.Image, expired: Expired | None) -> pyvips.Image:
    """``image``, whose evaluation (a ``write_to_memory``, an ``avg``...) stops with
    ``pyvips.Error`` ("killed") once ``expired()`` holds.

    libvips reports progress through the ``eval`` signal on its computing thread while it
    writes an image (measured: a blur over 144 MP stopped 0.5 s in); the callback kills the
    image there, as nothing in Python runs between its strips. (Fetching a region, as detection
    does strip by strip, emits no ``eval``: those loops check the deadline themselves.)
    """
    if expired is None:
        return image

    def on_eval(target: pyvips.Image, progress: object) -> None:
        del progress
        if expired():
            target.set_kill(True)

    image.set_progress(True)
    image.signal_connect("eval", on_eval)
    return image


def thumbnail_rgb(
    data: bytes, box: tuple[int, int], *, expired: Expired | None = None
) -> Image.Image:
    """Shrink (never enlarge) into ``box``, EXIF-oriented, 8-bit RGB with alpha on white.

    Raises ``pyvips.Error`` for undecodable data, and once ``expired()`` holds (killed).
    """
    image = pyvips.Image.thumbnail_buffer(data, box[0], height=box[1], size="down", fail_on="error")
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.format != "uchar":
        image = image.cast("uchar")
    if image.bands != 3:
        image = image[0:3]
    image = kill_when(image, expired)
    pixels = np.ndarray(
        buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, 3)
    )
    return Image.fromarray(pixels, "RGB")
