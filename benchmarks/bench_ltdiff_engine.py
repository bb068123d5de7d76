"""Throughput of the LTDiff++ engine on 512 x 512 slices (slices per second), engine alone and end
to end (decode the DICOM files, engine, build and encode the derived series) through
`engine.pipeline.standardize_series`, on the CPU and on CUDA when available, printed beside the
paper's ~30 s per slice.

Run: `.venv/bin/python benchmarks/bench_ltdiff_engine.py [--weights W] [--slices N] [--threads T]`.
Without --weights (and without shipped weights) a randomly initialized model of the default
architecture is timed: the cost does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmwrite

from engine.interface import SeriesGeometry
from engine.ltdiff.engine import PRECISIONS, LTDiffEngine
from engine.ltdiff.latent_diffusion import (
    DenoiserConfig,
    LatentDenoiser,
    ScheduleConfig,
)
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder, UNetPPConfig
from engine.ltdiff.weights import EngineMode, LTDiffWeights, SamplingConfig, shipped_weights_path
from engine.pipeline import standardize_series
from engine.synthetic import make_ct_series, phantom_slice

PAPER_S_PER_SLICE = 30.0
"""LTDiff++ paper (arXiv 2410.04000): about 30 s per slice for its sampler."""


def _random_weights(mode: EngineMode, steps: int) -> LTDiffWeights:
    torch.manual_seed(0)
    ae_cfg, den_cfg = UNetPPConfig(), DenoiserConfig(patch=1)  # patch 1: the training default
    ltdiff = mode is EngineMode.LTDIFF
    return LTDiffWeights(
        mode=mode,
        autoencoder_config=ae_cfg,
        autoencoder_state=UNetPlusPlusAutoencoder(ae_cfg).state_dict(),
        source_kernel="Br40d",
        target_kernel="Bl64d",
        denoiser_config=den_cfg if ltdiff else None,
        denoiser_state=LatentDenoiser(den_cfg).state_dict() if ltdiff else None,
        schedule_config=ScheduleConfig() if ltdiff else None,
        sampling=SamplingConfig(num_steps=steps),
    )


def _engine(args: argparse.Namespace, device: str, mode: EngineMode) -> tuple[LTDiffEngine, str]:
    path = args.weights
    if path is None and mode is EngineMode.LTDIFF:
        try:
            path = shipped_weights_path()
        except Exception:  # noqa: BLE001 (no shipped weights: time a random model instead)
            path = None
    if path is not None and mode is EngineMode.LTDIFF:
        engine = LTDiffEngine.from_file(
            path,
            device=device,
            num_steps=args.steps,
            batch_slices=args.batch,
            precision=args.precision,
        )
        return engine, f"weights {path.name}"
    engine = LTDiffEngine(
        _random_weights(mode, args.steps or 8),
        weights_sha256="0" * 64,
        device=device,
        batch_slices=args.batch,
        precision=args.precision,
    )
    return engine, "random weights, default architecture"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the weights' setting)")
    parser.add_argument("--batch", type=int, help="slices per forward pass")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--devices", default="cpu,cuda", help="comma list; cuda skipped if absent")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="engine precision (engine.ltdiff.engine.Precision); auto = bf16 where native",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    n, size = args.slices, args.size
    rng = np.random.default_rng(0)
    volume = np.stack([phantom_slice(size, size, k / max(n - 1, 1)) for k in range(n)])
    volume = (volume + rng.normal(0.0, 12.0, volume.shape)).astype(np.float32)
    geometry = SeriesGeometry((0.703125, 0.703125), tuple(float(z) for z in range(n)))
    with tempfile.TemporaryDirectory(prefix="ltdiff-bench-") as tmp:
        paths = []
        for ds in make_ct_series(n, size, size, "Br40d", volume_hu=volume, uid_seed="bench"):
            p = Path(tmp) / f"{ds.SOPInstanceUID}.dcm"
            dcmwrite(p, ds, enforce_file_format=True)
            paths.append(p)

        print(f"paper (LTDiff++, arXiv 2410.04000): ~{PAPER_S_PER_SLICE:.0f} s/slice")
        for device in args.devices.split(","):
            if device == "cuda" and not torch.cuda.is_available():
                print("cuda: not available, skipped")
                continue
            for mode in (EngineMode.LTDIFF, EngineMode.UNETPP_REGRESSION):
                engine, what = _engine(args, device, mode)
                engine.standardize(volume[:1], SeriesGeometry((0.7, 0.7), (0.0,)))  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine.standardize(volume, geometry, seed=1)
                if device == "cuda":
                    torch.cuda.synchronize()
                alone = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = standardize_series(paths, engine)
                total = time.perf_counter() - t0
                settings = engine.identity.settings
                label = engine.identity.name + (
                    f" ({settings}, denoiser {str(engine.denoiser_dtype).removeprefix('torch.')})"
                    if settings
                    else ""
                )
                print(
                    f"{device} [{torch.get_num_threads()} threads] {label}, {what}, "
                    f"batch {engine.batch_slices}: {n} slices {size}x{size}\n"
                    f"  engine alone: {n / alone:.2f} slices/s ({alone / n:.3f} s/slice, "
                    f"{PAPER_S_PER_SLICE / (alone / n):.0f}x the paper)\n"
                    f"  end to end:   {n / total:.2f} slices/s ({total / n:.3f} s/slice; "
                    f"engine {result.timings.engine_ms / 1000:.2f} s, decode "
                    f"{result.timings.decode_ms / 1000:.2f} s, encode "
                    f"{result.timings.encode_ms / 1000:.2f} s); 300 slices ~ "
                    f"{300 * total / n:.0f} s"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
