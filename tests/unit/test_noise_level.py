"""The noise level measured from pixels (engine/noise_level.py): what the conditioned engine and
the envelope check both see."""

from __future__ import annotations

import numpy as np
import pytest

from engine.noise_level import measure_noise_hu, slice_noise_hu, window_pixels
from engine.synthetic import phantom_slice


def _noisy_phantom(sd: float, size: int = 128, slices: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.stack([phantom_slice(size, size, z_fraction=k / 3) for k in range(slices)])
    return (base + rng.normal(0.0, sd, base.shape)).astype(np.float32)


@pytest.mark.parametrize("sd", [5.0, 15.0, 40.0])
def test_white_noise_in_soft_tissue_reads_close_to_its_sd(sd: float) -> None:
    measured = measure_noise_hu(_noisy_phantom(sd), 0.7)
    assert measured is not None
    # A 5x5 window's sample SD of white noise is a slightly low, unbiased-in-median estimate.
    assert 0.85 * sd < measured < 1.05 * sd


def test_the_level_scales_with_the_noise_and_ignores_organ_boundaries() -> None:
    low = measure_noise_hu(_noisy_phantom(10.0), 0.7)
    high = measure_noise_hu(_noisy_phantom(20.0), 0.7)
    assert low is not None and high is not None
    assert high / low == pytest.approx(2.0, rel=0.08)


def test_a_noise_free_phantom_measures_zero_and_air_measures_nothing() -> None:
    clean = np.stack([phantom_slice(96, 96)] * 2)
    assert measure_noise_hu(clean, 0.7) == pytest.approx(0.0, abs=1e-6)
    air = np.full((2, 96, 96), -1000.0, dtype=np.float32)
    assert measure_noise_hu(air, 0.7) is None
    assert slice_noise_hu(air[0], 0.7) is None


def test_the_window_has_the_same_physical_size_at_every_spacing() -> None:
    assert window_pixels(0.625) == 7
    assert window_pixels(0.7) == 7  # 5.7 -> 6 -> odd 7
    assert window_pixels(0.977) == 5
    assert window_pixels(5.0) == 3


def test_long_series_are_sampled_not_read_whole() -> None:
    volume = _noisy_phantom(12.0, size=64, slices=40)
    volume[::2] += np.random.default_rng(1).normal(0.0, 30.0, volume[::2].shape).astype(np.float32)
    # Only the slices it samples count: the median over a spread sample of both kinds.
    assert measure_noise_hu(volume, 0.7, max_slices=3) is not None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="volume"):
        measure_noise_hu(np.zeros((4, 4)), 0.7)
    with pytest.raises(ValueError, match="spacing"):
        measure_noise_hu(np.zeros((1, 8, 8)), 0.0)
