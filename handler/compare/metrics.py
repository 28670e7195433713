"""The CPU metrics comparator: no model, milliseconds per pair, the embedded default.

Similarity is the *minimum* of four scores, each near 1 for "the same picture" (re-encoded,
rescaled, another format, EXIF-rotated) and each sensitive to one kind of real change:

- ``ssim``: mean structural similarity (greyscale) — global structure;
- ``local_similarity``: 1 - LOCAL_WEIGHT * changed_fraction — a pasted object or blurred patch
  over a few percent of the image barely moves the mean SSIM, so the changed area counts on its own;
- ``hash_similarity``: 1 - perceptual-hash distance / 64 — mirrored or rearranged content;
- ``color_similarity``: colour-histogram intersection — recolouring keeps greyscale structure.

Taking the minimum keeps the number explainable: the weakest aspect decides.

``changed_regions`` come from the native-resolution detection (``handler.detect``), which sees
what the working size cannot (one changed word on a long page). A confident region makes the
pair different whatever the scores, and adds a fifth score so the number agrees:
``detection_similarity`` = DETECTION_CEILING - DETECTION_WEIGHT x changed fraction (native),
1.0 without regions. A pair with no differing pixel at native resolution scores exactly 1.

The global scores compare A with B laid out as A (``_aligned``: along the detection's
alignment; under a lenient match level, A with only the regions that count pasted from B).
The work scales with what there is to see: where the detection found nothing that counts and
nothing moved, and those two images are pixel-identical (the same picture, however it was
encoded), they have the scores of identical images — SSIM 1, no changed fraction, hash
distance 0, colour overlap 1, ΔE 0 — which are set, not computed; byte-identical inputs are
never decoded at all (``identical``). Only a pair whose images differ pays for SSIM, Lab
colours, hashes and histograms.

scikit-image, imagehash and scipy are imported by the first pair that needs them, not with this
module: they cost ~25 MB and ~0.3 s, and the detection stage that runs before (a large pair's
memory peak) does without them. A long-running process (``wait_ready``) imports them on a
thread of their own meanwhile, so that no pair waits for them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from handler import describe
from handler.compare.base import Verdict
from handler.config import ComparisonConfig
from handler.crops import RegionCrop
from handler.deadline import Deadline
from handler.detect import Detection
from handler.images import PreparedImage
from handler.result import AlignmentInfo, Box, ComparatorInfo, Difference
from handler.splice import differing_rows, resized_like

#: Longest edge of the common working size. Large enough that an edit over ~1% of the image
#: spans many SSIM windows, small enough to stay in the low milliseconds.
WORK_EDGE = 256
#: Shortest edge of the working size: the Gaussian SSIM window (sigma 1.5) is 11 pixels wide,
#: so a banner or a one-pixel line is stretched to at least that instead of failing.
MIN_WORK_EDGE = 16
#: A pixel is "changed" where local SSIM falls below this or the colour moves more than
#: CHANGED_DELTA_E (CIE76) — values that JPEG quality 70 and rescaling stay clear of.
CHANGED_SSIM = 0.5
#: The Gaussian SSIM window's sigma (Wang et al.'s).
SSIM_SIGMA = 1.5
CHANGED_DELTA_E = 20.0
#: changed_fraction 0.02 (2 % of the image) -> local_similarity 0.84.
LOCAL_WEIGHT = 8.0
#: A confident changed region caps similarity below the default threshold (0.93) ...
DETECTION_CEILING = 0.9
#: ... and each percent of A's pixels changed lowers it by 0.04 more.
DETECTION_WEIGHT = 4.0
_COLOR_BINS = 8


class MetricsComparator:
    """Structural, perceptual-hash and colour metrics on a common working size."""

    #: Crops are not looked at: the pipeline cuts none for this comparator unless a diff
    #: image wants them.
    wants_crops = False

    def __init__(self) -> None:
        self._info = ComparatorInfo(name="metrics", model=None, device="cpu")

    @property
    def info(self) -> ComparatorInfo:
        return self._info

    def close(self) -> None:
        """Nothing to free: no model, no worker."""

    def wait_ready(self) -> None:
        """Ready at once; the libraries the first differing pair needs are imported on a
        thread of their own meanwhile (a long-running process holds them after its first
        pair anyway), so no pair pays for the imports."""
        _import_in_background()

    def compare(
        self,
        a: PreparedImage,
        b: PreparedImage,
        config: ComparisonConfig,
        *,
        detection: Detection | None = None,
        crops: Sequence[RegionCrop] = (),
        deadline: Deadline | None = None,
    ) -> Verdict:
        check = deadline.check if deadline is not None else _no_deadline
        shown_a, shown_b = _aligned(a, b, detection)
        # Where the detection found nothing that counts and nothing moved, the images the
        # scores compare are usually the same pixels (one picture, encoded twice): their scores
        # are those of identical images, set, not computed. Elsewhere they almost never are,
        # and where they are, the scores computed are these anyway: not looked for.
        same = _quiet(detection) and _same_pixels(shown_a, shown_b)
        metrics = IDENTICAL_SCORES if same else _scores(shown_a, shown_b, check)
        return _verdict({**metrics, "pixel_identical": float(same)}, config, detection)

    def identical(self, config: ComparisonConfig, detection: Detection) -> Verdict:
        """The verdict for byte-identical inputs, which are not decoded: ``compare``'s for two
        identical images (``detection`` says so, sized from their header)."""
        return _verdict({**IDENTICAL_SCORES, "pixel_identical": 1.0}, config, detection)


#: The scores of two identical working images (what ``_scores`` computes for them).
IDENTICAL_SCORES: dict[str, float] = {
    "ssim": 1.0,
    "changed_fraction": 0.0,
    "local_similarity": 1.0,
    "phash_distance": 0.0,
    "hash_similarity": 1.0,
    "color_similarity": 1.0,
    "mean_delta_e": 0.0,
}


_IMPORTING = threading.Lock()
#: What ``_scores`` imports, in its order.
_LIBRARIES = ("imagehash", "skimage.color", "skimage.metrics", "scipy.ndimage")


def _import_libraries() -> None:
    """One thread at a time: two threads importing these packages in another order could
    deadlock on Python's per-module import locks."""
    with _IMPORTING:
        for module in _LIBRARIES:
            importlib.import_module(module)


@cache
def _import_in_background() -> None:
    threading.Thread(target=_import_libraries, name="metrics-imports", daemon=True).start()


def _scores(a: Image.Image, b: Image.Image, check: Callable[[], None]) -> dict[str, float]:
    """SSIM, changed fraction, perceptual hash and colour scores on the common working size.
    Each takes milliseconds there: ``check`` (the pair's deadline) is asked between them."""
    _import_libraries()
    import imagehash
    from skimage.color import rgb2lab
    from skimage.metrics import structural_similarity

    work_a, work_b = _common_size(a, b)
    grey_a, grey_b = (np.asarray(i.convert("L"), dtype=np.float64) for i in (work_a, work_b))
    rgb_a, rgb_b = np.asarray(work_a), np.asarray(work_b)
    check()
    ssim, ssim_map = _ssim(grey_a, grey_b, structural_similarity)
    check()
    lab_a = rgb2lab(rgb_a)
    delta_e = np.linalg.norm(lab_a - _lab_like(rgb_a, lab_a, rgb_b, rgb2lab), axis=2)
    check()
    changed_fraction = float(_changed_mask(ssim_map, delta_e).mean())
    check()
    hash_distance = int(imagehash.phash(work_a) - imagehash.phash(work_b))
    color = _histogram_intersection(rgb_a, rgb_b)
    check()
    return {
        "ssim": round(float(np.clip(ssim, 0.0, 1.0)), 4),
        "changed_fraction": round(changed_fraction, 4),
        "local_similarity": round(max(0.0, 1.0 - LOCAL_WEIGHT * changed_fraction), 4),
        "phash_distance": float(hash_distance),
        "hash_similarity": round(1.0 - hash_distance / 64.0, 4),
        "color_similarity": round(color, 4),
        "mean_delta_e": round(float(delta_e.mean()), 3),
    }


#: The Gaussian SSIM window's radius (sigma 1.5, truncated at 3.5 sigma, as scipy rounds it).
_SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)


def _ssim(
    grey_a: NDArray[np.float64],
    grey_b: NDArray[np.float64],
    structural_similarity: Callable[..., tuple[float, NDArray[np.float64]]],
) -> tuple[float, NDArray[np.float64]]:
    """Mean SSIM and the SSIM map (Gaussian window), computed where the rows differ only.

    Where every pixel under a window is the same in both images, the map is exactly 1 (its
    numerator and denominator are the same products, rounded alike), so only the rows within
    a window of a differing row are computed, from those rows with a window's worth of real
    rows around them, and the mean is taken over the whole map as scikit-image takes it."""

    def whole(a: NDArray[np.float64], b: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        return structural_similarity(
            a, b, data_range=255.0, gaussian_weights=True, sigma=SSIM_SIGMA, full=True
        )

    changed = differing_rows(grey_a, grey_b)
    height, reach = len(grey_a), _SSIM_RADIUS
    if changed is None or 2 * (changed[1] - changed[0] + 2 * reach) > height:
        return whole(grey_a, grey_b)
    top, bottom = max(0, changed[0] - reach), min(height, changed[1] + reach)
    first, last = max(0, top - reach), min(height, bottom + reach)
    if last - first < 2 * reach + 1:  # (shorter than the window: scikit-image refuses it)
        return whole(grey_a, grey_b)
    _, part = whole(grey_a[first:last], grey_b[first:last])
    ssim_map = np.ones_like(grey_a)
    ssim_map[top:bottom] = part[top - first : bottom - first]
    pad = reach  # (scikit-image leaves out a window's radius at every edge)
    return float(ssim_map[pad:-pad, pad:-pad].mean(dtype=np.float64)), ssim_map


def _lab_like(
    rgb_a: NDArray[np.uint8],
    lab_a: NDArray[np.float64],
    rgb_b: NDArray[np.uint8],
    rgb2lab: Callable[[NDArray[np.uint8]], NDArray[np.float64]],
) -> NDArray[np.float64]:
    """B's Lab colours: A's (``lab_a``) where the rows are A's, converted only where they
    differ (the conversion is per pixel: the same values as converting all of B)."""
    changed = differing_rows(rgb_a, rgb_b)
    if changed is None:
        return lab_a
    first, last = changed
    if 2 * (last - first) > len(rgb_b):
        return rgb2lab(rgb_b)
    lab_b = lab_a.copy()
    lab_b[first:last] = rgb2lab(rgb_b[first:last])
    return lab_b


def _verdict(
    metrics: dict[str, float], config: ComparisonConfig, detection: Detection | None
) -> Verdict:
    """The verdict from the scores (and the detection, which adds its own and the regions)."""
    regions = list(detection.regions) if detection else []
    if detection is not None:
        metrics.update(detection.metrics())
        metrics["detection_similarity"] = _detection_similarity(detection)
    similarity = min(
        metrics["ssim"],
        metrics["local_similarity"],
        metrics["hash_similarity"],
        metrics["color_similarity"],
        metrics.get("detection_similarity", 1.0),
    )
    if detection is not None and detection.identical:
        similarity = 1.0
    differs = detection.differs if detection is not None else False
    is_similar = similarity >= config.similarity_threshold and not differs
    return Verdict(
        similarity=similarity,
        is_similar=is_similar,
        summary=_summary(similarity, is_similar, detection),
        differences=_differences(metrics, detection),
        changed_regions=regions,
        metrics=metrics,
    )


def _quiet(detection: Detection | None) -> bool:
    """Nothing at native resolution that counts under the pair's levels, nothing moved, and no
    alignment: the scores' images are A and B as prepared (or A twice, under a lenient level)."""
    if detection is None:
        return True
    return not detection.differs and not detection.moved_pixels and detection.alignment is None


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a is b or (a.size == b.size and a.tobytes() == b.tobytes())


def _no_deadline() -> None:
    """``compare`` without a deadline (a direct call): nothing to check."""


def _detection_similarity(detection: Detection) -> float:
    """Below DETECTION_CEILING when the detection makes the pair different (under its match
    levels), the lower the more of it changed; 1.0 otherwise."""
    if not detection.differs:
        return 1.0
    fraction = detection.changed_percent / 100.0
    return round(max(0.0, DETECTION_CEILING - DETECTION_WEIGHT * fraction), 4)


def _aligned(
    a: PreparedImage, b: PreparedImage, detection: Detection | None
) -> tuple[Image.Image, Image.Image]:
    """The prepared images, B laid out as A when the detection aligned them (bands inserted or
    removed, a global offset): each of A's rows and columns shows what the alignment put
    there from B, or A's own pixels where B has nothing (a removed band, an edge strip). So
    the global scores measure the content, not where it moved; what moved, was added or
    removed is the detection's to count."""
    if detection is None:
        return a.image, b.image
    if detection.lenient:
        return a.image, _counted_only(a, b, detection)
    if detection.alignment is None:
        return a.image, b.image
    pixels_a, pixels_b = np.asarray(a.image), np.asarray(b.image)
    rows = _mapped(detection.alignment, a, b, axis=1)
    columns = _mapped(detection.alignment, a, b, axis=0)
    laid = pixels_b[np.clip(rows, 0, None)[:, None], np.clip(columns, 0, None)[None, :]]
    missing = (rows < 0)[:, None] | (columns < 0)[None, :]
    laid = np.where(missing[..., None], pixels_a, laid)
    if pixels_a.shape == pixels_b.shape:
        # As in the detection: what stayed in place while the rest moved has not changed.
        gap = np.abs(laid.astype(np.int16) - pixels_a).sum(axis=2)
        gap_in_place = np.abs(pixels_b.astype(np.int16) - pixels_a).sum(axis=2)
        laid = np.where((gap_in_place < gap)[..., None], pixels_b, laid)
    return a.image, Image.fromarray(np.ascontiguousarray(laid), "RGB")


def _counted_only(a: PreparedImage, b: PreparedImage, detection: Detection) -> Image.Image:
    """Under a level that ignores some differences (moves, colours, boxes), B as the global
    scores should see it: A, except where a region counts (there, B's own pixels, at the
    region's place in B, pasted at its place in A). What the level ignores, they ignore."""
    laid = a.image.copy()
    for region, counted in zip(detection.regions, detection.counted, strict=True):
        if not counted:
            continue
        source = region.b or region
        target = region.a or region
        piece = b.image.crop(_scaled(source, b)).resize(_size(_scaled(target, a)))
        laid.paste(piece, _scaled(target, a)[:2])
    return laid


def _scaled(box: Box, image: PreparedImage) -> tuple[int, int, int, int]:
    fx = image.size[0] / image.original_size[0]
    fy = image.size[1] / image.original_size[1]
    left, top = int(box.x * fx), int(box.y * fy)
    right = max(left + 1, min(image.size[0], int(np.ceil((box.x + box.width) * fx))))
    bottom = max(top + 1, min(image.size[1], int(np.ceil((box.y + box.height) * fy))))
    return (left, top, right, bottom)


def _size(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return (box[2] - box[0], box[3] - box[1])


def _mapped(
    alignment: AlignmentInfo, a: PreparedImage, b: PreparedImage, axis: int
) -> NDArray[np.int64]:
    """For each prepared pixel row (``axis`` 1) or column (0) of A, B's prepared row or column
    that the alignment puts there, -1 where there is none."""
    native_a, native_b = a.original_size[axis], b.original_size[axis]
    shown_a, shown_b = a.size[axis], b.size[axis]
    native = ((np.arange(shown_a) + 0.5) * native_a / shown_a).astype(np.int64)
    if axis == 0:
        target = native + alignment.offset[0]
    else:
        target = np.full(shown_a, -1, np.int64)
        for band in alignment.bands:
            if band.kind == "matched" and band.a is not None:
                inside = (native >= band.a[0]) & (native < band.a[1])
                target[inside] = native[inside] + band.shift
    found = (target >= 0) & (target < native_b)
    out = np.where(found, (target * shown_b) // native_b, -1)
    return np.minimum(out, shown_b - 1)


def _common_size(a: Image.Image, b: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Both images at A's aspect ratio with WORK_EDGE as the longest edge: B's made from A's
    where they differ in a few rows only (``handler.splice``: the same pixels, less work)."""
    width, height = a.size
    factor = WORK_EDGE / max(width, height)
    size = (max(MIN_WORK_EDGE, round(width * factor)), max(MIN_WORK_EDGE, round(height * factor)))
    resample = Image.Resampling.LANCZOS
    work_a = a.resize(size, resample)
    return work_a, resized_like(a, work_a, b, resample)


def _changed_mask(ssim_map: NDArray[np.float64], delta_e: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Changed pixels, opened to drop isolated specks and closed to join one edit's pieces."""
    from scipy import ndimage

    mask = (ssim_map < CHANGED_SSIM) | (ndimage.uniform_filter(delta_e, 5) > CHANGED_DELTA_E)
    mask = ndimage.binary_opening(mask, iterations=1)
    return np.asarray(ndimage.binary_closing(mask, iterations=2), dtype=bool)


def _histogram_intersection(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    """Overlap of the two 8x8x8 RGB histograms: 1 = same colour distribution."""
    hist_a, hist_b = _histogram(a), _histogram(b)
    return float(np.minimum(hist_a / hist_a.sum(), hist_b / hist_b.sum()).sum())


def _histogram(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    """The 8x8x8 RGB histogram: the counts ``np.histogramdd`` gives over (0, 256) in equal
    bins (a value's bin is its top bits), in a tenth of its time."""
    shift = 8 - (_COLOR_BINS.bit_length() - 1)
    bins = (rgb.reshape(-1, 3) >> shift).astype(np.intp)
    index = (bins[:, 0] * _COLOR_BINS + bins[:, 1]) * _COLOR_BINS + bins[:, 2]
    counts = np.bincount(index, minlength=_COLOR_BINS**3)
    return counts.reshape((_COLOR_BINS,) * 3).astype(np.float64)


def _summary(similarity: float, similar: bool, detection: Detection | None) -> str:
    verdict = "similar" if similar else "different"
    head = f"The images are {verdict} (similarity {similarity:.2f})"
    if detection is not None and detection.identical:
        return f"{head}; pixel-identical at native resolution."
    said = describe.clauses(detection) if detection is not None else []
    if not said:
        return f"{head}; no localised changes."
    tail = ""
    if detection is not None and detection.changed_pixels and detection.regions:
        tail = (
            f" ({detection.changed_pixels} pixels, {detection.changed_percent:.3g}% of the image)"
        )
    return f"{head}: {'; '.join(said)}{tail}."


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _differences(metrics: dict[str, float], detection: Detection | None) -> list[Difference]:
    found: list[Difference] = []
    if metrics["hash_similarity"] < 0.75:
        found.append(
            Difference(
                aspect="structure",
                element="whole image",
                description="The overall layout differs (different, mirrored or rearranged).",
            )
        )
    if metrics["color_similarity"] < 0.8:
        found.append(
            Difference(
                aspect="color",
                element="whole image",
                description=f"The colour distributions differ (mean ΔE {metrics['mean_delta_e']}).",
            )
        )
    if detection is not None and detection.alignment is not None:
        moves = describe.alignment_clauses(detection.alignment)
        if moves:
            found.append(
                Difference(
                    aspect="position",
                    element="layout",
                    description=_sentence("; ".join(moves)),
                )
            )
    if detection is not None:
        found.extend(describe.differences(detection))
    return found
