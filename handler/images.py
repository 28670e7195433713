"""Bounded image preparation: bytes in, a small RGB JPEG out, without decoding more than needed.

The original service converted to RGB before shrinking, which forces a full-size decode, and
handed full-size images to the model. Here the header is checked against a pixel budget before
any decoding, JPEGs are decoded in the DCT domain straight at (about) the target scale, and every
mode conversion happens after the shrink, on the small image.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageDraw, ImageFile, ImageOps, UnidentifiedImageError

from handler.config import DEFAULT_MAX_INPUT_PIXELS
from handler.errors import ComparisonTimeout, ImageTooLarge, InvalidImage, UnsupportedFormat
from handler.vips import Expired, header_orientation, open_header, pyvips, thumbnail_rgb

#: Formats we decode. Restricting ``Image.open`` to them keeps exotic decoders (EPS runs
#: Ghostscript, for one) out of reach of untrusted input.
#: (Multi-picture MPO files from cameras open through the JPEG plugin and report "MPO".)
#: AVIF is Pillow's own plugin; HEIC/HEIF (phone photos) comes from pillow-heif.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")

# The pixel budget is enforced by ``prepare`` from the header before decoding; Pillow's own global
# guard (which warns at 89 MP and fails at 179 MP) would otherwise override the configured limit.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ``Image.open(formats=...)`` looks plugins up by name but only pre-registers the common ones.
Image.init()
pillow_heif.register_heif_opener()

_WHITE = (255, 255, 255)
#: Above this many pixels, non-JPEG images are shrunk by libvips (see ``_streamed``).
STREAM_PIXELS = 4_000_000
#: The fill of ignored boxes: the same in A and B, so they compare equal.
NEUTRAL = (128, 128, 128)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An input image after bounded decoding and downsizing, ready for any comparator."""

    jpeg: bytes
    #: The downsized RGB pixels (what ``jpeg`` encodes), kept to spare comparators a re-decode.
    image: Image.Image
    size: tuple[int, int]
    original_size: tuple[int, int]
    format: str
    original_mode: str

    @property
    def scale(self) -> float:
        """Factor from prepared coordinates back to original (display-oriented) pixels."""
        return self.original_size[0] / self.size[0]


@dataclass(frozen=True, slots=True)
class InputHeader:
    """What an input's header tells ``prepare`` before any pixel is decoded."""

    format: str
    mode: str
    #: Display-oriented (EXIF applied).
    size: tuple[int, int]


def prepare(
    data: bytes,
    max_size: tuple[int, int],
    quality: int,
    *,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    expired: Expired | None = None,
) -> PreparedImage:
    """Decode ``data`` into an RGB image that fits ``max_size`` and encode it as JPEG.

    Raises ``InvalidImage`` (or its subclasses ``UnsupportedFormat``/``ImageTooLarge``) for
    anything that is not a decodable image within the pixel budget. A large input shrunk by
    libvips stops with ``ComparisonTimeout`` once ``expired()`` holds (see
    ``handler.vips.kill_when``); Pillow's decodes (JPEG, small images) run to their end.
    """
    with _checked_open(data, max_pixels) as img:
        streamed = _streamed(data, img)
        if streamed is not None:
            return _encoded(_thumbnail(data, max_size, expired), streamed, quality)
        orientation = _orientation(img)
        # EXIF orientations 5-8 store the picture turned by 90 degrees: width and height swap.
        turned = orientation in (5, 6, 7, 8)
        width, height = img.size
        header = InputHeader(
            format=str(img.format),
            mode=img.mode,
            size=(height, width) if turned else (width, height),
        )
        box = (max_size[1], max_size[0]) if turned else max_size
        return _encoded(_shrink(img, box, orientation), header, quality)


def read_header(data: bytes, max_pixels: int) -> InputHeader:
    """An input's format, mode and display-oriented size, checked against the pixel budget as
    ``prepare`` checks it (same errors). Nothing is decoded.

    Native-resolution detection decodes every input anyway and resizes it on the way
    (``handler.detect``); ``prepare_shrunk`` finishes that copy, so each input of a pair is
    decoded once per comparison instead of twice. The EXIF orientation comes from libvips'
    header where libvips reads the file (detection orients it so; Pillow would decode a whole
    PNG to find its eXIf chunk), else from Pillow's.
    """
    with _checked_open(data, max_pixels) as img:
        width, height = img.size
        header = open_header(data)
        orientation = header_orientation(header) if header else _orientation(img)
        turned = orientation in (5, 6, 7, 8)
        return InputHeader(
            format=str(img.format),
            mode=img.mode,
            size=(height, width) if turned else (width, height),
        )


def verify(data: bytes) -> None:
    """``InvalidImage`` when the file is visibly broken, without decoding its pixels: Pillow's
    ``verify`` (a PNG's chunks are read to the end and their checksums checked: a truncated
    or corrupted PNG fails; other formats get at most a header check)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
                img.verify()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"the image file is broken: {exc}") from exc


def prepare_shrunk(
    header: InputHeader, shrunk: Image.Image, max_size: tuple[int, int], quality: int
) -> PreparedImage:
    """``prepare``'s result from a display-oriented RGB copy detection made on the way, at
    the prepared size (resized with LANCZOS where it is not)."""
    size = fitted_size(header.size, max_size)
    rgb = shrunk if shrunk.size == size else shrunk.resize(size, Image.Resampling.LANCZOS)
    return _encoded(rgb, header, quality)


def fitted_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` shrunk (never enlarged) to fit ``box``, aspect kept, rounded as Pillow and
    libvips round their thumbnails."""
    width, height = size
    scale = min(box[0] / width, box[1] / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encoded(rgb: Image.Image, header: InputHeader, quality: int) -> PreparedImage:
    buffer = io.BytesIO()
    # optimize=True only shrinks Huffman tables (lossless) and costs a second pass: skip it.
    rgb.save(buffer, "JPEG", quality=quality)
    return PreparedImage(
        jpeg=buffer.getvalue(),
        image=rgb,
        size=rgb.size,
        original_size=header.size,
        format=header.format,
        original_mode=header.mode,
    )


def fill_boxes(
    image: Image.Image, boxes: Iterable[tuple[float, float, float, float]]
) -> Image.Image:
    """The one way an ignore region is masked: each box (x0, y0, x1, y1 in ``image``'s pixels,
    fractional where it was scaled) filled with NEUTRAL, rounded outwards so that no sliver of
    it is left and at least one pixel is filled. A copy when any box is filled (the caller's
    image is never altered); ``image`` itself when every box is empty."""
    filled = image
    for x0, y0, x1, y1 in boxes:
        if x1 <= x0 or y1 <= y0:
            continue
        if filled is image:
            filled = image.copy()
        left, top = int(x0), int(y0)
        right = max(left, math.ceil(x1) - 1)
        bottom = max(top, math.ceil(y1) - 1)
        ImageDraw.Draw(filled).rectangle((left, top, right, bottom), fill=NEUTRAL)
    return filled


def mask_boxes(
    image: PreparedImage, boxes: list[tuple[float, float, float, float]], quality: int
) -> PreparedImage:
    """A copy with each box (x0, y0, x1, y1 as fractions of the image) filled with NEUTRAL."""
    width, height = image.image.size
    masked = fill_boxes(
        image.image,
        [(x0 * width, y0 * height, x1 * width, y1 * height) for x0, y0, x1, y1 in boxes],
    )
    buffer = io.BytesIO()
    masked.save(buffer, "JPEG", quality=quality)
    return dataclasses.replace(image, jpeg=buffer.getvalue(), image=masked)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """``ImageTooLarge`` when ``width`` x ``height`` is over the pixel budget."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels; not decoded"
        )


def header_dimensions(head: bytes) -> tuple[int, int] | None:
    """Width and height from the first bytes of an image file, or None when they are not
    enough to tell (a JPEG's frame header can sit behind large EXIF/ICC segments).

    Lets remote storage refuse a huge image after a small ranged read instead of a download.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head), formats=SUPPORTED_FORMATS) as img:
                width, height = img.size
    except Exception:
        return None
    return (width, height)


def _checked_open(data: bytes, max_pixels: int) -> Image.Image:
    """``_open`` with the pixel budget checked from the header."""
    if not data:
        raise InvalidImage("the file is empty (0 bytes)")
    img = _open(data)
    try:
        check_pixels(*img.size, max_pixels)
    except ImageTooLarge:
        img.close()
        raise
    return img


def _open(data: bytes) -> Image.Image:
    """Open lazily (header only), restricted to supported formats, with clear errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            img.seek(0)  # animated images: the first frame
    except UnidentifiedImageError:
        raise _identify_failure(data) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot read the image header: {exc}") from exc
    return img


def _identify_failure(data: bytes) -> InvalidImage:
    """Tell "an image we do not support" from "not an image" (header parse only, no decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                found = other.format
    except Exception:
        found = None
    if found:
        return UnsupportedFormat(
            f"{found} images are not supported (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    return InvalidImage("not an image: the bytes match no supported image format")


def _streamed(data: bytes, img: Image.Image) -> InputHeader | None:
    """Large non-JPEG images go through libvips, which shrinks while it decodes in strips
    (Pillow would hold the whole decoded image). None where Pillow is as good (JPEG draft,
    small images) or libvips cannot decode it."""
    width, height = img.size
    if img.format in ("JPEG", "MPO") or width * height <= STREAM_PIXELS:
        return None
    header = open_header(data)
    if header is None:
        return None
    turned = header_orientation(header) in (5, 6, 7, 8)
    return InputHeader(
        format=str(img.format), mode=img.mode, size=(height, width) if turned else (width, height)
    )


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when there is none). A PNG's ``getexif()`` decodes the whole
    image to find chunks after the pixels (only here, never on the streamed path): a corrupt
    data stream fails there first."""
    try:
        value = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from exc
    return value if isinstance(value, int) else 1


def _thumbnail(data: bytes, box: tuple[int, int], expired: Expired | None) -> Image.Image:
    try:
        return thumbnail_rgb(data, box, expired=expired)
    except pyvips.Error as exc:
        if expired is not None and expired():
            raise ComparisonTimeout("killed while shrinking the image") from None
        raise InvalidImage(f"cannot decode the image: {str(exc).strip().splitlines()[0]}") from exc


def _shrink(img: Image.Image, box: tuple[int, int], orientation: int) -> Image.Image:
    """Decode at the smallest scale that still covers ``box``, then resize and normalise."""
    try:
        if img.format in ("JPEG", "MPO"):
            img.draft(None, box)  # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding
        img.load()
        img = _to_resizable_mode(img)
        img.thumbnail(box, Image.Resampling.LANCZOS, reducing_gap=2.0)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from exc
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_resizable_mode(img: Image.Image) -> Image.Image:
    """Modes LANCZOS cannot resize (palette, 1-bit, 16-bit) become 8-bit ones first."""
    if img.mode == "P" or img.mode == "PA":
        return img.convert("RGBA" if _has_alpha(img) else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_l(img)
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit and float greyscale: scale the value range to 8 bits (``convert`` would clip)."""
    values = np.asarray(img, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    scale = 255.0 / (65535.0 if top > 255 else 255.0 if top > 1 else 1.0)
    return Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten alpha on white; CMYK, greyscale and anything else becomes plain RGB."""
    if img.mode == "RGB":
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
