"""LTDiffEngine: the Engine protocol, reproducibility from the seed, bounded batches, registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ltdiff_support import tiny_weights

from engine.interface import Engine, EngineError, SeriesGeometry
from engine.ltdiff.engine import PRECISIONS, LTDiffEngine, slice_seed
from engine.ltdiff.sampler import MAX_STEPS
from engine.ltdiff.weights import EngineMode, save_weights
from engine.registry import KNOWN_ENGINE_KINDS, MAX_SAMPLE_STEPS, EngineOptions, load_engine
from engine.registry import PRECISIONS as REGISTRY_PRECISIONS
from engine.synthetic import phantom_slice


def _volume(n: int = 3, rows: int = 32, cols: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = np.stack([phantom_slice(rows, cols, k / max(n - 1, 1)) for k in range(n)])
    return (vol + rng.normal(0, 20, vol.shape)).astype(np.float32)


def _geometry(n: int) -> SeriesGeometry:
    return SeriesGeometry((0.7, 0.7), tuple(float(k) for k in range(n)))


def _engine(mode: EngineMode = EngineMode.LTDIFF, **kwargs: int) -> LTDiffEngine:
    return LTDiffEngine(tiny_weights(mode), weights_sha256="0" * 64, **kwargs)


def test_engine_implements_the_protocol_with_its_identity() -> None:
    engine = _engine()
    assert isinstance(engine, Engine)
    assert engine.identity.name == "ltdiff++"
    assert (engine.identity.source_kernel, engine.identity.target_kernel) == ("Br40d", "Bl64d")
    assert _engine(EngineMode.UNETPP_REGRESSION).identity.name == "unetpp-regression"


def test_output_is_float32_hu_of_the_input_shape_within_the_storage_range() -> None:
    vol = _volume(3, 40, 36)  # not multiples of the network's size multiple: padded and cropped
    out = _engine().standardize(vol, _geometry(3), seed=1)
    assert out.shape == vol.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.min() >= -1024.0 and out.max() <= 3071.0


def test_same_seed_reproduces_and_another_seed_differs() -> None:
    engine, vol = _engine(), _volume()
    a = engine.standardize(vol, _geometry(3), seed=42)
    b = engine.standardize(vol, _geometry(3), seed=42)
    c = engine.standardize(vol, _geometry(3), seed=43)
    assert np.array_equal(a, b), "re-running a series with its seed must reproduce it exactly"
    assert not np.allclose(a, c), "a different seed must give a different sample"


def test_a_fresh_engine_reproduces_the_same_series() -> None:
    vol = _volume()
    a = _engine().standardize(vol, _geometry(3), seed=7)
    b = _engine().standardize(vol, _geometry(3), seed=7)
    assert np.array_equal(a, b)


def test_batches_are_bounded_and_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    vol = _volume(5)
    small = _engine(batch_slices=2)
    seen: list[int] = []
    encode = small._autoencoder.encode

    def spy(x: torch.Tensor, body_dtype: torch.dtype | None = None) -> torch.Tensor:
        seen.append(x.shape[0])
        return encode(x, body_dtype)

    monkeypatch.setattr(small._autoencoder, "encode", spy)
    out_small = small.standardize(vol, _geometry(5), seed=3)
    assert seen == [2, 2, 1], f"at most batch_slices slices per forward pass, got {seen}"
    out_big = _engine(batch_slices=5).standardize(vol, _geometry(5), seed=3)
    np.testing.assert_allclose(out_small, out_big, atol=1e-2)


def test_output_written_over_the_input_is_the_same_series() -> None:
    """`out=volume` (the node's pipeline): the noise is measured and each batch read before any
    output lands on it, so the result equals a separate output's."""
    vol = _volume(5)
    engine = _engine(batch_slices=2)
    expected = engine.standardize(vol, _geometry(5), seed=9)
    assert engine.standardize(vol, _geometry(5), seed=9, out=vol) is vol
    np.testing.assert_array_equal(vol, expected)


def test_slice_noise_depends_on_seed_and_index_only() -> None:
    assert slice_seed(5, 0) == slice_seed(5, 0)
    assert len({slice_seed(5, k) for k in range(100)} | {slice_seed(6, 0)}) == 101
    assert 0 <= slice_seed(2**64 - 1, 10**6) < 2**63


def test_regression_mode_is_deterministic_and_ignores_the_seed() -> None:
    engine, vol = _engine(EngineMode.UNETPP_REGRESSION), _volume()
    assert np.array_equal(
        engine.standardize(vol, _geometry(3), seed=1), engine.standardize(vol, _geometry(3), seed=2)
    )


def test_bad_input_is_refused() -> None:
    engine = _engine()
    with pytest.raises(EngineError, match="expected a volume"):
        engine.standardize(np.zeros((4, 4), np.float32), _geometry(1))
    bad = _volume(1)
    bad[0, 0, 0] = np.nan
    with pytest.raises(EngineError, match="NaN"):
        engine.standardize(bad, _geometry(1))


def test_registry_knows_both_learned_kinds_and_loads_them(tmp_path: Path) -> None:
    assert {"linear-filter", "ltdiff", "unetpp-regression"} <= set(KNOWN_ENGINE_KINDS)
    path = tmp_path / "w.safetensors"
    sha = save_weights(path, tiny_weights())
    engine = load_engine("ltdiff", path, "cpu")
    assert engine.identity.weights_sha256 == sha
    with pytest.raises(EngineError, match="configured"):
        load_engine("unetpp-regression", path, "cpu")
    with pytest.raises(EngineError, match="no shipped weights"):
        load_engine("unetpp-regression", None, "cpu")


def test_sampler_options_reach_the_engine_and_its_identity(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, tiny_weights())
    default = load_engine("ltdiff", path, "cpu")
    fast = load_engine("ltdiff", path, "cpu", EngineOptions(sample_steps=2, batch_slices=1))
    assert isinstance(fast, LTDiffEngine) and fast.batch_slices == 1
    assert fast.identity.settings == f"ddim2 eta{tiny_weights().sampling.eta:g}"
    assert default.identity.settings != fast.identity.settings
    vol = _volume(2)
    assert not np.array_equal(
        default.standardize(vol, _geometry(2), seed=3), fast.standardize(vol, _geometry(2), seed=3)
    )
    assert MAX_SAMPLE_STEPS == MAX_STEPS
    assert REGISTRY_PRECISIONS == PRECISIONS
    with pytest.raises(EngineError, match="at most 10 sampling steps"):
        load_engine("ltdiff", path, "cpu", EngineOptions(sample_steps=11))
    with pytest.raises(EngineError, match="takes no sample_steps"):
        load_engine("linear-filter", None, "cpu", EngineOptions(sample_steps=2))


def test_denoiser_precision_follows_the_hardware_and_can_be_forced_to_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import engine.ltdiff.engine as ltdiff_engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(ltdiff_engine, "_cpu_has_native_bf16", lambda: False)
    assert ltdiff_engine.denoiser_autocast_dtype(cpu, "auto") is None
    assert _engine().denoiser_dtype == torch.float32
    monkeypatch.setattr(ltdiff_engine, "_cpu_has_native_bf16", lambda: True)
    assert ltdiff_engine.denoiser_autocast_dtype(cpu, "auto") == torch.bfloat16
    assert ltdiff_engine.denoiser_autocast_dtype(cpu, "float32") is None
    bf16 = LTDiffEngine(tiny_weights(), weights_sha256="0" * 64)
    fp32 = LTDiffEngine(tiny_weights(), weights_sha256="0" * 64, precision="float32")
    assert (bf16.denoiser_dtype, fp32.denoiser_dtype) == (torch.bfloat16, torch.float32)
    vol = _volume(2)
    a = bf16.standardize(vol, _geometry(2), seed=5)
    b = fp32.standardize(vol, _geometry(2), seed=5)
    assert a.dtype == np.float32 and np.all(np.isfinite(a))
    assert np.abs(a - b).mean() < 5.0, "bf16 denoiser, float32 encoder/decoder: close to float32"
    assert np.array_equal(a, bf16.standardize(vol, _geometry(2), seed=5))
    with pytest.raises(EngineError, match="precision"):
        LTDiffEngine(tiny_weights(), weights_sha256="0" * 64, precision="fp8")  # type: ignore[arg-type]


def test_regression_ablation_has_no_sampler_settings() -> None:
    regression = _engine(EngineMode.UNETPP_REGRESSION)
    assert regression.identity.settings == ""
    assert regression.denoiser_dtype is None


def test_linear_filter_stays_the_default_kind() -> None:
    assert KNOWN_ENGINE_KINDS[0] == "linear-filter"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_channels_last_matches_cpu_closely() -> None:
    vol = _volume(2)
    cpu = _engine().standardize(vol, _geometry(2), seed=9)
    gpu = LTDiffEngine(tiny_weights(), weights_sha256="0" * 64, device="cuda").standardize(
        vol, _geometry(2), seed=9
    )
    assert np.abs(cpu - gpu).mean() < 20.0  # bf16 vs float32, same noise from CPU generators
