"""Streamed decoding of one input, for change detection (``handler.detect``) and its crops
(``handler.crops``): the header, with the pixel budget checked before anything is decoded;
the image normalised (8-bit sRGB, EXIF-oriented, RGB on white + opacity) and read top to
bottom in strips (``Stream``); and, on the way, what else the pair needs from those pixels,
so that each input is decoded once: a small input's native pixels kept as they pass (up to
``KEEP_PIXELS``) and the resized copy its prepared image is made from.

libvips decodes, sequentially; the Pillow fallback only for the formats libvips cannot read
here (BMP, HEIC), whole, its budget checked first.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from handler import splice
from handler.errors import ImageTooLarge, InvalidImage
from handler.images import SUPPORTED_FORMATS, check_pixels
from handler.vips import header_orientation, open_header, pyvips

__all__ = ["KEEP_PIXELS", "image_size"]

#: Source rows shrunk at once: each fetch from libvips costs more than the rows it shrinks.
_SHRINK_ROWS = 128
#: Source rows per shrunk row beyond which the copy is not made on the way: the resize kernel
#: reaches ~3 of them up and down, and libvips keeps only a few hundred recent rows.
_MAX_SHRINK = 32
#: Inputs up to this many pixels keep their native pixels as they pass (4 bytes a pixel):
#: their resized copy is made from them, pass 2 reads them instead of decoding again, and
#: ``cut_crops`` cuts from them where asked (``keep_pixels``).
KEEP_PIXELS = 4_000_000


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Display-oriented (EXIF applied) size from the header; the pixel budget is checked."""
    image = _open(data, max_pixels)
    return _display_size(image)


class Stream:
    """One input streaming past in strips, resized on the way when a copy was asked for: a
    small input (up to ``KEEP_PIXELS``) from its pixels kept as they pass (a third of the time
    of resizing in the stream), a larger one in the stream itself (bounded memory). Made from
    kept pixels (pass 2 of a small input), it reads them instead of decoding again."""

    def __init__(
        self,
        which: str,
        image: pyvips.Image | NDArray[np.uint8],
        colour: pyvips.Image | None = None,
        wanted: tuple[int, int] | None = None,
        *,
        keep: bool = False,
    ) -> None:
        """``image``: RGB on white + opacity, what is compared (or its pixels, kept before);
        ``colour``: its RGB bands; ``wanted``: the size of the copy to make; ``keep``: hold
        the native pixels for the caller (``kept``), small inputs only."""
        self.which = which
        self._wanted = wanted
        self._small: pyvips.Region | None = None
        self._strips: list[NDArray[np.uint8]] = []
        self._kept_rows = 0
        self._kept: NDArray[np.uint8] | None = None
        self._region: pyvips.Region | None = None
        if not isinstance(image, pyvips.Image):
            self.height, self.width = image.shape[:2]
            self._kept, self._kept_rows = image, self.height
            self._keeping = False
            return
        self.width, self.height = image.width, image.height
        small_input = self.width * self.height <= KEEP_PIXELS
        # The strips as fetched, each from the first row not kept before (no copies).
        self._keeping = small_input and (keep or wanted is not None)
        # Held: a region does not keep alive the memory of an image made from an array.
        self._image = image
        self._region = pyvips.Region.new(image)
        if (
            wanted is not None
            and colour is not None
            and not small_input
            and self.height / wanted[1] <= _MAX_SHRINK
        ):
            small = _resized(colour, wanted)
            self._small = pyvips.Region.new(small)
            self._small_size = (small.width, small.height)
            self._small_rows: list[NDArray[np.uint8]] = []
            self._small_done = 0
            # Source rows per resized row, and how far past its own rows the kernel reaches.
            self._step = self.height / small.height
            self._reach = 4 * math.ceil(self._step) + 2

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def keeping(self) -> bool:
        """Are its strips kept as they pass (a small input whose pixels are wanted)?"""
        return self._keeping

    def kept(self) -> NDArray[np.uint8] | None:
        """Every row of the native pixels, where they were kept as they passed."""
        if self._kept is None and self._strips and self._kept_rows == self.height:
            self._kept = np.concatenate(self._strips)
            self._strips = []
        return self._kept

    def strip(self, first: int, last: int) -> NDArray[np.uint8]:
        """Rows ``first:last`` (RGB on white + opacity); a decoding failure names the input.
        Rows are asked for top to bottom (a row or two of overlap is fine)."""
        if self._region is None:
            assert self._kept is not None
            return self._kept[first:last]
        try:
            pixels = fetch_rows(self._region, first, last, self.width)
            self._shrink_above(last, final=False)
        except pyvips.Error as exc:
            raise InvalidImage(
                f"cannot decode the image: {first_line(exc)}", details={"input": self.which}
            ) from exc
        if self._keeping and last > self._kept_rows:
            if first > self._kept_rows:  # rows skipped: nothing whole to keep after all
                self._keeping, self._strips = False, []
            else:
                self._strips.append(pixels[self._kept_rows - first :])
                self._kept_rows = last
        return pixels

    def shrunk(
        self, *, alike: tuple[NDArray[np.uint8] | None, Image.Image | None] = (None, None)
    ) -> Image.Image | None:
        """The resized copy, once every strip was read (None where none was made).

        ``alike``: the other input's kept pixels and its copy (made the same way, to the same
        size): where the two inputs differ in a few rows only, this copy is that one with
        the rows those reach resized from this input (``handler.splice``), not all of it."""
        kept = self.kept() if self._keeping else None
        if self._wanted is not None and kept is not None:
            native = pyvips.Image.new_from_memory(kept.data, self.width, self.height, 4, "uchar")
            # All four bands (taking three apart would cost a copy); Pillow drops opacity.
            small = _resized(native, self._wanted)
            spliced = _spliced(small, kept, *alike)
            return spliced if spliced is not None else _rgb(small, 0, small.height)
        if self._small is None:
            return None
        self._shrink_above(self.height, final=True)
        return Image.fromarray(np.concatenate(self._small_rows), "RGB")

    def _shrink_above(self, decoded: int, *, final: bool) -> None:
        """Resize the rows whose sources lie above ``decoded`` (still in libvips' cache of
        recent rows), in batches: each fetch costs more than the few rows it makes."""
        if self._small is None:
            return
        width, height = self._small_size
        ready = height if final else min(height, int((decoded - self._reach) / self._step))
        if ready - self._small_done >= max(1, int(_SHRINK_ROWS / self._step)) or (
            final and ready > self._small_done
        ):
            self._small_rows.append(
                fetch_rows(self._small, self._small_done, ready, width, bands=3)
            )
            self._small_done = ready


def _rgb(image: pyvips.Image, first: int, last: int) -> Image.Image:
    """Rows ``first:last`` of a 4-band image as RGB (libvips computes only those)."""
    part = image.crop(0, first, image.width, last - first) if last - first < image.height else image
    return Image.frombytes(
        "RGB", (image.width, last - first), part.write_to_memory(), "raw", "RGBX"
    )


def _spliced(
    small: pyvips.Image,
    kept: NDArray[np.uint8],
    other_kept: NDArray[np.uint8] | None,
    other_copy: Image.Image | None,
) -> Image.Image | None:
    """``small`` (``kept`` resized) as ``other_copy`` (``other_kept`` resized the same way)
    with only the rows that ``kept`` changes computed; None where the two differ in too many
    rows to be worth it (or cannot be compared)."""
    size = (small.width, small.height)
    if other_kept is None or other_copy is None or other_copy.size != size:
        return None
    if other_kept.shape != kept.shape:
        return None
    changed = splice.differing_rows(kept, other_kept)
    if changed is None:
        return other_copy.copy()
    span = splice.output_rows(changed, len(kept), small.height)
    if span is None:
        return None
    out = other_copy.copy()
    out.paste(_rgb(small, *span), (0, span[0]))
    return out


def _resized(colour: pyvips.Image, wanted: tuple[int, int]) -> pyvips.Image:
    """``colour`` at ``wanted`` size, as thumbnails shrink: a box filter by an integer factor
    that leaves at least twice the size (libvips' resize ``gap`` 2.0, Pillow's
    ``reducing_gap``), then LANCZOS; a box filter all the way blurs text."""
    if (colour.width, colour.height) == wanted:
        return colour
    across = max(1, colour.width // (2 * wanted[0]))
    down = max(1, colour.height // (2 * wanted[1]))
    boxed = colour.shrink(across, down) if across > 1 or down > 1 else colour
    return boxed.reduce(boxed.width / wanted[0], boxed.height / wanted[1], kernel="lanczos3")


def checked_size(data: bytes, max_pixels: int, which: str) -> tuple[int, int]:
    try:
        return image_size(data, max_pixels)
    except InvalidImage as exc:
        exc.details.setdefault("input", which)
        raise


def _open(data: bytes, max_pixels: int) -> pyvips.Image:
    """Header only (no pixels decoded) with the pixel budget checked."""
    if not data:
        raise InvalidImage("the file is empty (0 bytes)")
    image = _header(data, max_pixels)
    check_pixels(image.width, image.height, max_pixels)
    return image


def _header(data: bytes, max_pixels: int) -> pyvips.Image:
    """A lazily decoded image: libvips' own, or the Pillow fallback's."""
    return open_header(data) or _fallback(data, max_pixels)


def _streamed(image: pyvips.Image) -> bool:
    """Did libvips open it itself (rather than the Pillow fallback)?"""
    return bool(image.get_typeof("vips-loader"))


def _fallback(data: bytes, max_pixels: int) -> pyvips.Image:
    """Formats libvips cannot decode here: Pillow decodes them whole, budget checked first.

    That is BMP (uncompressed: decoded, it is no larger than its bytes) and HEIC (pillow-heif;
    phone photos, 12-48 MP): the one case where detection holds a decoded image.
    """

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
                check_pixels(*img.size, max_pixels)
                img.seek(0)
                pixels = np.asarray(img.convert("RGBA"))
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not an image: the bytes match no supported image format") from None
    except Exception as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from exc
    return pyvips.Image.new_from_array(pixels, interpretation="srgb")


def _display_size(image: pyvips.Image) -> tuple[int, int]:
    turned = header_orientation(image) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else (image.width, image.height)


def normalised(
    data: bytes, work: tuple[int, int], size: tuple[int, int], max_pixels: int
) -> tuple[pyvips.Image, pyvips.Image]:
    """8-bit sRGB, EXIF-oriented, at ``work`` size: 3 bands flattened on white + opacity, and
    those 3 bands alone (cheaper to shrink than taken apart again).

    An image already at ``work`` size and upright is decoded as it is (the fast path, pixel for
    pixel); otherwise ``thumbnail_buffer`` does orientation and (for the larger image of a
    rescaled pair) shrink-on-load in one streamed step.
    """
    source = _header(data, max_pixels)
    if (source.width, source.height) == work and header_orientation(source) == 1:
        image = source
    elif _streamed(source):
        image = pyvips.Image.thumbnail_buffer(
            data, work[0], height=work[1], size="force", fail_on="error"
        )
    else:  # the Pillow fallback: already decoded
        image = source
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if (image.width, image.height) != work:  # rounding in shrink-on-load, or the fallback
        image = image.resize(work[0] / image.width, vscale=work[1] / image.height)
    if image.format != "uchar":
        image = image.cast("uchar")
    if not image.hasalpha():
        # (extract_band on a 3-band image would cost a copy and, measured, much more memory)
        colour = image if image.bands == 3 else image[0:3]
        return colour.bandjoin(255), colour
    colour = image.flatten(background=[255, 255, 255]).cast("uchar")
    return colour.bandjoin(image[image.bands - 1]), colour


def fetch_rows(
    region: pyvips.Region, first: int, last: int, width: int, bands: int = 4
) -> NDArray[np.uint8]:
    raw = region.fetch(0, first, width, last - first)
    return np.frombuffer(raw, dtype=np.uint8).reshape(last - first, width, bands)


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
