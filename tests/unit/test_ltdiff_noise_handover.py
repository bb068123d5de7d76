"""LTDiffEngine uses the noise level the caller measured instead of measuring it again."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ltdiff_support import TINY_DENOISER, tiny_weights

import engine.ltdiff.engine as ltdiff_engine
from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.latent_diffusion import LatentDenoiser
from engine.noise_level import measure_noise_hu
from engine.synthetic import phantom_slice


def test_a_given_noise_level_gives_the_same_output_without_measuring_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = dataclasses.replace(TINY_DENOISER, condition="spacing-noise")
    weights = dataclasses.replace(
        tiny_weights(),
        denoiser_config=config,
        denoiser_state=LatentDenoiser(config).state_dict(),
    )
    engine = LTDiffEngine(weights, weights_sha256="0" * 64, precision="float32")
    rng = np.random.default_rng(0)
    volume = np.stack([phantom_slice(64, 64, k / 2) for k in range(3)])
    volume = (volume + rng.normal(0.0, 15.0, volume.shape)).astype(np.float32)
    geometry = SeriesGeometry((0.7, 0.7), (0.0, 1.0, 2.0))
    measured = measure_noise_hu(volume, 0.7)
    assert measured is not None
    itself = engine.standardize(volume, geometry, seed=4)

    def no_second_measurement(*_: object, **__: object) -> None:
        raise AssertionError("the engine measured the noise although it was given")

    monkeypatch.setattr(ltdiff_engine, "measure_noise_hu", no_second_measurement)
    given = engine.standardize(volume, geometry, seed=4, noise_hu=measured)
    assert np.array_equal(given, itself)
