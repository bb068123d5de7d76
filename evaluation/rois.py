"""Regions of interest for the feature-agreement evaluation, from the reference only.

Every ROI mask is derived from ground truth (truth.npz `nodule_ids`, `hu_ideal`) or, where no
truth exists, from the true target-kernel image: never from a candidate. The functions here take
no candidate argument at all, so every row of the evaluation (baseline, engines, repeat scan) is
measured on the very same pixels.

Two families:

* Lesion ROIs: one per nodule per slice where the nodule's truth mask has at least
  `min_pixels` pixels; the mask is the nodule itself (no ring of context: the features describe
  the lesion, as a radiologist's segmentation would).
* HU-range ROIs (the paper's four ranges): square windows placed at random, with a fixed seed,
  inside the body; the mask is the pixels of the window whose reference value lies in the range.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813  (the library's own documented alias)

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

HU_RANGES: tuple[tuple[float, float], ...] = ((-800, -300), (-100, 250), (10, 250), (300, 800))
"""The paper's four HU ranges, inclusive: lung/ground glass, soft tissue with fat edge, soft
tissue, bone."""

LESION_GROUP = "lesion"
BODY_THRESHOLD_HU = -500.0
MASK_SMOOTHING_SIGMA_PX = 1.0
"""Gaussian SD applied to the true target-kernel image before thresholding when there is no
ground truth: the sharp kernel's noise (SD ~40 HU) would otherwise make range masks speckled."""


def group_name(hu_range: tuple[float, float]) -> str:
    """ROI group label of an HU range, e.g. "HU [-800, -300]"."""
    return f"HU [{hu_range[0]:g}, {hu_range[1]:g}]"


@dataclass(frozen=True, eq=False)
class Roi:
    """One 2-D ROI: a boolean mask inside a box of one slice.

    subject: subject label (folder name); slice_index: index in the paired-slice order (z
    ascending); z_mm: the slice position; row0, col0: top-left pixel of the box; mask: bool
    [h, w] (the box is mask.shape); group: LESION_GROUP or `group_name(range)`; origin: "nodule
    <id>" or "random".
    """

    subject: str
    group: str
    slice_index: int
    z_mm: float
    row0: int
    col0: int
    mask: BoolArray
    origin: str

    @property
    def n_pixels(self) -> int:
        return int(self.mask.sum())

    def crop(self, image: npt.NDArray[np.floating], pad: int = 0) -> npt.NDArray[np.floating]:
        """The ROI's box cut from a 2-D slice image, grown by `pad` pixels on every side (image
        content where there is some, the nearest edge value beyond the image border)."""
        h, w = self.mask.shape
        rows, cols = image.shape
        r0, c0 = self.row0 - pad, self.col0 - pad
        r1, c1 = self.row0 + h + pad, self.col0 + w + pad
        inner = image[max(r0, 0) : min(r1, rows), max(c0, 0) : min(c1, cols)]
        widths = ((max(-r0, 0), max(r1 - rows, 0)), (max(-c0, 0), max(c1 - cols, 0)))
        return np.pad(inner, widths, mode="edge") if any(sum(x) for x in widths) else inner

    def padded_mask(self, pad: int = 0) -> BoolArray:
        """The mask on the box grown by `pad` pixels (False in the margin)."""
        return np.pad(self.mask, pad) if pad else self.mask

    def key(self) -> tuple[object, ...]:
        """Identity of the ROI for comparisons: position, size and the mask's bytes."""
        return (
            self.subject,
            self.group,
            self.slice_index,
            self.row0,
            self.col0,
            self.mask.shape,
            self.mask.tobytes(),
            self.origin,
        )


def mask_reference(target_hu: FloatArray, hu_ideal: npt.NDArray[np.integer] | None) -> FloatArray:
    """The image range masks and the body are thresholded on, [slices, rows, cols] float32.

    Ground-truth `hu_ideal` (noise- and blur-free) when present, else the true target-kernel
    image smoothed in-plane by a Gaussian of MASK_SMOOTHING_SIGMA_PX.
    """
    if hu_ideal is not None:
        if hu_ideal.shape != target_hu.shape:
            raise ValueError(f"hu_ideal shape {hu_ideal.shape} != image shape {target_hu.shape}")
        return hu_ideal.astype(np.float32)
    return gaussian_smooth_2d(target_hu, MASK_SMOOTHING_SIGMA_PX)


def gaussian_smooth_2d(volume: npt.NDArray[np.floating], sigma_px: float) -> FloatArray:
    """In-plane Gaussian smoothing of [slices, rows, cols] (separable, kernel cut at 4 SD,
    mirror-padded borders)."""
    radius = max(1, int(np.ceil(4.0 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    out = np.asarray(volume, dtype=np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(
            taps[k] * np.take(padded, np.arange(k, k + n), axis=axis) for k in range(taps.size)
        )
    smoothed: FloatArray = np.asarray(out, dtype=np.float32)
    return smoothed


def window_counts(mask: BoolArray, window_px: int) -> npt.NDArray[np.int64]:
    """counts[r, c] = number of True pixels of `mask` in the window whose top-left corner is
    (r - window_px // 2, c - window_px // 2); 0 where that window leaves the image."""
    rows, cols = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (
        integral[window_px:, window_px:]
        - integral[:-window_px, window_px:]
        - integral[window_px:, :-window_px]
        + integral[:-window_px, :-window_px]
    )
    counts = np.zeros((rows, cols), dtype=np.int64)
    half = window_px // 2
    counts[half : half + sums.shape[0], half : half + sums.shape[1]] = sums
    return counts


def body_mask(reference_slice: npt.NDArray[np.floating]) -> BoolArray:
    """The patient's body in one slice: the largest connected region above -500 HU, holes
    (lungs, airways) filled. The table is a separate region and is left out."""
    above = np.asarray(reference_slice) > BODY_THRESHOLD_HU
    if not above.any():
        return np.zeros(above.shape, dtype=bool)
    tools: Any = sitk  # SimpleITK's partial annotations leave its calls untyped
    image = tools.GetImageFromArray(above.astype(np.uint8))
    # Components relabelled by size, largest first (label 1); 4-connectivity in 2-D.
    largest = tools.RelabelComponent(tools.ConnectedComponent(image, False)) == 1
    filled = tools.BinaryFillhole(largest, False, 1)
    body: BoolArray = tools.GetArrayFromImage(filled).astype(bool)
    return body


def lesion_rois(
    nodule_ids: npt.NDArray[np.integer],
    subject: str,
    z_mm: Sequence[float],
    *,
    min_pixels: int = 30,
    margin_px: int = 1,
) -> list[Roi]:
    """One ROI per nodule per slice with >= `min_pixels` mask pixels, in (slice, id) order.

    nodule_ids: [slices, rows, cols], 0 = background, k = nodule k (truth.npz), already in the
    paired-slice order. The box is the mask's bounding box grown by `margin_px`.
    """
    rois: list[Roi] = []
    rows, cols = nodule_ids.shape[1:]
    for index in range(nodule_ids.shape[0]):
        ids = nodule_ids[index]
        for nodule in (int(k) for k in np.unique(ids) if k != 0):
            mask = ids == nodule
            if int(mask.sum()) < min_pixels:
                continue
            rr, cc = np.nonzero(mask)
            r0, c0 = max(int(rr.min()) - margin_px, 0), max(int(cc.min()) - margin_px, 0)
            r1, c1 = (
                min(int(rr.max()) + margin_px + 1, rows),
                min(int(cc.max()) + margin_px + 1, cols),
            )
            rois.append(
                Roi(
                    subject,
                    LESION_GROUP,
                    index,
                    float(z_mm[index]),
                    r0,
                    c0,
                    mask[r0:r1, c0:c1].copy(),
                    f"nodule {nodule}",
                )
            )
    return rois


def roi_seed(seed: int, subject: str, group: str) -> np.random.Generator:
    """A generator for one subject and ROI group: fixed by the run seed and the labels (CRC-32,
    stable across processes and Python versions, unlike hash())."""
    return np.random.default_rng([seed, zlib.crc32(f"{subject}|{group}".encode())])


def hu_range_rois(
    reference: FloatArray,
    subject: str,
    z_mm: Sequence[float],
    *,
    hu_ranges: Sequence[tuple[float, float]] = HU_RANGES,
    n_per_range: int = 40,
    window_px: int = 48,
    min_pixels: int = 64,
    seed: int = 0,
) -> list[Roi]:
    """Random square windows per HU range, placed reproducibly inside the body.

    reference: `mask_reference` output [slices, rows, cols]. For each range, `n_per_range`
    windows: a slice drawn uniformly, then a window centre drawn uniformly among the body pixels
    whose whole window lies in the image and holds >= `min_pixels` in-range body pixels (slices
    without such a centre are not drawn). Mask = in-range body pixels of the window. Windows may
    overlap; the same draw is never repeated.
    """
    rois: list[Roi] = []
    n_slices, _rows, cols = reference.shape
    half = window_px // 2
    bodies = [body_mask(reference[i]) for i in range(n_slices)]
    for hu_range in hu_ranges:
        group = group_name(hu_range)
        lo, hi = hu_range
        candidates: list[npt.NDArray[np.intp]] = []
        in_range_slices: list[BoolArray] = []
        for i in range(n_slices):
            in_range = bodies[i] & (reference[i] >= lo) & (reference[i] <= hi)
            valid = bodies[i] & (window_counts(in_range, window_px) >= min_pixels)
            candidates.append(np.flatnonzero(valid))
            in_range_slices.append(in_range)
        usable = [i for i in range(n_slices) if candidates[i].size]
        if not usable:
            continue
        rng = roi_seed(seed, subject, group)
        taken: set[tuple[int, int]] = set()
        placed = 0
        for _attempt in range(50 * n_per_range):
            if placed == n_per_range:
                break
            index = int(usable[int(rng.integers(len(usable)))])
            flat = int(candidates[index][int(rng.integers(candidates[index].size))])
            if (index, flat) in taken:
                continue
            taken.add((index, flat))
            r0, c0 = flat // cols - half, flat % cols - half
            mask = in_range_slices[index][r0 : r0 + window_px, c0 : c0 + window_px].copy()
            rois.append(Roi(subject, group, index, float(z_mm[index]), r0, c0, mask, "random"))
            placed += 1
    return rois
