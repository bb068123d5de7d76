"""Precision of the LTDiff++ engine: bf16 only in the non-linear bodies, float32 where values are
carried exactly (the autoencoder's linear shortcuts), float32 everywhere on a CPU without bf16."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ltdiff_support import TINY_AE, tiny_weights
from torch import Tensor, nn

import engine.ltdiff.engine as ltdiff_engine
from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine, Precision
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder
from engine.ltdiff.weights import EngineMode, load_weights, shipped_weights_path
from engine.synthetic import phantom_slice

CPU = torch.device("cpu")


def _volume(n: int = 2, size: int = 32, noise: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = np.stack([phantom_slice(size, size, k / max(n - 1, 1)) for k in range(n)])
    return (vol + rng.normal(0, noise, vol.shape)).astype(np.float32)


def _geometry(n: int) -> SeriesGeometry:
    return SeriesGeometry((0.7, 0.7), tuple(float(k) for k in range(n)))


def test_precision_modes_choose_bf16_per_part_only_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ltdiff_engine, "_cpu_has_native_bf16", lambda: True)
    bf16, f32 = torch.bfloat16, None
    expected: dict[Precision, tuple[torch.dtype | None, torch.dtype | None]] = {
        "auto": (bf16, bf16),
        "bf16": (bf16, bf16),
        "denoiser-bf16": (bf16, f32),
        "float32": (f32, f32),
    }
    for precision, (denoiser, bodies) in expected.items():
        got = (
            ltdiff_engine.denoiser_autocast_dtype(CPU, precision),
            ltdiff_engine.autoencoder_autocast_dtype(CPU, precision),
        )
        assert got == (denoiser, bodies), f"precision {precision!r}"
    engine = LTDiffEngine(tiny_weights(), weights_sha256="0" * 64)
    assert engine.autoencoder_dtype == torch.bfloat16
    monkeypatch.setattr(ltdiff_engine, "_cpu_has_native_bf16", lambda: False)
    for precision in expected:
        assert ltdiff_engine.autoencoder_autocast_dtype(CPU, precision) is None, precision


@pytest.mark.parametrize("mode", [EngineMode.LTDIFF, EngineMode.UNETPP_REGRESSION])
def test_bf16_precision_on_a_cpu_without_native_bf16_is_exactly_float32(
    monkeypatch: pytest.MonkeyPatch, mode: EngineMode
) -> None:
    monkeypatch.setattr(ltdiff_engine, "_cpu_has_native_bf16", lambda: False)
    vol = _volume()
    outputs = {}
    for precision in ("auto", "bf16", "float32"):
        engine = LTDiffEngine(tiny_weights(mode), weights_sha256="0" * 64, precision=precision)
        assert engine.autoencoder_dtype == torch.float32
        outputs[precision] = engine.standardize(vol, _geometry(2), seed=3)
    assert np.array_equal(outputs["bf16"], outputs["float32"]), "bf16 emulated instead of float32"
    assert np.array_equal(outputs["auto"], outputs["float32"])


def _record_dtypes(model: nn.Module, names: list[str]) -> dict[str, list[torch.dtype]]:
    seen: dict[str, list[torch.dtype]] = {}
    modules = dict(model.named_modules())
    for name in names:

        def hook(_: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            seen[name] = [args[0].dtype, out.dtype]

        modules[name].register_forward_hook(hook)
    return seen


def test_bf16_bodies_keep_the_shortcuts_their_inputs_and_the_sums_in_float32() -> None:
    torch.manual_seed(0)
    model = UNetPlusPlusAutoencoder(TINY_AE).eval()
    exact = ["encoder_shortcut", "to_latent", "decoder_shortcut", "heads.0", "heads.1"]
    body = ["encoder.nodes.x0_0.conv1", "decoder.nodes.x0_0.conv1", "from_latent"]
    seen = _record_dtypes(model, exact + body)
    x = torch.from_numpy(_volume(2, 32)[:, None] / 1000.0)
    with torch.inference_mode():
        z = model.encode(x, torch.bfloat16)
        y = model.decode(z, torch.bfloat16)
    for name in exact:
        assert seen[name] == [torch.float32, torch.float32], f"{name} computed in {seen[name]}"
    for name in body:
        assert seen[name][1] == torch.bfloat16, f"the body ({name}) did not run in bf16"
    assert (z.dtype, y.dtype) == (torch.float32, torch.float32)


def test_bf16_bodies_do_not_round_what_the_shortcuts_carry() -> None:
    """With the non-linear contributions zeroed, E and D are their linear shortcuts alone (a
    lossless 2 x 2 rearrangement): the bf16 mode must then reproduce float32 bit for bit, which
    it would not if the input, the latent or the sums were rounded to bf16."""
    torch.manual_seed(0)
    model = UNetPlusPlusAutoencoder(TINY_AE).eval()
    with torch.no_grad():
        model.to_latent.weight.zero_()
        if model.to_latent.bias is not None:
            model.to_latent.bias.zero_()
    x = torch.from_numpy(_volume(2, 32)[:, None] / 1000.0 + 0.123456789)
    with torch.inference_mode():
        reference = model.decode(model.encode(x))
        mixed = model.decode(model.encode(x, torch.bfloat16), torch.bfloat16)
    assert torch.equal(reference, x), "the shortcut round trip is not the identity"
    assert torch.equal(mixed, reference)


def _br40_like(n: int, size: int) -> np.ndarray:
    """Phantom slices, blurred, with correlated noise of about 12 HU (Br40d-like grain)."""
    rng = np.random.default_rng(1)
    f = np.fft.fftfreq(size, d=0.7)
    fr = np.hypot(f[:, None], f[None, :])
    out = []
    for k in range(n):
        clean = phantom_slice(size, size, k / max(n - 1, 1)).astype(np.float64)
        blurred = np.fft.ifft2(np.fft.fft2(clean) * np.exp(-((fr / 0.456) ** 2))).real
        grain = np.fft.ifft2(
            np.fft.fft2(rng.standard_normal((size, size)))
            * np.sqrt(fr)
            * np.exp(-((fr / 0.54) ** 2))
        ).real
        out.append(blurred + grain * 12.0 / grain.std())
    return np.stack(out).astype(np.float32)


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels of `mask` whose whole (2r+1)^2 neighbourhood is in `mask` (flat water, no edge)."""
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


@pytest.mark.skipif(
    not ltdiff_engine._cpu_has_native_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): precision 'bf16' is float32 here, "
    "exactly (test_bf16_precision_on_a_cpu_without_native_bf16_is_exactly_float32)",
)
def test_bf16_bodies_stay_hundredths_of_a_hu_from_float32_with_the_shipped_weights() -> None:
    weights, sha = load_weights(shipped_weights_path())
    regression = dataclasses.replace(
        weights,
        mode=EngineMode.UNETPP_REGRESSION,
        denoiser_config=None,
        denoiser_state=None,
        schedule_config=None,
    )
    n, size = 2, 192
    vol = _br40_like(n, size)
    geometry = _geometry(n)
    # The autoencoder round trip, D(E(x)): its bodies are the only thing in bf16.
    out = {
        p: LTDiffEngine(regression, weights_sha256=sha, precision=p).standardize(vol, geometry)
        for p in ("bf16", "float32")
    }
    diff = out["bf16"].astype(np.float64) - out["float32"]
    rms, worst = float(np.sqrt((diff**2).mean())), float(np.abs(diff).max())
    assert rms < 0.05 and worst < 0.5, f"bf16 bodies moved D(E(x)) by {rms:.3f} HU RMS, max {worst}"
    # The full engine, one step: the noise of the result in the water disc is unchanged.
    water = np.stack([_eroded(phantom_slice(size, size, k / (n - 1)) == 0.0, 8) for k in range(n)])
    sds = {
        p: LTDiffEngine(weights, weights_sha256=sha, num_steps=1, precision=p)
        .standardize(vol, geometry, seed=7)[water]
        .std()
        for p in ("bf16", "denoiser-bf16")
    }
    ratio = sds["bf16"] / sds["denoiser-bf16"]
    assert abs(ratio - 1.0) < 0.005, f"noise SD ratio bf16 / float32 E and D: {ratio:.4f}"
