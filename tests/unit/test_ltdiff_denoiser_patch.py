"""The denoiser's space-to-depth factor (`DenoiserConfig.patch`): factor 1 runs the UNet at the
latent's own resolution; the factor is stored in the weights and set from `train ltdiff`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ltdiff_support import TINY_DENOISER, TINY_TRAIN_ARGS, tiny_weights, write_kernel_pairs

from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.latent_diffusion import DenoiserConfig, LatentDenoiser
from engine.ltdiff.weights import load_weights, save_weights
from training.train_ltdiff import CKPT_NAME, config_from_args, main

FULL_RES = dataclasses.replace(TINY_DENOISER, patch=1)


def test_factor_1_denoiser_keeps_the_latent_resolution() -> None:
    torch.manual_seed(0)
    den = LatentDenoiser(FULL_RES)
    c = FULL_RES.latent_channels
    assert FULL_RES.size_multiple == 2, "only the UNet's own pooling constrains the size"
    z = torch.randn(2, c, 6, 10)  # not a multiple of 4: factor 2 could not take it
    out = den(z, torch.tensor([3, 70]), torch.randn_like(z))
    assert out.shape == z.shape
    assert den.stem.in_channels == 2 * c, "no space-to-depth: z_t and Z_A channels only"
    assert den.stem(torch.cat([z, z], dim=1)).shape[-2:] == z.shape[-2:]
    assert den.head.out_channels == c
    coarse = LatentDenoiser(TINY_DENOISER)
    assert coarse.stem.in_channels == 2 * c * 4 and TINY_DENOISER.size_multiple == 4


def test_weights_round_trip_keeps_the_factor(tmp_path: Path) -> None:
    torch.manual_seed(1)
    den = LatentDenoiser(FULL_RES)
    with torch.no_grad():
        den.head.weight.normal_(0.0, 0.05)
    weights = dataclasses.replace(
        tiny_weights(), denoiser_config=FULL_RES, denoiser_state=den.state_dict()
    )
    path = tmp_path / "w.safetensors"
    save_weights(path, weights)
    loaded, _ = load_weights(path)
    assert loaded.denoiser_config is not None and loaded.denoiser_config.patch == 1
    assert loaded.denoiser_config == FULL_RES
    engine = LTDiffEngine(loaded, weights_sha256="test", device="cpu")
    vol = np.full((1, 24, 24), 40.0, np.float32)
    out = engine.standardize(vol, SeriesGeometry((0.7, 0.7), (0.0,)), seed=3)
    assert out.shape == vol.shape and np.isfinite(out).all()


def test_factor_outside_1_and_2_is_refused() -> None:
    with pytest.raises(ValueError, match="patch must be 1 or 2, got 4"):
        DenoiserConfig(patch=4)


def test_cli_sets_the_factor_of_a_new_phase_2_denoiser(tmp_path: Path) -> None:
    data = write_kernel_pairs(tmp_path / "pairs")
    common = ["--data", str(data), "--holdout", "S004", "--steps", "1", "--ckpt-interval", "1"]
    common += ["--eval-interval", "0", *TINY_TRAIN_ARGS]
    base = ["--phase", "2", "--data", "d", "--out", "o"]
    assert config_from_args(base).denoiser_patch == 1, "default: the latent's resolution"
    assert config_from_args([*base, "--denoiser-patch", "2"]).denoiser_patch == 2
    assert main(["--phase", "1", "--out", str(tmp_path / "p1"), *common]) == 0
    p2 = tmp_path / "p2"
    init = str(tmp_path / "p1" / CKPT_NAME)
    args = ["--phase", "2", "--out", str(p2), "--init", init, "--denoiser-patch", "2", *common]
    export = tmp_path / "ltdiff.safetensors"
    assert main([*args, "--export", str(export)]) == 0
    ckpt = torch.load(p2 / CKPT_NAME, map_location="cpu", weights_only=True)
    assert DenoiserConfig.from_dict(json.loads(ckpt["denoiser_config"])).patch == 2
    engine = LTDiffEngine.from_file(export, expected_kind="ltdiff")
    assert engine.weights.denoiser_config is not None
    assert engine.weights.denoiser_config.patch == 2
