"""Work that scales with what changed: B's resizes, colours and SSIM made from A's where the two
differ in a few rows only must be what computing all of B gives, pixel for pixel and bit for bit.

Each test computes the same thing both ways, with the real libraries (Pillow, libvips,
scikit-image, numpy's FFT), on everyday screenshots with a band changed at the top, in the
middle and at the bottom (the rows next to an edge are where a kernel or window is cut off).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from skimage.color import rgb2lab
from skimage.metrics import structural_similarity

from handler import align, splice
from handler.compare import metrics
from handler.detect import detect
from handler.diff_image import _INKS, _PHOTO_COLORS, _to_palette
from tests.bench.bench_folder import screenshot
from tests.support import screens

BUDGET = 100_000_000
LANCZOS = Image.Resampling.LANCZOS


def _edited(page: Image.Image, top: int, rows: int, seed: int = 0) -> Image.Image:
    """``page`` with a band of ``rows`` rows from ``top`` (clipped to the page) recoloured
    over the right part of the page, where a changed line of text would be."""
    out = page.copy()
    bottom = min(page.height - 1, top + rows - 1)
    colour = (200, 30 + seed * 40 % 200, 30)
    ImageDraw.Draw(out).rectangle((page.width // 3, top, page.width - 1, bottom), fill=colour)
    return out


def _places(height: int) -> list[int]:
    """Top, middle and bottom of a page ``height`` rows high."""
    return [0, height // 2, height - 3]


def test_differing_rows_finds_the_first_and_last_row_that_differ() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (50, 33, 3), dtype=np.uint8)  # (33 * 3 bytes: no wide word fits)
    assert splice.differing_rows(a, a.copy()) is None
    b = a.copy()
    b[12, 32, 2] ^= 1
    b[30, 0, 0] ^= 128
    assert splice.differing_rows(a, b) == (12, 31)
    wide = rng.integers(0, 256, (20, 1280, 4), dtype=np.uint8)
    other = wide.copy()
    other[19, 1279, 3] ^= 1
    assert splice.differing_rows(wide, other) == (19, 20)
    with pytest.raises(ValueError, match="shapes differ"):
        splice.differing_rows(a, wide)


@pytest.mark.parametrize("size", [(1024, 640), (1024, 576), (1000, 683), (640, 480), (64, 40)])
def test_pillow_resize_of_b_made_from_a_is_the_resize_of_b(size: tuple[int, int]) -> None:
    """Exact scales (640 -> 160 rows) splice; others (683 -> 175), and enlargements (40 ->
    160: Pillow's resize of a box is not its resize of the whole there), resize B whole:
    either way the same pixels as resizing all of B."""
    page = screenshot(3, changed=False).resize(size, LANCZOS)
    work = (256, round(size[1] * 256 / size[0]))
    page_small = page.resize(work, LANCZOS)
    for top in [*_places(size[1]), size[1] // 4]:
        edited = _edited(page, top, 1 + size[1] // 50)
        made = splice.resized_like(page, page_small, edited, LANCZOS)
        assert made.tobytes() == edited.resize(work, LANCZOS).tobytes(), (size, top)
    same = splice.resized_like(page, page_small, page.copy(), LANCZOS)
    assert same.tobytes() == page_small.tobytes() and same is not page_small


@pytest.mark.parametrize("size", [(1280, 800), (1366, 768), (800, 1300)])
def test_detections_copy_of_b_is_the_resize_of_b(size: tuple[int, int]) -> None:
    """The prepared copy detection makes of B, from A's where they differ in a few rows, is
    the one it makes of B alone (B against itself: one copy, all of it resized)."""
    page = screenshot(8, changed=False).resize(size, LANCZOS)
    scale = min(1024 / size[0], 1024 / size[1])
    wanted = (round(size[0] * scale), round(size[1] * scale))
    data_a = screens.png(page)
    for seed, top in enumerate(_places(size[1])):
        data_b = screens.png(_edited(page, top, 20, seed))
        found = detect(
            data_a, data_b, max_pixels=BUDGET, shrunk_sizes=(wanted, wanted), keep_pixels=True
        )
        alone = detect(data_b, data_b, max_pixels=BUDGET, shrunk_sizes=(wanted, wanted))
        copy_b, reference = found.shrunk[1], alone.shrunk[0]
        assert found.regions and copy_b is not None and reference is not None
        assert copy_b.tobytes() == reference.tobytes(), (size, top)


def test_a_change_over_most_rows_resizes_b_whole() -> None:
    page = screenshot(5, changed=False)
    edited = _edited(page, 10, page.height - 20)
    data_a, data_b = screens.png(page), screens.png(edited)
    sizes = ((1024, 640), (1024, 640))
    found = detect(data_a, data_b, max_pixels=BUDGET, shrunk_sizes=sizes, keep_pixels=True)
    alone = detect(data_b, data_b, max_pixels=BUDGET, shrunk_sizes=sizes)
    assert found.shrunk[1] is not None and alone.shrunk[0] is not None
    assert found.shrunk[1].tobytes() == alone.shrunk[0].tobytes()
    assert splice.output_rows((10, page.height - 10), page.height, 640) is None


def _grey(image: Image.Image) -> NDArray[np.float64]:
    return np.asarray(image.convert("L"), dtype=np.float64)


def test_ssim_over_the_changed_rows_is_scikit_images_over_all() -> None:
    page = screenshot(11, changed=False).resize((256, 160), LANCZOS)
    for top in [*_places(160), 70]:
        for rows in (1, 4):
            a, b = _grey(page), _grey(_edited(page, top, rows))
            mean, ssim_map = metrics._ssim(a, b, structural_similarity)
            want_mean, want_map = structural_similarity(
                a, b, data_range=255.0, gaussian_weights=True, sigma=1.5, full=True
            )
            assert mean == want_mean and np.array_equal(ssim_map, want_map), (top, rows)
            assert mean < 1.0


def test_lab_colours_and_histograms_are_the_whole_images() -> None:
    page = screenshot(12, changed=False).resize((256, 160), LANCZOS)
    rgb_a = np.asarray(page)
    lab_a = rgb2lab(rgb_a)
    for top in _places(160):
        rgb_b = np.asarray(_edited(page, top, 3))
        assert np.array_equal(metrics._lab_like(rgb_a, lab_a, rgb_b, rgb2lab), rgb2lab(rgb_b))
        counts, _ = np.histogramdd(rgb_b.reshape(-1, 3), bins=(8, 8, 8), range=[(0, 256)] * 3)
        assert np.array_equal(metrics._histogram(rgb_b), counts)
    edges = np.array([[[0, 31, 32], [63, 64, 255], [224, 223, 128]]], np.uint8)
    counts, _ = np.histogramdd(edges.reshape(-1, 3), bins=(8, 8, 8), range=[(0, 256)] * 3)
    assert np.array_equal(metrics._histogram(edges), counts)


def test_phase_correlation_in_batches_is_one_profile_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(5)
    cases = [(16, 1280, 1280), (16, 800, 874), (3, 40, 31), (16, 5000, 5000)]
    for count, length_a, length_b in cases:
        a = list(rng.integers(0, 1 << 20, (count, length_a)).astype(np.uint32))
        b = list(rng.integers(0, 1 << 20, (count, length_b)).astype(np.uint32))
        limit = min(length_a, length_b) // 4
        batched = align._correlation(a, b, limit)
        with monkeypatch.context() as patch:
            patch.setattr(align, "_BATCH_SAMPLES", 1)
            alone = align._correlation(a, b, limit)
        assert np.array_equal(batched, alone), (count, length_a, length_b)


def test_diff_palette_keeps_the_inks_exact_and_the_photo_close() -> None:
    photos = Image.new("RGB", (1030, 700), (255, 255, 255))
    photos.paste(screenshot(2, changed=False).resize((512, 320)), (0, 0))
    photos.paste(screenshot(3, changed=True).resize((512, 320)), (518, 0))
    photos.paste(screenshot(4, changed=False).crop((200, 100, 648, 548)), (60, 330))
    canvas = _to_palette(photos)
    palette = canvas.getpalette() or []
    inks = [tuple(palette[3 * i : 3 * i + 3]) for i in range(_PHOTO_COLORS, 256)]
    assert inks == list(_INKS)
    shown = np.asarray(canvas.convert("RGB")).astype(np.int16)
    gap = np.abs(shown - np.asarray(photos).astype(np.int16))
    assert gap.mean() < 4 and gap.max() < 48
    # (Pillow maps to a given palette through a cache of 4 x 4 x 4 colour boxes: a colour may
    # come out a few levels off, never more.)
    assert np.abs(shown[690, 1020] - 255).max() <= 4


def test_the_overviews_b_panel_is_bs_own_within_a_level() -> None:
    """The diff image's B panel at a scale with no exact splice (640 -> 481 rows, bilinear):
    rows far from the change are A's panel's, which are B's own there; the recomputed rows
    are B's within a level of rounding."""
    page = screenshot(6, changed=False).resize((1024, 640), LANCZOS)
    edited = screenshot(6, changed=True).resize((1024, 640), LANCZOS)
    bilinear = Image.Resampling.BILINEAR
    size = (769, 481)
    made = splice.resized_like(page, page.resize(size, bilinear), edited, bilinear, exact=False)
    whole = np.asarray(edited.resize(size, bilinear)).astype(np.int16)
    gap = np.abs(np.asarray(made).astype(np.int16) - whole)
    assert gap.max() <= 1
    changed = splice.differing_rows(np.asarray(page), np.asarray(edited))
    assert changed is not None
    span = splice.output_rows(changed, 640, 481)
    assert span is not None
    assert not gap[: span[0]].any() and not gap[span[1] :].any()
    assert not np.array_equal(
        np.asarray(made)[span[0] : span[1]],
        np.asarray(page.resize(size, bilinear))[span[0] : span[1]],
    )
