"""Real photographs (shipped inside scikit-image) and the edits the comparator must tell apart."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from skimage import data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        params.setdefault("quality", 92)
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def reencoded(img: Image.Image) -> bytes:
    return encode(img, "JPEG", quality=70)


def rescaled(img: Image.Image) -> bytes:
    return encode(img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC))


def as_png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def as_webp(img: Image.Image) -> bytes:
    return encode(img, "WEBP", quality=90)


def exif_rotated(img: Image.Image) -> bytes:
    """Pixels stored turned by 90 degrees with EXIF orientation 6 (display = the original)."""
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", exif=exif.tobytes())


def pasted_object(img: Image.Image, fraction: float = 0.03) -> bytes:
    """A patch of another photo pasted over about ``fraction`` of the image."""
    edited = img.copy()
    side = int((fraction * img.width * img.height) ** 0.5)
    patch = photo("coffee" if img.size != photo("coffee").size else "astronaut")
    patch = patch.resize((side, side))
    edited.paste(patch, pasted_box(img, fraction)[:2])
    return encode(edited)


def pasted_box(img: Image.Image, fraction: float = 0.03) -> tuple[int, int, int, int]:
    side = int((fraction * img.width * img.height) ** 0.5)
    x, y = img.width // 2, img.height // 3
    return (x, y, side, side)


def mirrored(img: Image.Image) -> bytes:
    return encode(ImageOps.mirror(img))


def recoloured(img: Image.Image) -> bytes:
    """Hue rotated by a third of the circle: same structure, different colours."""
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 85) % 256
    return encode(Image.fromarray(hsv, "HSV").convert("RGB"))


def blurred_region(img: Image.Image) -> bytes:
    edited = img.copy()
    x, y, w, h = blurred_box(img)
    radius = max(8, img.width // 60)  # a blur that is visible at any resolution
    region = edited.crop((x, y, x + w, y + h)).filter(ImageFilter.GaussianBlur(radius))
    edited.paste(region, (x, y))
    return encode(edited)


def blurred_box(img: Image.Image) -> tuple[int, int, int, int]:
    return (img.width // 4, img.height // 4, img.width // 3, img.height // 3)


SIMILAR_EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "reencoded_q70": reencoded,
    "rescaled": rescaled,
    "png": as_png,
    "webp": as_webp,
    "exif_rotated": exif_rotated,
}
DIFFERENT_EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "pasted_object": pasted_object,
    "mirrored": mirrored,
    "recoloured": recoloured,
    "blurred_region": blurred_region,
}
