"""Image-level agreement beside the radiomics: HU errors, noise SD and the noise power spectrum.

All functions are pure: arrays in HU (float) and boolean masks in, numbers or arrays out.

NPS (ICRU Report 87 / IEC 62220-1 convention, applied to patches of a uniform region):

    NPS(fx, fy) = dx dy / (Nx Ny) * < |DFT(patch - mean(patch))|^2 >

in HU^2 mm^2, averaged over patches; its integral over the 2-D frequency plane equals the pixel
variance (Parseval), so the reported integral is a noise variance in HU^2. The radial curve
averages NPS(fx, fy) over rings of equal |f| in lp/mm, on fixed bins shared by all images so
curves from different pixel spacings can be pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

Detrend = Literal["mean", "quadratic"]
"""What is removed from each NPS patch before its DFT: its mean, or a least-squares 2-D
second-order polynomial (ICRU 87 / AAPM TG-233 practice: slow shading, e.g. between heart
chambers of slightly different HU, would otherwise pile up in the lowest frequency bins)."""

NPS_BIN_WIDTH_LP_PER_MM = 0.04
NPS_MAX_LP_PER_MM = 1.04


def nps_bin_edges() -> FloatArray:
    """The fixed radial-frequency bins of every NPS curve, lp/mm."""
    return np.arange(0.0, NPS_MAX_LP_PER_MM + 1e-9, NPS_BIN_WIDTH_LP_PER_MM)


@dataclass(frozen=True)
class ErrorMetrics:
    """HU error of a candidate against the true target image over `n_pixels` pixels."""

    mae_hu: float
    rmse_hu: float
    n_pixels: int


def hu_errors(
    candidate: npt.NDArray[np.floating], truth: npt.NDArray[np.floating], mask: BoolArray
) -> ErrorMetrics:
    """MAE and RMSE of candidate - truth inside `mask` (any shape, all three equal)."""
    if candidate.shape != truth.shape or mask.shape != truth.shape:
        raise ValueError(f"shapes differ: {candidate.shape}, {truth.shape}, mask {mask.shape}")
    diff = (np.asarray(candidate, np.float64) - np.asarray(truth, np.float64))[mask]
    if diff.size == 0:
        raise ValueError("the mask selects no pixel")
    return ErrorMetrics(
        float(np.mean(np.abs(diff))), float(np.sqrt(np.mean(diff**2))), int(diff.size)
    )


def noise_sd_per_slice(
    volume: npt.NDArray[np.floating], uniform: BoolArray, min_pixels: int = 100
) -> list[float]:
    """SD (divisor n - 1) of each slice inside its uniform-region mask; slices whose mask has
    fewer than `min_pixels` pixels are skipped."""
    out = []
    for image, mask in zip(volume, uniform, strict=True):
        if int(mask.sum()) >= min_pixels:
            out.append(float(np.std(np.asarray(image, np.float64)[mask], ddof=1)))
    return out


def uniform_patches(mask: BoolArray, patch_px: int) -> list[tuple[int, int]]:
    """Top-left corners of square patches lying wholly inside `mask` (2-D), on a grid with a
    step of half a patch (50 % overlap), in row-major order."""
    step = max(1, patch_px // 2)
    rows, cols = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    corners = []
    for r in range(0, rows - patch_px + 1, step):
        for c in range(0, cols - patch_px + 1, step):
            total = (
                integral[r + patch_px, c + patch_px]
                - integral[r, c + patch_px]
                - integral[r + patch_px, c]
                + integral[r, c]
            )
            if total == patch_px * patch_px:
                corners.append((r, c))
    return corners


@dataclass(frozen=True)
class NpsAccumulator:
    """Sum of per-patch radial NPS curves and 2-D integrals, to pool subjects and slices."""

    curve_sum: FloatArray
    """Sum over patches of the ring-averaged NPS per fixed bin (HU^2 mm^2); NaN-free."""
    bin_weight: FloatArray
    """Patches that had Fourier samples in each bin."""
    integral_sum: float
    n_patches: int

    @staticmethod
    def empty() -> NpsAccumulator:
        n = len(nps_bin_edges()) - 1
        return NpsAccumulator(np.zeros(n), np.zeros(n), 0.0, 0)

    def __add__(self, other: NpsAccumulator) -> NpsAccumulator:
        return NpsAccumulator(
            self.curve_sum + other.curve_sum,
            self.bin_weight + other.bin_weight,
            self.integral_sum + other.integral_sum,
            self.n_patches + other.n_patches,
        )

    def result(self) -> NpsResult:
        edges = nps_bin_edges()
        with np.errstate(invalid="ignore", divide="ignore"):
            # Only bins every patch reaches: pooled pixel spacings differ in their corner
            # frequency, and a bin fed by some patches only would mix different noise levels.
            curve = np.where(
                (self.bin_weight > 0) & (self.bin_weight >= self.n_patches),
                self.curve_sum / self.bin_weight,
                np.nan,
            )
        centres = 0.5 * (edges[:-1] + edges[1:])
        usable = np.isfinite(curve) & (centres > 0)
        if not usable.any() or self.n_patches == 0:
            return NpsResult(centres, curve, float("nan"), float("nan"), self.n_patches)
        peak = float(centres[usable][int(np.argmax(curve[usable]))])
        return NpsResult(centres, curve, peak, self.integral_sum / self.n_patches, self.n_patches)


@dataclass(frozen=True)
class NpsResult:
    """Radial NPS curve (lp/mm, HU^2 mm^2), its peak frequency (lp/mm, DC excluded) and
    integral (HU^2: the mean over patches of the 2-D NPS integral = noise variance)."""

    frequency_lp_per_mm: FloatArray
    nps: FloatArray
    peak_lp_per_mm: float
    integral_hu2: float
    n_patches: int


def detrend_patch(patch: npt.NDArray[np.floating], detrend: Detrend) -> FloatArray:
    """`patch` minus its mean, or minus its least-squares fit by a + bx + cy + dx² + exy + fy²."""
    values = np.asarray(patch, dtype=np.float64)
    if detrend == "mean":
        centred: FloatArray = values - values.mean()
        return centred
    y, x = np.mgrid[0 : values.shape[0], 0 : values.shape[1]].astype(np.float64)
    y, x = y - y.mean(), x - x.mean()
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6)
    coefficients, *_ = np.linalg.lstsq(design, values.ravel(), rcond=None)
    residual: FloatArray = values - (design @ coefficients).reshape(values.shape)
    return residual


def nps_of_patches(
    image: npt.NDArray[np.floating],
    corners: Sequence[tuple[int, int]],
    patch_px: int,
    pixel_spacing_mm: tuple[float, float],
    detrend: Detrend = "quadratic",
) -> NpsAccumulator:
    """Accumulate the NPS of square patches of one 2-D image, each detrended (`Detrend`)."""
    acc = NpsAccumulator.empty()
    if not corners:
        return acc
    dy, dx = pixel_spacing_mm
    fy = np.fft.fftfreq(patch_px, d=dy)
    fx = np.fft.fftfreq(patch_px, d=dx)
    radius = np.hypot(fy[:, None], fx[None, :]).ravel()
    edges = nps_bin_edges()
    which = np.digitize(radius, edges) - 1
    inside = (which >= 0) & (which < len(edges) - 1) & (radius > 0)  # DC is 0 after detrend
    ring_count = np.bincount(which[inside], minlength=len(edges) - 1).astype(np.float64)
    df = 1.0 / (patch_px * dy) * 1.0 / (patch_px * dx)
    curve_sum = np.zeros(len(edges) - 1)
    integral = 0.0
    for r, c in corners:
        patch = np.asarray(image[r : r + patch_px, c : c + patch_px], dtype=np.float64)
        spectrum = np.abs(np.fft.fft2(detrend_patch(patch, detrend))) ** 2 * (dx * dy) / patch.size
        flat = spectrum.ravel()
        ring_sum = np.bincount(which[inside], weights=flat[inside], minlength=len(edges) - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            curve_sum += np.where(ring_count > 0, ring_sum / ring_count, 0.0)
        integral += float(flat.sum() * df)
    weight = (ring_count > 0).astype(np.float64) * len(corners)
    return NpsAccumulator(curve_sum, weight, integral, len(corners))
