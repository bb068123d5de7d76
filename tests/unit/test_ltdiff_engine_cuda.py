"""LTDiffEngine on CUDA: what the node promises on a GPU (skipped without one; CI has none).

benchmarks/gpu_session.sh runs these on a GPU machine. The tolerances against the CPU are those
of bf16 against float32 with the same noise (the generators are CPU ones whatever the device).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ltdiff_support import tiny_weights

from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine
from engine.registry import EngineOptions, load_engine
from engine.synthetic import phantom_slice

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _volume(n: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = np.stack([phantom_slice(size, size, k / max(n - 1, 1)) for k in range(n)])
    return (vol + rng.normal(0, 20, vol.shape)).astype(np.float32)


def _geometry(n: int) -> SeriesGeometry:
    return SeriesGeometry((0.7, 0.7), tuple(float(k) for k in range(n)))


def _engine(device: str = "cuda", **kwargs: int) -> LTDiffEngine:
    return LTDiffEngine(tiny_weights(), weights_sha256="0" * 64, device=device, **kwargs)


def test_cuda_rerun_of_a_series_reproduces_its_pixels_exactly() -> None:
    vol = _volume(3)
    a = _engine().standardize(vol, _geometry(3), seed=11)
    b = _engine("cuda:0").standardize(vol, _geometry(3), seed=11)
    assert np.array_equal(a, b), (
        "re-running a series on the same GPU must give identical pixels (docs/MODEL_CARD.md); "
        f"max difference {np.abs(a - b).max():.4g} HU"
    )


def test_cuda_denoiser_runs_in_half_precision_and_float32_can_be_forced() -> None:
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert _engine().denoiser_dtype == half
    forced = LTDiffEngine(
        tiny_weights(), weights_sha256="0" * 64, device="cuda", precision="float32"
    )
    assert forced.denoiser_dtype == torch.float32


def test_cuda_batch_size_changes_the_result_by_rounding_at_most() -> None:
    vol = _volume(5)
    small = _engine(batch_slices=2).standardize(vol, _geometry(5), seed=3)
    big = _engine(batch_slices=5).standardize(vol, _geometry(5), seed=3)
    diff = np.abs(small - big)
    assert diff.mean() < 1.0, f"mean {diff.mean():.3g} HU, max {diff.max():.3g} HU"


def test_shipped_engine_on_cuda_gives_the_cpu_float32_picture() -> None:
    """The shipped weights on a 512 x 512 phantom: CUDA (bf16 denoiser) against the CPU in
    float32, same seed; no bias, differences of rounding size."""
    vol, geometry = _volume(2, 512), _geometry(2)
    cpu = load_engine("ltdiff", None, "cpu", EngineOptions(precision="float32"))
    gpu = load_engine("ltdiff", None, "cuda")
    a = cpu.standardize(vol, geometry, seed=5)
    b = gpu.standardize(vol, geometry, seed=5)
    diff = np.abs(a - b)
    bias = float(np.abs(a.mean(axis=(1, 2)) - b.mean(axis=(1, 2))).max())
    assert diff.mean() < 20.0 and bias < 2.0, (
        f"cuda vs cpu: mean |diff| {diff.mean():.3g} HU, max {diff.max():.3g} HU, "
        f"largest slice-mean bias {bias:.3g} HU"
    )
