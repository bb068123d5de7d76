"""The noise level of a CT series, measured from its pixels alone (no ROI, no truth).

Used twice, with the same function, so that what the engine sees at inference is what it was
trained on: the LTDiff++ denoiser is conditioned on it, and a weights file's validated envelope
records its range (`engine/envelope.py`).

Method: the local standard deviation in windows of `WINDOW_MM` (about 4 mm, the same physical
size at every pixel spacing), kept only where the whole window is soft tissue (every pixel in
[-300, 400] HU and the local mean in [-50, 120] HU), then the median over those pixels and the
median over up to `MAX_SLICES` slices spread through the series. Soft tissue is flat at this
scale except at organ boundaries, which the median ignores; the figure is therefore close to the
noise SD in a uniform region (on the simulated kernel pairs it reads 1.04-1.16 x the SD in the
heart blood pool, docs/METHOD.md) and costs a few milliseconds per slice.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

WINDOW_MM: Final = 4.0
MAX_SLICES: Final = 16
MIN_PIXELS_PER_SLICE: Final = 500
"""Soft-tissue pixels a slice needs to count (or 5 % of a smaller slice)."""
SOFT_TISSUE_HU: Final = (-300.0, 400.0)
"""Every pixel of a window must lie in this range (no air, lung or bone in the window)."""
LOCAL_MEAN_HU: Final = (-50.0, 120.0)
"""The window's mean must lie in this range (muscle, blood, organs; not fat boundaries)."""


def _box_mean(image: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    """Mean over width x width windows centred on each pixel (edges replicated)."""
    r = width // 2
    padded = np.pad(image, ((r + 1, r), (r + 1, r)), mode="edge")
    c = padded.cumsum(axis=0).cumsum(axis=1)
    total = c[width:, width:] - c[:-width, width:] - c[width:, :-width] + c[:-width, :-width]
    result: npt.NDArray[np.float64] = total / float(width * width)
    return result


def window_pixels(pixel_spacing_mm: float) -> int:
    """Odd window width in pixels for `WINDOW_MM` at this spacing (at least 3)."""
    return max(3, round(WINDOW_MM / pixel_spacing_mm) | 1)


def slice_noise_hu(image_hu: npt.NDArray[np.floating], pixel_spacing_mm: float) -> float | None:
    """The noise level of one slice (HU), or None where it holds too little soft tissue."""
    width = window_pixels(pixel_spacing_mm)
    image = np.asarray(image_hu, dtype=np.float64)
    mean = _box_mean(image, width)
    square = _box_mean(image * image, width)
    local_sd = np.sqrt(np.maximum(square - mean * mean, 0.0))
    lo, hi = SOFT_TISSUE_HU
    in_range = ((image > lo) & (image < hi)).astype(np.float64)
    whole_window = _box_mean(in_range, width) > 1.0 - 0.5 / (width * width)
    mask = whole_window & (mean > LOCAL_MEAN_HU[0]) & (mean < LOCAL_MEAN_HU[1])
    if int(mask.sum()) < min(MIN_PIXELS_PER_SLICE, 0.05 * image.size):
        return None
    return float(np.median(local_sd[mask]))


def measure_noise_hu(
    volume_hu: npt.NDArray[np.floating], pixel_spacing_mm: float, *, max_slices: int = MAX_SLICES
) -> float | None:
    """The noise level of a series [slices, rows, cols] in HU (module docstring), or None when
    no slice holds enough soft tissue to measure it (a phantom of air, a lung-only crop)."""
    volume = np.asarray(volume_hu)
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise ValueError(f"expected a volume [slices, rows, cols], got shape {volume.shape}")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel spacing must be positive, got {pixel_spacing_mm}")
    count = min(volume.shape[0], max(1, max_slices))
    picks = np.unique(np.linspace(0, volume.shape[0] - 1, count).round().astype(int))
    levels = [slice_noise_hu(volume[i], pixel_spacing_mm) for i in picks]
    measured = [v for v in levels if v is not None]
    if not measured:
        return None
    return float(np.median(measured))
