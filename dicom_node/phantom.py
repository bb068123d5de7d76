"""A synthetic chest-phantom CT series for routing tests: no patient data anywhere.

Hospital IT needs something to send through the PACS -> node -> PACS route before real studies
do. `generate_phantom_series` writes a CT Image Storage series that looks like a simplified chest
on a scanner with a medium-smooth body kernel (Br40-like), so the engines get realistic input:

* anatomy drawn in patient millimetres (independent of the pixel grid) with anti-aliased edges:
  body ellipse with skin and a subcutaneous fat layer (~-100 HU), soft tissue/muscle (~40 HU),
  two lungs (~-860 HU with mild texture continuous across slices), pulmonary vessels running
  obliquely, a heart with a uniform blood pool (the noise-measurement region), descending aorta,
  sternum, vertebra (cortex ~+700 HU, cancellous bone, canal), ribs (~+700 HU) drifting with z,
  three lung nodules spanning several slices (solid, ground-glass, calcified), and a patient table;
* a Br40-like system blur: MTF exp(-(f/f_c)^n), n = 2.45, f_c = 0.441 lp/mm (MTF50 0.38,
  MTF10 0.62 lp/mm, as measured for Br40d);
* white Gaussian noise shaped by an FBP noise power spectrum NPS(f) ~ f * A(f)^2 (ramp x kernel
  apodization A(f) = exp(-(f/f_n)^n)), with f_n = 0.516 lp/mm so that the NPS peaks at 0.27 lp/mm
  (the apodization alone is wider than the MTF, which also holds detector and focal-spot blur),
  scaled to the requested pixel SD (default 11 HU, a routine-dose Br40 chest in soft tissue);
* Siemens-like storage: unsigned 12-bit, stored = clip(round(HU) + 1024, 0, 4095), intercept -1024.

The pixels and all UIDs are a pure function of the arguments (the seed picks the random anatomy
details and the noise), so the same seed regenerates the same study; use another seed for a new
study. The `kernel` argument only labels the series (ConvolutionKernel, SeriesDescription): the
image texture is always Br40-like. Dates are today's unless given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from engine import __version__
from engine.synthetic import SyntheticStudy, make_ct_dataset, synthetic_uid

PATIENT_NAME: Final = "PHANTOM^LTDIFF"
PATIENT_ID: Final = "LTDIFF-PHANTOM"
STUDY_DESCRIPTION: Final = "ltdiff-node routing test phantom"
MANUFACTURER: Final = "ltdiff-node phantom"
APODIZATION_ORDER: Final = 2.45
"""n of the Br40-like curves exp(-(f/f_c)^n): with MTF50 0.38 lp/mm it gives MTF10 0.62 lp/mm."""
MTF_CUTOFF_LP_PER_MM: Final = 0.38 / np.log(2) ** (1 / APODIZATION_ORDER)
"""f_c of the image MTF: MTF50 = 0.38 lp/mm (Br40d measured 0.38 / 0.62)."""
NOISE_CUTOFF_LP_PER_MM: Final = 0.27 * (2 * APODIZATION_ORDER) ** (1 / APODIZATION_ORDER)
"""f_c of the kernel apodization shaping the noise: NPS f * A(f)^2 peaks at 0.27 lp/mm."""

FloatArray = npt.NDArray[np.float32]
_Grid = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass(frozen=True)
class PhantomVolume:
    """Phantom images before storage.

    hu: float32 [slices, rows, cols], HU with blur and noise, not rounded or clipped.
    uniform_roi: bool, same shape: the eroded heart blood pool (40 HU), for noise measurements.
    z_mm: slice positions (ImagePositionPatient z), slice 0 the most superior.
    """

    hu: FloatArray
    uniform_roi: npt.NDArray[np.bool_]
    z_mm: tuple[float, ...]


def _ellipse(
    grid: _Grid, centre: tuple[float, float], axes: tuple[float, float], pixel_mm: float
) -> npt.NDArray[np.float64]:
    """Anti-aliased coverage 0..1 of an axis-aligned ellipse (centre, semi-axes in mm)."""
    x, y = grid
    (cx, cy), (a, b) = centre, axes
    dx, dy = (x - cx) / a, (y - cy) / b
    rho = np.sqrt(dx * dx + dy * dy)
    grad = np.sqrt((dx / a) ** 2 + (dy / b) ** 2) / np.maximum(rho, 1e-9)
    distance = (1.0 - rho) / np.maximum(grad, 1e-9)
    return np.clip(distance / pixel_mm + 0.5, 0.0, 1.0)


def _paint(image: npt.NDArray[np.float64], coverage: npt.NDArray[np.float64], hu: float) -> None:
    image += coverage * (hu - image)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int], sigma_px: float
) -> npt.NDArray[np.float64]:
    """Unit-SD Gaussian random field, Gaussian-correlated with `sigma_px`."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    field = np.fft.irfft2(
        np.fft.rfft2(white) * np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2)), s=shape
    )
    return np.asarray(field / max(float(field.std()), 1e-12))


def _br40_like_mtf(shape: tuple[int, int], pixel_mm: float) -> npt.NDArray[np.float64]:
    fy = np.fft.fftfreq(shape[0], d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=pixel_mm)[None, :]
    f = np.hypot(fy, fx)
    return _apodization(f, MTF_CUTOFF_LP_PER_MM)


def _apodization(f: npt.NDArray[np.float64], cutoff: float) -> npt.NDArray[np.float64]:
    return np.asarray(np.exp(-((f / cutoff) ** APODIZATION_ORDER)))


def render_phantom(
    *,
    n_slices: int = 24,
    size: int = 512,
    pixel_spacing: float = 0.703125,
    slice_spacing: float = 1.0,
    noise_sd_hu: float = 11.0,
    seed: int = 0,
) -> PhantomVolume:
    """Render the phantom volume in HU (see the module docstring for what it contains)."""
    if n_slices < 1 or size < 16 or pixel_spacing <= 0 or slice_spacing <= 0 or noise_sd_hu < 0:
        raise ValueError(
            f"invalid phantom geometry: n_slices={n_slices} (>= 1), size={size} (>= 16), "
            f"pixel_spacing={pixel_spacing} (> 0), slice_spacing={slice_spacing} (> 0), "
            f"noise_sd_hu={noise_sd_hu} (>= 0)"
        )
    rng = np.random.default_rng(seed)
    centre = (size - 1) / 2.0
    coords = (np.arange(size) - centre) * pixel_spacing
    grid: _Grid = (
        np.repeat(coords[None, :], size, axis=0).astype(np.float64),
        np.repeat(coords[:, None], size, axis=1).astype(np.float64),
    )
    z_mm = tuple(
        float((n_slices - 1) / 2.0 * slice_spacing - i * slice_spacing) for i in range(n_slices)
    )

    # Random anatomy details, drawn once per seed.
    rib_angles = np.deg2rad(
        np.array([-150, -120, -60, -30, 30, 60, 120, 150]) + rng.uniform(-6, 6, 8)
    )
    vessels = [
        (side * rng.uniform(45, 115), rng.uniform(-55, 50), rng.uniform(1.2, 4.0),
         rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4))
        for side in (-1, 1) for _ in range(8)
    ]  # fmt: skip
    half_z = (n_slices - 1) / 2.0 * slice_spacing
    nodules = [  # (x, y, z, radius mm, HU): solid, ground-glass, calcified
        (x + rng.uniform(-8, 8), y + rng.uniform(-8, 8), rng.uniform(-0.5, 0.5) * half_z, r, hu)
        for x, y, r, hu in ((-85, -20, 7.0, 30.0), (80, 20, 9.0, -500.0), (95, -40, 4.0, 500.0))
    ]
    texture_a = _smooth_field(rng, (size, size), 2.5 / pixel_spacing)
    texture_b = _smooth_field(rng, (size, size), 2.5 / pixel_spacing)

    mtf = _br40_like_mtf((size, size), pixel_spacing)
    fy = np.fft.fftfreq(size, d=pixel_spacing)[:, None]
    fx = np.fft.fftfreq(size, d=pixel_spacing)[None, :]
    f_full = np.hypot(fy, fx)
    nps_amplitude_full = np.sqrt(f_full) * _apodization(f_full, NOISE_CUTOFF_LP_PER_MM)
    # irfft2(rfft2(white) * H) has pixel variance mean(H^2) over the full FFT grid.
    noise_gain = noise_sd_hu / np.sqrt(np.mean(nps_amplitude_full**2))
    noise_filter = nps_amplitude_full[:, : size // 2 + 1] * noise_gain

    px = pixel_spacing
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    roi = np.zeros((n_slices, size, size), dtype=bool)
    for k, z in enumerate(z_mm):
        image = np.full((size, size), -1000.0)
        # Table: carbon-fibre plates around foam, below the patient.
        x, y = grid
        table_box = (np.abs(x) < 175) & (y > 128) & (y < 148)
        image[table_box] = -950.0
        image[table_box & ((y < 131) | (y > 145))] = 250.0
        # Body: skin, subcutaneous fat, soft tissue.
        _paint(image, _ellipse(grid, (0, 5), (160, 118), px), 30.0)
        _paint(image, _ellipse(grid, (0, 5), (158, 116), px), -100.0)
        _paint(image, _ellipse(grid, (0, 5), (146, 104), px), 40.0)
        # Lungs, slightly larger inferiorly, with texture continuous in z.
        phase = z / 12.0
        texture = np.cos(phase) * texture_a + np.sin(phase) * texture_b
        lung_scale = 1.0 - 0.004 * z
        for side in (-1, 1):
            lung = _ellipse(grid, (side * 76, -5), (48 * lung_scale, 80 * lung_scale), px)
            image += lung * ((-860.0 + 15.0 * texture) - image)
        # Vessels in the lungs, running obliquely.
        for vx, vy, r, sx, sy in vessels:
            _paint(image, _ellipse(grid, (vx + sx * z, vy + sy * z), (r, r), px), 40.0)
        # Mediastinum: heart, aorta, sternum, vertebra, canal.
        _paint(image, _ellipse(grid, (12, 10), (52, 46), px), 40.0)
        _paint(image, _ellipse(grid, (22, 62), (12, 12), px), 45.0)
        _paint(image, _ellipse(grid, (0, -100), (16, 7), px), 700.0)
        _paint(image, _ellipse(grid, (0, -100), (13, 4.5), px), 250.0)
        _paint(image, _ellipse(grid, (0, 78), (19, 17), px), 700.0)
        _paint(image, _ellipse(grid, (0, 78), (16.5, 14.5), px), 220.0)
        _paint(image, _ellipse(grid, (0, 102), (8, 7), px), 15.0)
        _paint(image, _ellipse(grid, (0, 118), (4, 10), px), 700.0)
        # Ribs along the chest wall, drifting with z as ribs run obliquely.
        for angle in rib_angles:
            theta = angle + 0.004 * z
            rx, ry = 136 * np.cos(theta), 5 + 99 * np.sin(theta)
            _paint(image, _ellipse(grid, (rx, ry), (7, 5), px), 700.0)
            _paint(image, _ellipse(grid, (rx, ry), (4.5, 2.8), px), 250.0)
        # Nodules: spheres, cut by the slice plane.
        for nx, ny, nz, r, value in nodules:
            if abs(z - nz) < r:
                rz = float(np.sqrt(r * r - (z - nz) ** 2))
                _paint(image, _ellipse(grid, (nx, ny), (rz, rz), px), value)

        spectrum = np.fft.rfft2(image) * mtf
        spectrum += np.fft.rfft2(rng.standard_normal((size, size))) * noise_filter
        hu[k] = np.fft.irfft2(spectrum, s=(size, size))
        roi[k] = _ellipse(grid, (12, 10), (30, 26), px) >= 1.0
    return PhantomVolume(hu=hu, uniform_roi=roi, z_mm=z_mm)


def generate_phantom_series(
    out_dir: Path,
    *,
    n_slices: int = 24,
    size: int = 512,
    pixel_spacing: float = 0.703125,
    slice_spacing: float = 1.0,
    kernel: str = "Br40d",
    seed: int = 0,
    noise_sd_hu: float = 11.0,
    series_number: int = 2,
    study_date: dt.date | None = None,
) -> list[Path]:
    """Write the phantom as a CT series into `out_dir` (created); returns the files, slice order.

    The headers are written by `engine.synthetic.make_ct_dataset`. UIDs derive from the seed
    (study, frame of reference) and the seed plus kernel and series number (series, instances),
    so series of several kernels generated with one seed form one study.
    """
    volume = render_phantom(
        n_slices=n_slices,
        size=size,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        noise_sd_hu=noise_sd_hu,
        seed=seed,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uid_seed = f"phantom {seed}"
    series_uid = synthetic_uid(uid_seed, "series", kernel, series_number)
    study = SyntheticStudy(
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        study_description=STUDY_DESCRIPTION,
        accession_number="",
        date=(study_date or dt.date.today()).strftime("%Y%m%d"),
        time="120000",
        manufacturer=MANUFACTURER,
        model_name="synthetic chest phantom",
        software_versions=__version__,
        institution_name=None,
    )
    origin = -(size - 1) / 2.0 * pixel_spacing

    paths: list[Path] = []
    for index, z in enumerate(volume.z_mm):
        instance = index + 1
        ds = make_ct_dataset(
            volume.hu[index],
            position=(origin, origin, float(z)),
            pixel_spacing=(pixel_spacing, pixel_spacing),
            slice_thickness=slice_spacing,
            instance_number=instance,
            kernel=kernel,
            uid_seed=uid_seed,
            series_uid=series_uid,
            series_number=series_number,
            series_description=f"Phantom {slice_spacing:.1f} {kernel}",
            study=study,
        )
        ds.file_meta.ImplementationVersionName = f"LTDIFF_{__version__}"[:16]
        path = out_dir / f"CT{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `ltdiff-node phantom OUT_DIR [--slices N] [--seed S] [--kernel K]`."""
    parser = argparse.ArgumentParser(
        prog="ltdiff-node phantom",
        description="Write a synthetic chest-phantom CT series (no patient data) for routing.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--slices", type=int, default=24, help="number of slices (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same study (%(default)s)")
    parser.add_argument("--kernel", default="Br40d", help="ConvolutionKernel label (%(default)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        paths = generate_phantom_series(
            args.out_dir, n_slices=args.slices, seed=args.seed, kernel=args.kernel
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} {args.kernel} phantom slices to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
