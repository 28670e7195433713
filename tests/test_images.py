"""handler.images.prepare on real decoders: sizes, orientation, modes and hostile input."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from handler.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from handler.images import NEUTRAL, fill_boxes, prepare
from tests.support import scenes
from tests.support.png import png_header_only

BOX = (1024, 1024)


def _decode(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG"
    return img.convert("RGB")


def test_large_jpeg_is_downsized_into_the_box() -> None:
    big = scenes.photo("coffee").resize((3000, 2000))
    prepared = prepare(scenes.encode(big), BOX, 85)
    assert prepared.original_size == (3000, 2000)
    assert prepared.size == (1024, 683)
    assert prepared.format == "JPEG"
    assert _decode(prepared.jpeg).size == prepared.size
    assert prepared.image.mode == "RGB"


def test_small_image_is_not_upscaled() -> None:
    prepared = prepare(scenes.encode(scenes.photo("chelsea")), BOX, 85)
    assert prepared.size == prepared.original_size == (451, 300)


def test_quality_changes_the_encoded_size() -> None:
    data = scenes.encode(scenes.photo("astronaut"))
    assert len(prepare(data, BOX, 30).jpeg) < len(prepare(data, BOX, 95).jpeg)


def test_exif_orientation_is_applied() -> None:
    photo = scenes.photo("coffee")  # 600x400, landscape
    prepared = prepare(scenes.exif_rotated(photo), (300, 300), 90)
    assert prepared.original_size == (600, 400)
    assert prepared.size == (300, 200)
    expected = np.asarray(photo.resize((300, 200)), dtype=np.float64)
    assert np.abs(np.asarray(prepared.image, dtype=np.float64) - expected).mean() < 12


def test_format_is_detected_from_content_not_name() -> None:
    assert prepare(scenes.as_png(scenes.photo("rocket")), BOX, 85).format == "PNG"
    assert prepare(scenes.as_webp(scenes.photo("rocket")), BOX, 85).format == "WEBP"


def _png(img: Image.Image) -> bytes:
    return scenes.encode(img, "PNG")


def test_cmyk_jpeg_becomes_rgb() -> None:
    photo = scenes.photo("astronaut").resize((2048, 2048))
    prepared = prepare(scenes.encode(photo.convert("CMYK")), BOX, 90)
    assert prepared.original_mode == "CMYK"
    assert prepared.size == (1024, 1024)
    expected = np.asarray(photo.resize((1024, 1024)), dtype=np.float64)
    assert np.abs(np.asarray(prepared.image, dtype=np.float64) - expected).mean() < 15


def test_alpha_is_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    image = prepare(_png(rgba), BOX, 95).image
    assert image.getpixel((48, 32)) == pytest.approx((255, 255, 255), abs=3)
    assert image.getpixel((8, 32)) == pytest.approx((0, 0, 255), abs=6)


def test_palette_with_transparency_and_greyscale_alpha() -> None:
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    assert prepare(_png(pal), BOX, 95).image.getpixel((5, 5)) == pytest.approx(
        (255, 255, 255), abs=3
    )
    la = Image.new("LA", (40, 40), (0, 255))
    assert prepare(_png(la), BOX, 95).image.getpixel((5, 5)) == pytest.approx((0, 0, 0), abs=3)


def test_sixteen_bit_greyscale_keeps_its_range() -> None:
    values = np.full((50, 50), 32768, dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I")
    pixel = prepare(_png(img), BOX, 95).image.getpixel((10, 10))
    assert pixel == pytest.approx((128, 128, 128), abs=3)


def test_one_bit_and_greyscale() -> None:
    one = Image.new("1", (30, 30), 1)
    assert prepare(_png(one), BOX, 95).image.getpixel((3, 3)) == pytest.approx(
        (255, 255, 255), abs=3
    )
    grey = scenes.photo("rocket").convert("L")
    prepared = prepare(scenes.encode(grey), BOX, 90)
    assert prepared.image.mode == "RGB"
    assert prepared.original_mode == "L"


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    prepared = prepare(buffer.getvalue(), BOX, 95)
    assert prepared.format == "GIF"
    red, _green, blue = prepared.image.getpixel((16, 16))  # type: ignore[misc]
    assert red > 200 and blue < 60


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_other_supported_formats(fmt: str) -> None:
    prepared = prepare(scenes.encode(scenes.photo("chelsea"), fmt), (200, 200), 85)
    assert prepared.format == fmt
    assert prepared.size == (200, 133)


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        prepare(b"", BOX, 85)


def test_random_bytes_are_not_an_image() -> None:
    with pytest.raises(InvalidImage, match="not an image") as info:
        prepare(np.random.default_rng(1).bytes(5000), BOX, 85)
    assert info.type is InvalidImage


def test_truncated_jpeg() -> None:
    data = scenes.encode(scenes.photo("astronaut"))
    with pytest.raises(InvalidImage, match="decode"):
        prepare(data[: len(data) // 2], BOX, 85)


def test_unsupported_format_is_named() -> None:
    with pytest.raises(UnsupportedFormat, match="PCX"):
        prepare(scenes.encode(scenes.photo("chelsea"), "PCX"), BOX, 85)


def test_decompression_bomb_is_rejected_without_decoding() -> None:
    bomb = png_header_only(40000, 40000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"1600\.0 megapixels"):
        prepare(bomb, BOX, 85)
    assert time.perf_counter() - start < 0.5


def test_pixel_budget_is_configurable() -> None:
    data = scenes.encode(scenes.photo("astronaut"))
    with pytest.raises(ImageTooLarge):
        prepare(data, BOX, 85, max_pixels=512 * 511)
    assert prepare(data, BOX, 85, max_pixels=512 * 512).original_size == (512, 512)


def test_fill_boxes_rounds_outwards_and_never_alters_the_callers_image() -> None:
    image = Image.new("RGB", (10, 8), (255, 0, 0))
    filled = fill_boxes(image, [(2.5, 1.2, 4.1, 3.0), (9.9, 7.5, 20.0, 20.0)])
    pixels = np.asarray(filled)
    grey = np.all(pixels == NEUTRAL, axis=2)
    expected = np.zeros((8, 10), dtype=bool)
    expected[1:3, 2:5] = True  # x 2.5..4.1 -> columns 2-4; y 1.2..3.0 -> rows 1-2
    expected[7, 9] = True  # a sliver at the corner still fills its pixel
    assert np.array_equal(grey, expected)
    assert np.all(np.asarray(image) == (255, 0, 0))


def test_fill_boxes_without_a_box_inside_returns_the_image_itself() -> None:
    image = Image.new("RGB", (4, 4), (0, 0, 255))
    assert fill_boxes(image, [(3.0, 1.0, 3.0, 4.0), (2.0, 2.0, 1.0, 3.0)]) is image
