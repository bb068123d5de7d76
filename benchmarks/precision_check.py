"""How far the engine's output moves when the encoder and decoder bodies run in bf16.

Compares, slice for slice with the same seed, the engine at precision "bf16" (denoiser and the
nested networks of E and D under bf16 autocast, the linear shortcuts float32) with
"denoiser-bf16" (E and D wholly float32), and, for scale, "denoiser-bf16" with "float32" (what
the bf16 denoiser alone already changes). Prints the max / mean-abs / RMS HU difference and the
ratio of the noise SD and of the fine-grain SD (the image minus its 3 x 3 mean) in a uniform
region, for the regression engine (D(E(x)) of the weights' autoencoder) and the LTDiff++ engine.

Inputs: synthetic phantoms (engine/synthetic.py) blurred and given Br40d-like correlated noise
(NPS peak near 0.27 lp/mm, about 12 HU), and with `--data` a few slices of held-out subjects of
the kernel-pairs set (their heart blood pool, truth.npz `uniform_roi`, is the uniform region).

Run: `.venv/bin/python benchmarks/precision_check.py [--data DIR/kernel-pairs] [--threads 2]`.
On a CPU without native bf16 both modes are float32 and every difference is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from pydicom import dcmread

from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine, Precision, autoencoder_autocast_dtype
from engine.ltdiff.weights import EngineMode, LTDiffWeights, load_weights, shipped_weights_path
from engine.noise_level import measure_noise_hu
from engine.series_io import load_series
from engine.synthetic import phantom_slice

Array = npt.NDArray[np.float32]


def _box3(image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    padded = np.pad(image, 1, mode="edge")
    rows, cols = image.shape
    return (
        sum(
            (padded[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)),
            np.zeros_like(image),
        )
        / 9.0
    )


def fine_grain(volume: Array) -> npt.NDArray[np.float64]:
    """Each slice minus its 3 x 3 mean: the finest grain of the sharp kernel."""
    v = volume.astype(np.float64)
    return np.stack([s - _box3(s) for s in v])


def br40_like_phantoms(n: int, size: int, spacing_mm: float, noise_sd: float, seed: int) -> Array:
    """Phantom slices blurred to a Br40d-like MTF (Gaussian, MTF50 0.38 lp/mm) with correlated
    noise whose power spectrum |f| exp(-2 (f / 0.54)^2) peaks at 0.27 lp/mm, SD `noise_sd`."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size, d=spacing_mm)
    fr = np.hypot(f[:, None], f[None, :])
    mtf = np.exp(-((fr / 0.456) ** 2))
    shape = np.sqrt(fr) * np.exp(-((fr / 0.54) ** 2))
    out = []
    for k in range(n):
        clean = phantom_slice(size, size, k / max(n - 1, 1)).astype(np.float64)
        blurred = np.fft.ifft2(np.fft.fft2(clean) * mtf).real
        noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * shape).real
        out.append(blurred + noise * (noise_sd / noise.std()))
    return np.stack(out).astype(np.float32)


def phantom_uniform_mask(n: int, size: int) -> npt.NDArray[np.bool_]:
    """Water (0 HU) pixels of the clean phantom at least 12 pixels from any other material."""
    masks = []
    for k in range(n):
        water = (phantom_slice(size, size, k / max(n - 1, 1)) == 0.0).astype(np.float64)
        r = 12
        c = np.pad(water, ((r + 1, r), (r + 1, r)), mode="constant").cumsum(0).cumsum(1)
        w = 2 * r + 1
        total = c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]
        masks.append(total >= w * w - 0.5)
    return np.stack(masks)


def subject_slices(
    root: Path, subject: str, n: int
) -> tuple[Array, SeriesGeometry, float, npt.NDArray[np.bool_]]:
    """`n` middle Br40d slices of a kernel-pairs subject, their geometry, the series' noise
    level (measured on all its slices, as the node does) and the uniform ROI of those slices."""
    folder = root / "train" / subject
    paths = [
        p
        for p in sorted(folder.glob("*.dcm"))
        if str(dcmread(p, stop_before_pixels=True).ConvolutionKernel) == "Br40d"
    ]
    loaded = load_series(paths)
    volume = loaded.volume_hu
    spacing = float(np.mean(loaded.geometry.pixel_spacing_mm))
    noise = measure_noise_hu(volume, spacing)
    start = max(0, volume.shape[0] // 2 - n // 2)
    picks = list(range(start, min(start + n, volume.shape[0])))
    truth = np.load(folder / "truth.npz")
    z_truth = [float(z) for z in truth["z"]]
    rois = np.stack(
        [
            truth["uniform_roi"][
                int(np.argmin([abs(z - loaded.geometry.slice_positions_mm[i]) for z in z_truth]))
            ]
            for i in picks
        ]
    )
    geometry = SeriesGeometry(
        loaded.geometry.pixel_spacing_mm,
        tuple(loaded.geometry.slice_positions_mm[i] for i in picks),
    )
    return volume[picks], geometry, float(noise or 0.0), rois


def regression_weights(weights: LTDiffWeights) -> LTDiffWeights:
    """The weights' autoencoder alone, as the UNet++ regression engine: D(E(x))."""
    return dataclasses.replace(
        weights,
        mode=EngineMode.UNETPP_REGRESSION,
        denoiser_config=None,
        denoiser_state=None,
        schedule_config=None,
    )


def compare(a: Array, b: Array, roi: npt.NDArray[np.bool_]) -> dict[str, float]:
    """Differences of b from a (HU), and b's noise / fine-grain SD in `roi` over a's."""
    d = b.astype(np.float64) - a.astype(np.float64)
    ga, gb = fine_grain(a), fine_grain(b)
    return {
        "max": float(np.abs(d).max()),
        "mean_abs": float(np.abs(d).mean()),
        "rms": float(np.sqrt((d * d).mean())),
        "noise_ratio": float(b[roi].std() / a[roi].std()),
        "grain_ratio": float(gb[roi].std() / ga[roi].std()),
        "noise_sd_ref": float(a[roi].std()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, help="default: the shipped LTDiff++ weights")
    parser.add_argument("--data", type=Path, help="the kernel-pairs folder (README.md inside)")
    parser.add_argument("--subjects", default="S004,S005")
    parser.add_argument("--slices", type=int, default=4, help="slices per input")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the weights' setting)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    native = autoencoder_autocast_dtype(torch.device("cpu"), "bf16")
    print(f"autoencoder bodies at precision 'bf16' on this CPU: {native or torch.float32}")
    weights, sha = load_weights(args.weights or shipped_weights_path())

    inputs: list[tuple[str, Array, SeriesGeometry, float | None, npt.NDArray[np.bool_]]] = []
    size, spacing = 512, 0.703125
    n = args.slices
    phantoms = br40_like_phantoms(n, size, spacing, 12.0, seed=0)
    geometry = SeriesGeometry((spacing, spacing), tuple(float(z) for z in range(n)))
    inputs.append(("phantom", phantoms, geometry, None, phantom_uniform_mask(n, size)))
    if args.data is not None:
        for subject in args.subjects.split(","):
            volume, geom, noise, roi = subject_slices(args.data, subject, n)
            inputs.append((subject, volume, geom, noise, roi))

    # (what, reference, compared): engines keyed by precision; "bodies-only" is float32 but for
    # the E/D bodies (no public setting: it isolates their rounding from the bf16 denoiser's),
    # "+0.01HU" the reference engine on an input with 0.01 HU of white noise added.
    pairs: list[tuple[str, str, str]] = [
        ("E/D bodies bf16 vs float32", "denoiser-bf16", "bf16"),
        ("E/D bodies bf16, float32 denoiser", "float32", "bodies-only"),
        ("(floor) input +0.01 HU, bf16 den.", "denoiser-bf16", "+0.01HU"),
        ("(scale) denoiser bf16 vs float32", "float32", "denoiser-bf16"),
    ]
    header = (
        f"{'input':8} {'engine':10} {'comparison':34} {'max':>7} {'meanabs':>8} {'rms':>7} "
        f"{'noiseSD':>8} {'noise':>7} {'grain':>7}"
    )
    print(header)
    for engine_name, w in (("regression", regression_weights(weights)), ("ltdiff", weights)):
        precisions: tuple[Precision, ...] = ("float32", "denoiser-bf16", "bf16")
        engines = {
            p: LTDiffEngine(w, weights_sha256=sha, num_steps=args.steps, precision=p)
            for p in precisions
        }
        bodies_only = LTDiffEngine(w, weights_sha256=sha, num_steps=args.steps, precision="float32")
        bodies_only._ae_amp_dtype = native
        for label, volume, geom, noise, roi in inputs:
            outs = {
                p: e.standardize(volume, geom, seed=args.seed, noise_hu=noise)
                for p, e in engines.items()
            }
            if engine_name == "ltdiff":
                outs["bodies-only"] = bodies_only.standardize(
                    volume, geom, seed=args.seed, noise_hu=noise
                )
                jitter = np.random.default_rng(7).normal(0.0, 0.01, volume.shape)
                outs["+0.01HU"] = engines["denoiser-bf16"].standardize(
                    (volume + jitter).astype(np.float32), geom, seed=args.seed, noise_hu=noise
                )
            for what, ref, new in pairs:
                if (
                    ref not in outs
                    or new not in outs
                    or (engine_name == "regression" and ref == "float32")
                ):
                    continue  # the regression engine has no denoiser
                r = compare(outs[ref], outs[new], roi)
                print(
                    f"{label:8} {engine_name:10} {what:34} {r['max']:7.2f} {r['mean_abs']:8.3f} "
                    f"{r['rms']:7.3f} {r['noise_sd_ref']:8.2f} {r['noise_ratio']:7.4f} "
                    f"{r['grain_ratio']:7.4f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
