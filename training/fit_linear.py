"""Fit the linear kernel-conversion filter (engine.linear_filter) from paired slices.

One loop: for every paired slice, window both images, take their 2-D FFTs and accumulate the
cross-spectrum S_AB and the auto-spectra S_AA, S_BB in rings of equal radial frequency (lp/mm).
The gain per ring is the Wiener / least-squares transfer function

    G(f) = Re S_AB(f) / (S_AA(f) + rho * N_q(f))

where N_q is the power of the source's storage rounding noise (integer HU: variance 1/12 per
pixel, white), the floor below which the source carries no information at all. With rho = 1 the
term is negligible wherever the source carries signal and halves the gain where only rounding
noise is left, so the gain cannot blow up above the source kernel's cutoff. The per-ring
magnitude-squared coherence |S_AB|^2 / (S_AA S_BB) says how much of the target a linear filter
can explain: near 1 below the source cutoff, falling to 0 above it.

Windows: a Tukey taper at the image border (the FFT is periodic), and by default a smooth body
window that drops the air around the patient (with a margin, so the skin edge is inside the flat
part of the window). Air is left out because the target kernel's air noise is clipped at
-1024 HU by the storage (about 10 % of air pixels for Bl64d), which is not a linear relation.
Values are windowed as HU + 1000 so the air margin tapers to ~0. G(0) is fixed to 1: both
kernels are calibrated to water, and the lowest ring otherwise measures the window's shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from engine.interface import SeriesGeometry
from engine.linear_filter import LinearFilter, LinearFilterEngine, save_linear_filter
from training.pairs import (
    DEFAULT_SOURCE_KERNEL,
    DEFAULT_TARGET_KERNEL,
    PairedSeries,
    find_paired_series,
    read_hu,
    split_by_subject,
)

Region = Literal["body", "full"]
FloatImage = npt.NDArray[np.float64]

QUANTIZATION_VARIANCE_HU2 = 1.0 / 12.0
"""Variance of rounding to integer HU (uniform error on [-0.5, 0.5))."""


@dataclass(frozen=True)
class FitConfig:
    """How the filter is fitted.

    n_bins: radial frequency rings between 0 and the highest corner frequency of the data.
    regularization: rho, multiples of the source rounding-noise power added to S_AA.
    region: "body" windows out the air around the patient; "full" uses the whole image.
    edge_taper_px: width of the Tukey taper at the image border.
    body_threshold_hu / body_margin_px: the body window is source > threshold, grown by the margin
        and smoothed, so its slope lies in air.
    """

    n_bins: int = 100
    regularization: float = 1.0
    region: Region = "body"
    edge_taper_px: int = 32
    body_threshold_hu: float = -500.0
    body_margin_px: int = 16

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        if self.regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        if self.region not in ("body", "full"):
            raise ValueError(f"region must be 'body' or 'full', got {self.region!r}")


@dataclass
class FittedFilter:
    """A fitted filter and the spectra it came from (per ring, f = 0 anchor excluded)."""

    linear_filter: LinearFilter
    cross_power: FloatImage
    source_power: FloatImage
    target_power: FloatImage
    noise_floor_power: FloatImage
    n_slices: int
    subjects: tuple[str, ...]
    config: FitConfig = field(default_factory=FitConfig)

    def gain_at(self, frequency_lp_per_mm: npt.ArrayLike) -> FloatImage:
        return self.linear_filter.gain_at(frequency_lp_per_mm)


def _tukey(n: int, taper: int) -> FloatImage:
    w = np.ones(n)
    taper = min(taper, n // 2)
    if taper > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(taper) + 0.5) / taper)
        w[:taper] = ramp
        w[n - taper :] = ramp[::-1]
    return w


def _gaussian_blur(image: FloatImage, sigma_px: float) -> FloatImage:
    rows, cols = image.shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(image) * kernel, s=image.shape)


def body_window(source_hu: FloatImage, config: FitConfig) -> FloatImage:
    """Smooth 0..1 window: 1 on the body grown by `body_margin_px`, tapering to 0 in the air."""
    body = (source_hu > config.body_threshold_hu).astype(np.float64)
    sigma = config.body_margin_px / 2.0
    grown = _gaussian_blur(body, sigma) > 0.02  # ~2 sigma beyond the body edge
    return np.clip(_gaussian_blur(grown.astype(np.float64), sigma / 2.0), 0.0, 1.0)


@dataclass(frozen=True)
class _RingGrid:
    """Ring index, Hermitian weight and radial frequency of each rfft2 sample, flattened."""

    index: npt.NDArray[np.intp]
    weight: FloatImage
    radius: FloatImage


class SpectralAccumulator:
    """Accumulates ring-averaged cross- and auto-spectra of source/target slice pairs."""

    def __init__(self, f_max_lp_per_mm: float, config: FitConfig) -> None:
        self.config = config
        self.edges = np.linspace(0.0, f_max_lp_per_mm * (1 + 1e-9), config.n_bins + 1)
        n = config.n_bins
        self.sum_f = np.zeros(n)
        self.counts = np.zeros(n, dtype=np.int64)
        self.s_ab_re = np.zeros(n)
        self.s_ab_im = np.zeros(n)
        self.s_aa = np.zeros(n)
        self.s_bb = np.zeros(n)
        self.noise_floor = np.zeros(n)
        self.n_slices = 0
        self._grids: dict[tuple[int, int, float, float], _RingGrid] = {}

    def _grid(self, shape: tuple[int, int], spacing: tuple[float, float]) -> _RingGrid:
        key = (shape[0], shape[1], spacing[0], spacing[1])
        if key not in self._grids:
            fy = np.fft.fftfreq(shape[0], d=spacing[0])
            fx = np.fft.rfftfreq(shape[1], d=spacing[1])
            radius = np.hypot(fy[:, None], fx[None, :])
            index = np.digitize(radius, self.edges) - 1
            if np.any(index >= len(self.edges) - 1):
                raise ValueError(
                    f"pixel spacing {spacing} reaches beyond the fit's frequency range "
                    f"({self.edges[-1]:.3f} lp/mm)"
                )
            # rfft2 stores columns 1..N/2-1 once for two conjugate-symmetric samples.
            weight = np.full(radius.shape, 2.0)
            weight[:, 0] = 1.0
            if shape[1] % 2 == 0:
                weight[:, -1] = 1.0
            self._grids[key] = _RingGrid(index.ravel(), weight.ravel(), radius.ravel())
        return self._grids[key]

    def add_slice(
        self,
        source_hu: npt.ArrayLike,
        target_hu: npt.ArrayLike,
        pixel_spacing_mm: tuple[float, float],
    ) -> None:
        a = np.asarray(source_hu, dtype=np.float64)
        b = np.asarray(target_hu, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"source {a.shape} and target {b.shape} must be equal 2-D images")
        window = np.outer(
            _tukey(a.shape[0], self.config.edge_taper_px),
            _tukey(a.shape[1], self.config.edge_taper_px),
        )
        if self.config.region == "body":
            window *= body_window(a, self.config)
        fa = np.fft.rfft2((a + 1000.0) * window)
        fb = np.fft.rfft2((b + 1000.0) * window)
        spacing = (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
        grid = self._grid((a.shape[0], a.shape[1]), spacing)
        index, w, radius = grid.index, grid.weight, grid.radius
        n = self.config.n_bins
        cross = np.conj(fa) * fb
        self.s_ab_re += np.bincount(index, w * cross.real.ravel(), n)
        self.s_ab_im += np.bincount(index, w * cross.imag.ravel(), n)
        self.s_aa += np.bincount(index, w * np.abs(fa).ravel() ** 2, n)
        self.s_bb += np.bincount(index, w * np.abs(fb).ravel() ** 2, n)
        self.sum_f += np.bincount(index, w * radius, n)
        ring_weight = np.bincount(index, w, n)
        self.counts += np.rint(ring_weight).astype(np.int64)
        self.noise_floor += ring_weight * QUANTIZATION_VARIANCE_HU2 * float(np.sum(window**2))
        self.n_slices += 1

    def finish(
        self,
        *,
        source_kernel: str,
        target_kernel: str,
        subjects: Sequence[str] = (),
        training_data: dict[str, object] | None = None,
    ) -> FittedFilter:
        if self.n_slices == 0:
            raise ValueError("no slices were added: nothing to fit")
        used = self.counts > 0
        freq = self.sum_f[used] / self.counts[used]
        s_ab = self.s_ab_re[used]
        s_aa, s_bb = self.s_aa[used], self.s_bb[used]
        floor = self.noise_floor[used]
        gain = s_ab / (s_aa + self.config.regularization * floor)
        coherence = (s_ab**2 + self.s_ab_im[used] ** 2) / np.maximum(s_aa * s_bb, 1e-300)
        settings = {
            "method": "wiener-radial",
            "n_bins": self.config.n_bins,
            "regularization_x_rounding_noise": self.config.regularization,
            "region": self.config.region,
            "edge_taper_px": self.config.edge_taper_px,
            "body_threshold_hu": self.config.body_threshold_hu,
            "body_margin_px": self.config.body_margin_px,
            "gain_at_0": 1.0,
        }
        linear_filter = LinearFilter(
            frequency_lp_per_mm=np.concatenate([[0.0], freq]),
            gain=np.concatenate([[1.0], gain]),
            coherence=np.clip(np.concatenate([[1.0], coherence]), 0.0, 1.0),
            counts=np.concatenate([[0], self.counts[used]]).astype(np.int64),
            source_kernel=source_kernel,
            target_kernel=target_kernel,
            fit_settings=settings,
            training_data=training_data or {"slices": self.n_slices},
        )
        return FittedFilter(
            linear_filter=linear_filter,
            cross_power=s_ab,
            source_power=s_aa,
            target_power=s_bb,
            noise_floor_power=floor,
            n_slices=self.n_slices,
            subjects=tuple(subjects),
            config=self.config,
        )


def corner_frequency(pixel_spacing_mm: tuple[float, float]) -> float:
    """Highest radial frequency (lp/mm) on a grid: the corner of the 2-D Nyquist square."""
    return float(np.hypot(0.5 / pixel_spacing_mm[0], 0.5 / pixel_spacing_mm[1]))


def fit_linear_filter(
    paired_series: Sequence[PairedSeries], config: FitConfig | None = None
) -> FittedFilter:
    """Fit the filter over all slices of same-acquisition pairs (repeat-scan pairs are skipped)."""
    config = config or FitConfig()
    usable = [p for p in paired_series if p.same_acquisition]
    if not usable:
        raise ValueError("no same-acquisition paired series to fit on")
    source_kernels = sorted({p.source_kernel for p in usable})
    target_kernels = sorted({p.target_kernel for p in usable})
    if len(source_kernels) > 1 or len(target_kernels) > 1:
        raise ValueError(f"mixed kernels in the data: {source_kernels} -> {target_kernels}")
    f_max = max(corner_frequency(p.pixel_spacing_mm) for p in usable)
    acc = SpectralAccumulator(f_max, config)
    for series in usable:
        for pair in series.pairs:
            acc.add_slice(
                read_hu(pair.source_path), read_hu(pair.target_path), series.pixel_spacing_mm
            )
    subjects = sorted({p.subject_label for p in usable})
    training_data = {
        "subjects": subjects,
        "series_pairs": len(usable),
        "slices": acc.n_slices,
        "pixel_spacings_mm": sorted({p.pixel_spacing_mm[0] for p in usable}),
        "matrix": sorted({f"{p.rows}x{p.columns}" for p in usable}),
    }
    return acc.finish(
        source_kernel=source_kernels[0],
        target_kernel=target_kernels[0],
        subjects=subjects,
        training_data=training_data,
    )


def fit_from_arrays(
    pairs: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]],
    pixel_spacing_mm: tuple[float, float],
    config: FitConfig | None = None,
    *,
    source_kernel: str = "source",
    target_kernel: str = "target",
) -> FittedFilter:
    """Fit from in-memory (source, target) HU slice pairs sharing one pixel spacing."""
    acc = SpectralAccumulator(corner_frequency(pixel_spacing_mm), config or FitConfig())
    for a, b in pairs:
        acc.add_slice(a, b, pixel_spacing_mm)
    return acc.finish(source_kernel=source_kernel, target_kernel=target_kernel)


@dataclass(frozen=True)
class HeldOutResult:
    """Agreement of the engine's output with the true target series of one held-out subject."""

    subject: str
    slices: int
    rmse_output_hu: float
    rmse_input_hu: float
    noise_sd_output_hu: float
    noise_sd_target_hu: float
    noise_sd_input_hu: float
    roi: str

    @property
    def noise_sd_ratio(self) -> float:
        return self.noise_sd_output_hu / self.noise_sd_target_hu


def evaluate_held_out(engine: LinearFilterEngine, series: PairedSeries) -> HeldOutResult:
    """Run the engine on a held-out source series and compare with its target series.

    RMSE is over the whole slices; noise SD is the median over slices of the SD in the
    truth's `uniform_roi` (truth.npz beside the source files) or, without one, in a central
    32 x 32 pixel square.
    """
    source = np.stack([read_hu(p.source_path) for p in series.pairs])
    target = np.stack([read_hu(p.target_path) for p in series.pairs])
    geometry = SeriesGeometry(series.pixel_spacing_mm, tuple(p.z_mm for p in series.pairs))
    output = engine.standardize(source, geometry)
    roi, roi_name = _noise_roi(series, source.shape)

    def median_sd(volume: npt.NDArray[np.float32]) -> float:
        return float(np.median([np.std(v[m]) for v, m in zip(volume, roi, strict=True) if m.any()]))

    return HeldOutResult(
        subject=series.subject_label,
        slices=series.n_slices,
        rmse_output_hu=float(np.sqrt(np.mean((output - target) ** 2))),
        rmse_input_hu=float(np.sqrt(np.mean((source - target) ** 2))),
        noise_sd_output_hu=median_sd(output),
        noise_sd_target_hu=median_sd(target),
        noise_sd_input_hu=median_sd(source),
        roi=roi_name,
    )


def _noise_roi(series: PairedSeries, shape: tuple[int, ...]) -> tuple[npt.NDArray[np.bool_], str]:
    truth_path = series.pairs[0].source_path.parent / "truth.npz"
    if truth_path.is_file():
        with np.load(truth_path) as truth:
            if "uniform_roi" in truth and "z" in truth:
                z = truth["z"].astype(np.float64)
                masks = []
                for pair in series.pairs:
                    hits = np.flatnonzero(np.abs(z - pair.z_mm) < 0.01)
                    if len(hits) != 1:
                        break
                    masks.append(truth["uniform_roi"][hits[0]])
                else:
                    return np.stack(masks).astype(bool), "uniform_roi"
    roi = np.zeros(shape, dtype=bool)
    r0, c0 = shape[1] // 2 - 16, shape[2] // 2 - 16
    roi[:, r0 : r0 + 32, c0 : c0 + 32] = True
    return roi, "central 32x32"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ltdiff-node train linear",
        description="Fit the linear kernel-conversion filter from paired DICOM series.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="folder tree of paired DICOM files (repeatable)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="weights file to write (.safetensors)",
    )
    parser.add_argument(
        "--holdout",
        default="S004,S005",
        help="comma-separated subject folder names kept out of the fit "
        "(default: %(default)s; empty for none)",
    )
    parser.add_argument("--source-kernel", default=DEFAULT_SOURCE_KERNEL, metavar="REGEX")
    parser.add_argument("--target-kernel", default=DEFAULT_TARGET_KERNEL, metavar="REGEX")
    parser.add_argument("--bins", type=int, default=FitConfig.n_bins)
    parser.add_argument("--regularization", type=float, default=FitConfig.regularization)
    parser.add_argument("--region", choices=("body", "full"), default=FitConfig.region)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: `ltdiff-node train linear --data DIR [--data DIR2] --out FILE ...`."""
    args = _parse_args(argv)
    try:
        found = find_paired_series(
            args.data, source_kernel=args.source_kernel, target_kernel=args.target_kernel
        )
        config = FitConfig(n_bins=args.bins, regularization=args.regularization, region=args.region)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for issue in found.issues:
        print(f"warning: {issue}", file=sys.stderr)
    if found.unpaired:
        print(f"warning: {len(found.unpaired)} slices could not be paired", file=sys.stderr)
    holdout = {s.strip() for s in args.holdout.split(",") if s.strip()}
    train, held = split_by_subject(found.paired, holdout)
    if not any(p.same_acquisition for p in train):
        print("error: no paired series left to fit on after the holdout", file=sys.stderr)
        return 1
    fitted = fit_linear_filter(train, config)
    sha = save_linear_filter(args.out, fitted.linear_filter)
    lf = fitted.linear_filter
    print(
        f"fitted {lf.source_kernel} -> {lf.target_kernel} on subjects "
        f"{', '.join(fitted.subjects)}: {fitted.n_slices} slices"
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {sha[:16]})")
    probe = np.array([0.1, 0.3, 0.5, 0.7])
    gains = lf.gain_at(probe)
    coherence = np.interp(probe, lf.frequency_lp_per_mm, lf.coherence)
    print(
        "gain:      "
        + "  ".join(f"{f:.1f} lp/mm {g:6.3f}" for f, g in zip(probe, gains, strict=True))
    )
    print(
        "coherence: "
        + "  ".join(f"{f:.1f} lp/mm {c:6.3f}" for f, c in zip(probe, coherence, strict=True))
    )
    engine = LinearFilterEngine(lf, weights_sha256=sha)
    for series in held:
        if not series.same_acquisition:
            continue
        r = evaluate_held_out(engine, series)
        print(
            f"held out {r.subject} ({r.slices} slices): RMSE vs {series.target_kernel} "
            f"{r.rmse_output_hu:.1f} HU (input {r.rmse_input_hu:.1f}); noise SD in {r.roi} "
            f"output {r.noise_sd_output_hu:.1f} / target {r.noise_sd_target_hu:.1f} HU "
            f"= {r.noise_sd_ratio:.3f} (input {r.noise_sd_input_hu:.1f})"
        )
    print("fit settings: " + json.dumps(dict(lf.fit_settings), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
