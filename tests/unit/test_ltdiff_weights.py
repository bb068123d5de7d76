"""LTDiff++ weights files: round trip, self-description, strict loading with a useful message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ltdiff_support import TINY_AE, tiny_weights
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engine.interface import EngineError
from engine.linear_filter import read_weights_metadata
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder
from engine.ltdiff.weights import (
    EngineMode,
    load_weights,
    save_weights,
    shipped_weights_path,
    unwrap_state,
)


def test_round_trip_restores_configs_and_tensors(tmp_path: Path) -> None:
    weights = tiny_weights()
    path = tmp_path / "w.safetensors"
    sha = save_weights(path, weights, created="2024-01-01T00:00:00+00:00")
    loaded, sha2 = load_weights(path)
    assert sha == sha2
    assert loaded.mode is EngineMode.LTDIFF
    assert loaded.autoencoder_config == weights.autoencoder_config
    assert loaded.denoiser_config == weights.denoiser_config
    assert loaded.schedule_config == weights.schedule_config
    assert loaded.sampling == weights.sampling
    assert loaded.latent_scale == weights.latent_scale
    assert loaded.target_scale == weights.target_scale == 3.0
    assert loaded.normalization == weights.normalization
    for k, v in weights.autoencoder_state.items():
        assert torch.equal(loaded.autoencoder_state[k], v), k
    assert loaded.denoiser_state is not None and weights.denoiser_state is not None
    for k, v in weights.denoiser_state.items():
        assert torch.equal(loaded.denoiser_state[k], v), k


def test_file_describes_itself(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    meta = read_weights_metadata(path.read_bytes(), source="w")
    for key in (
        "autoencoder_config",
        "denoiser_config",
        "schedule_config",
        "sampling",
        "latent_scale",
        "normalization",
        "source_kernel",
        "target_kernel",
        "training",
        "code_version",
        "code_sha256",
        "created",
    ):
        assert key in meta, f"metadata lacks {key}"
    assert json.loads(meta["autoencoder_config"])["latent_channels"] == TINY_AE.latent_channels
    assert meta["engine_kind"] == "ltdiff"
    assert len(meta["code_sha256"]) == 64


def test_regression_mode_holds_no_denoiser(tmp_path: Path) -> None:
    path = tmp_path / "reg.safetensors"
    save_weights(path, tiny_weights(EngineMode.UNETPP_REGRESSION))
    loaded, _ = load_weights(path, expected_kind="unetpp-regression")
    assert loaded.mode is EngineMode.UNETPP_REGRESSION and loaded.denoiser_state is None
    assert not any(k.startswith("denoiser.") for k in st_load(path.read_bytes()))


def test_wrong_kind_is_refused_with_both_kinds_named(tmp_path: Path) -> None:
    path = tmp_path / "reg.safetensors"
    save_weights(path, tiny_weights(EngineMode.UNETPP_REGRESSION))
    with pytest.raises(EngineError, match=r"'unetpp-regression'.*'ltdiff' was configured"):
        load_weights(path, expected_kind="ltdiff")


def _rewrite(
    path: Path,
    drop: str | None = None,
    reshape: str | None = None,
    meta: dict[str, str] | None = None,
) -> None:
    data = path.read_bytes()
    tensors = st_load(data)
    metadata = read_weights_metadata(data, source="x")
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    metadata.update(meta or {})
    path.write_bytes(st_save(tensors, metadata=metadata))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    _rewrite(path, drop="autoencoder.to_latent.weight")
    with pytest.raises(
        EngineError, match=r"autoencoder tensors .* missing 1 tensor.*to_latent\.weight"
    ):
        load_weights(path)


def test_shape_mismatch_with_the_stored_config_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    _rewrite(path, reshape="denoiser.stem.weight")
    with pytest.raises(
        EngineError, match=r"denoiser tensors .*shape mismatch.*stem\.weight: file \(3, 3\)"
    ):
        load_weights(path)


def test_config_that_does_not_fit_the_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    cfg = json.loads(read_weights_metadata(path.read_bytes(), source="x")["autoencoder_config"])
    cfg["decoder_channels"] = [4, 8, 16]
    _rewrite(path, meta={"autoencoder_config": json.dumps(cfg)})
    with pytest.raises(EngineError, match="shape mismatch"):
        load_weights(path)


def test_tampered_schedule_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    data = path.read_bytes()
    tensors = st_load(data)
    tensors["schedule.alphas_cumprod"] = tensors["schedule.alphas_cumprod"] * 0.5
    path.write_bytes(st_save(tensors, metadata=read_weights_metadata(data, source="x")))
    with pytest.raises(EngineError, match=r"schedule\.alphas_cumprod does not match"):
        load_weights(path)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    _rewrite(path, meta={"format_version": "99"})
    with pytest.raises(EngineError, match="format_version is '99', expected '1'"):
        load_weights(path)


def test_unwrap_state_strips_ddp_and_compile_wrappers() -> None:
    ae = UNetPlusPlusAutoencoder(TINY_AE)

    class Compiled(torch.nn.Module):  # the shape torch.compile's OptimizedModule has
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    state = unwrap_state(Compiled(ae))
    assert set(state) == set(ae.state_dict())


def test_shipped_weights_describe_their_training_and_keep_the_held_out_subjects_out() -> None:
    """The weights in engine/weights: strict load, the kernel pair, at most 30 MB, a training
    record that names its data and leaves out the evaluation subjects S004, S005, V001 and V002
    (docs/MODEL_CARD.md reports numbers on those), a denoiser conditioned on the series, and the
    validated envelope the node enforces; a one-step student with its teacher on record."""
    path = shipped_weights_path()
    assert path.stat().st_size <= 30 * 1024 * 1024
    weights, sha = load_weights(path, expected_kind="ltdiff")
    assert (weights.source_kernel, weights.target_kernel) == ("Br40d", "Bl64d")
    assert weights.mode is EngineMode.LTDIFF and weights.sampling.num_steps <= 10
    data = weights.training["data"]
    assert isinstance(data, dict)
    assert data["n_pairs"] > 0
    held_out = {"S004", "S005", "V001", "V002"}
    assert not held_out & set(data["subjects"])
    assert held_out <= set(weights.training["holdout"])  # type: ignore[arg-type]
    history = weights.training["history"]
    assert isinstance(history, list)
    phases = [h["phase"] for h in history]
    assert phases[:3] == ["1", "2", "3"] and "init" in phases
    # Since issue 11: a one-step student distilled from the run-4 teacher (a phase-2 export).
    assert phases[-3:] == ["2", "teacher", "distill"]
    assert weights.sampling.distilled and weights.sampling.num_steps == 1
    assert weights.denoiser_config is not None
    assert weights.denoiser_config.condition == "spacing-noise"
    envelope = weights.envelope
    assert envelope is not None
    assert envelope.pixel_spacing_mm.low <= 0.65 and envelope.pixel_spacing_mm.high >= 0.95
    assert envelope.source_kernels == ("Br40d",)
    assert envelope.slice_thickness_mm.low == envelope.slice_thickness_mm.high == 1.0
    assert not held_out & set(data["subjects"]) and held_out <= set(envelope.validated_on)
    assert len(sha) == 64
