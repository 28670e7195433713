"""``handler.align`` on its own: row signatures and column profiles built strip by strip, the
horizontal and vertical offsets, the row alignment's bands, and the check pass 1 makes while
the rows stream past. Real rendered text pages and photographs, as numpy arrays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from handler.align import (
    Alignment,
    Band,
    Profiles,
    align,
    horizontal_offset,
    moved_rows,
    translated,
    vertical_offset,
)
from tests.support import scenes, screens


def _grey(image: Image.Image) -> NDArray[np.uint8]:
    return np.asarray(image.convert("RGB"))[..., 1].copy()


def _profiles(grey: NDArray[np.uint8], strip: int = 16) -> Profiles:
    profiles = Profiles(grey.shape[1], grey.shape[0])
    for top in range(0, grey.shape[0], strip):
        profiles.add(grey[top : top + strip], top)
    return profiles


@pytest.fixture(scope="module")
def page() -> NDArray[np.uint8]:
    return _grey(screens.text_page((900, 1600)).image)


def _inserted(grey: NDArray[np.uint8], at: int, rows: int, value: int = 90) -> NDArray[np.uint8]:
    band = np.full((rows, grey.shape[1]), value, np.uint8)
    band[rows // 3 : rows // 3 + 4, 40:400] = 20  # something drawn in it
    return np.concatenate([grey[:at], band, grey[at:]])


def test_identical_rows_need_no_alignment(page: NDArray[np.uint8]) -> None:
    assert align(_profiles(page), _profiles(page)) is None


def test_a_band_inserted_at_the_top(page: NDArray[np.uint8]) -> None:
    alignment = align(_profiles(page), _profiles(_inserted(page, 0, 74)))
    assert alignment is not None and alignment.dx == 0
    assert alignment.bands == (
        Band("inserted", None, (0, 74)),
        Band("matched", (0, 1600), (74, 1674)),
    )
    assert alignment.dy == 74 and not alignment.identity


def test_a_band_removed_and_another_inserted_further_down(page: NDArray[np.uint8]) -> None:
    # Rows 400..470 of A removed (a blank-to-blank cut keeps the page's own rhythm), and a band
    # of 50 rows inserted at row 1100 of A.
    cut = np.concatenate([page[:400], page[470:]])
    edited = _inserted(cut, 1030, 50)
    alignment = align(_profiles(page), _profiles(edited))
    assert alignment is not None
    kinds = [(band.kind, band.shift) for band in alignment.bands]
    assert kinds == [
        ("matched", 0),
        ("removed", 0),
        ("matched", -70),
        ("inserted", 0),
        ("matched", -20),
    ], alignment.bands
    removed, inserted = alignment.bands[1], alignment.bands[3]
    assert removed.a is not None and removed.height == 70
    assert abs(removed.a[0] - 400) <= 24  # (somewhere in the blank rows around the cut)
    assert inserted.b is not None and inserted.b == (1030, 1080)


def test_jpeg_noise_does_not_break_the_alignment(page: NDArray[np.uint8]) -> None:
    def jpeg(grey: NDArray[np.uint8]) -> NDArray[np.uint8]:
        data = scenes.encode(Image.fromarray(grey).convert("RGB"), "JPEG", quality=75)
        return _grey(Image.open(io.BytesIO(data)))

    alignment = align(_profiles(jpeg(page)), _profiles(jpeg(_inserted(page, 0, 74))))
    assert alignment is not None
    assert [(b.kind, b.a, b.b) for b in alignment.bands] == [
        ("inserted", None, (0, 74)),
        ("matched", (0, 1600), (74, 1674)),
    ]


@pytest.mark.parametrize("name", scenes.PHOTOS)
def test_a_photo_moved_by_a_few_pixels(name: str) -> None:
    photo = _grey(scenes.photo(name))
    height, width = photo.shape
    a = photo[: height - 16, : width - 16]
    b = photo[4 : height - 12, 6 : width - 10]  # the camera moved: content 6 left, 4 up
    profiles_a, profiles_b = _profiles(a, 144), _profiles(b, 144)
    assert horizontal_offset(profiles_a.columns, profiles_b.columns) == -6
    alignment = align(profiles_a, profiles_b)
    assert alignment is not None and (alignment.dx, alignment.dy) == (-6, -4)
    assert alignment.bands == tuple(translated(-4, height - 16, height - 16))


def test_two_different_pictures_have_no_offset() -> None:
    a, b = _grey(scenes.photo("astronaut")), _grey(scenes.photo("camera"))
    profiles_a, profiles_b = _profiles(a), _profiles(b)
    assert horizontal_offset(profiles_a.columns, profiles_b.columns) == 0
    assert vertical_offset(profiles_a.rows, profiles_b.rows) == 0


def test_translated_bands_cover_both_images() -> None:
    down = translated(5, 100, 100)
    assert [(b.kind, b.a, b.b) for b in down] == [
        ("inserted", None, (0, 5)),
        ("matched", (0, 95), (5, 100)),
        ("removed", (95, 100), None),
    ]
    up = translated(-3, 100, 110)
    assert [(b.kind, b.a, b.b) for b in up] == [
        ("removed", (0, 3), None),
        ("matched", (3, 100), (0, 97)),
        ("inserted", None, (97, 110)),
    ]


def test_moved_rows_sees_a_strip_that_moved_down(page: NDArray[np.uint8]) -> None:
    edited = _inserted(page, 0, 74)
    a, b = _profiles(page[:480]), _profiles(edited[:480])
    # Rows 160..176: B's are A's 86..102, read already.
    assert moved_rows(a, b, (160, 176), (480, 480), [], search=True) == 74
    assert moved_rows(a, b, (176, 192), (480, 480), [74], search=False) == 74
    # A strip that is where it was is no move.
    same = _profiles(page[:480])
    assert moved_rows(a, same, (160, 176), (480, 480), [], search=True) is None


def test_a_long_page_with_a_band_removed_and_one_inserted() -> None:
    """10,000 rows (the benchmark measures how long it takes; this only checks the answer)."""
    page = _grey(screens.text_page((600, 10_000)).image)
    edited = _inserted(np.concatenate([page[:3000], page[3060:]]), 7000, 40)
    alignment = align(_profiles(page), _profiles(edited))
    assert isinstance(alignment, Alignment)
    assert [band.kind for band in alignment.bands] == [
        "matched",
        "removed",
        "matched",
        "inserted",
        "matched",
    ]
