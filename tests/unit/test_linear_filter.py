"""The linear kernel-conversion engine: filtering physics, weights file format, registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from dicom_node.phantom import render_phantom
from engine.interface import Engine, EngineError, SeriesGeometry
from engine.linear_filter import (
    CHUNK_SLICES,
    LinearFilter,
    LinearFilterEngine,
    MirrorPadding,
    load_linear_filter,
    save_linear_filter,
    shipped_weights_path,
)
from engine.registry import KNOWN_ENGINE_KINDS, load_engine


def ramp_filter(f_max: float = 1.0, n: int = 51) -> LinearFilter:
    """G(f) = 1 + 4 f on [0, f_max]: easy to check at any frequency."""
    freq = np.linspace(0.0, f_max, n)
    return LinearFilter(
        frequency_lp_per_mm=freq,
        gain=1.0 + 4.0 * freq,
        coherence=np.ones(n),
        counts=np.full(n, 10, dtype=np.int64),
        source_kernel="Br40d",
        target_kernel="Bl64d",
        fit_settings={"method": "test"},
        training_data={"subjects": []},
    )


def engine_of(linear_filter: LinearFilter) -> LinearFilterEngine:
    return LinearFilterEngine(linear_filter, weights_sha256="0" * 64)


def geometry(spacing: tuple[float, float], n: int) -> SeriesGeometry:
    return SeriesGeometry(spacing, tuple(float(i) for i in range(n)))


def cosine_amplitude(image: np.ndarray, x_mm: np.ndarray, f: float) -> float:
    """Least-squares amplitude of cos/sin at frequency f along the last axis, central region."""
    basis = np.stack(
        [np.cos(2 * np.pi * f * x_mm), np.sin(2 * np.pi * f * x_mm), np.ones_like(x_mm)]
    )
    centre = image[image.shape[0] // 2, image.shape[1] // 4 : 3 * image.shape[1] // 4]
    coef, *_ = np.linalg.lstsq(basis[:, image.shape[1] // 4 : 3 * image.shape[1] // 4].T, centre)
    return float(np.hypot(coef[0], coef[1]))


@pytest.mark.parametrize("spacing_mm", [0.5, 0.703125, 0.9])
def test_filter_respects_pixel_spacing(spacing_mm: float) -> None:
    f = 0.3  # lp/mm, below every grid's Nyquist frequency
    cols = 160
    x_mm = np.arange(cols) * spacing_mm
    image = np.tile(100.0 * np.cos(2 * np.pi * f * x_mm), (64, 1)).astype(np.float32)
    out = engine_of(ramp_filter()).standardize(image[None], geometry((spacing_mm, spacing_mm), 1))
    amplitude = cosine_amplitude(out[0], x_mm, f)
    assert amplitude == pytest.approx(100.0 * (1 + 4 * f), rel=0.02), (
        f"at {spacing_mm} mm the 0.3 lp/mm gain should be G(0.3) = 2.2, got {amplitude / 100:.3f}"
    )


def test_anisotropic_spacing_uses_column_spacing_along_rows() -> None:
    row_mm, col_mm, f = 0.5, 0.8, 0.25
    x_mm = np.arange(140) * col_mm
    image = np.tile(50.0 * np.cos(2 * np.pi * f * x_mm), (100, 1)).astype(np.float32)
    out = engine_of(ramp_filter()).standardize(image[None], geometry((row_mm, col_mm), 1))
    assert out.shape == (1, 100, 140)
    assert cosine_amplitude(out[0], x_mm, f) == pytest.approx(50.0 * 2.0, rel=0.02)


def test_constant_volume_is_unchanged_whatever_the_offset() -> None:
    volume = np.full((3, 40, 70), -1000.0, dtype=np.float32)
    out = engine_of(ramp_filter()).standardize(volume, geometry((0.7, 0.7), 3))
    np.testing.assert_allclose(out, -1000.0, atol=0.01)


def test_standardize_preserves_mean_hu_in_uniform_region() -> None:
    rng = np.random.default_rng(1)
    volume = (40.0 + 10.0 * rng.standard_normal((2, 256, 256))).astype(np.float32)
    volume[:, :, :40] = -1000.0  # air at one side must not leak into the centre
    engine = LinearFilterEngine.from_file(shipped_weights_path())
    out = engine.standardize(volume, geometry((0.703125, 0.703125), 2))
    centre = np.s_[:, 96:160, 128:192]
    assert float(out[centre].mean()) == pytest.approx(float(volume[centre].mean()), abs=1.0)


def test_output_noise_rises_towards_target() -> None:
    phantom = render_phantom(n_slices=2, size=256, seed=3)
    engine = LinearFilterEngine.from_file(shipped_weights_path())
    out = engine.standardize(phantom.hu, geometry((0.703125, 0.703125), 2))
    roi = phantom.uniform_roi
    sd_in = float(np.std(phantom.hu[roi]))
    sd_out = float(np.std(out[roi]))
    # Bl64d noise is ~3.6x Br40d; a linear filter reproduces the part below the Br40 cutoff.
    assert 2.3 < sd_out / sd_in < 4.5, f"noise SD {sd_in:.1f} -> {sd_out:.1f} HU"
    assert float(out[roi].mean()) == pytest.approx(float(phantom.hu[roi].mean()), abs=2.0)


def test_standardize_is_deterministic_float32_and_independent_of_chunking() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 100, (CHUNK_SLICES + 3, 48, 40)).astype(np.float32)
    engine = engine_of(ramp_filter())
    geo = geometry((0.7, 0.7), volume.shape[0])
    out = engine.standardize(volume, geo, seed=1)
    assert out.dtype == np.float32
    assert out.shape == volume.shape
    np.testing.assert_array_equal(out, engine.standardize(volume, geo, seed=2))
    single = engine.standardize(volume[-1:], geometry((0.7, 0.7), 1))
    np.testing.assert_allclose(out[-1:], single, atol=1e-3)


@pytest.mark.parametrize(
    ("n_slices", "rows", "cols", "spacing"),
    [
        (CHUNK_SLICES + 3, 48, 40, (0.7, 0.7)),  # odd count in the last chunk: a slice pairs with 0
        (1, 37, 51, (0.5, 0.9)),  # odd sizes, anisotropic spacing
        (4, 2, 3, (1.0, 1.0)),  # the smallest slices the engine takes
    ],
)
def test_torch_and_numpy_ffts_give_the_same_filter(
    n_slices: int, rows: int, cols: int, spacing: tuple[float, float]
) -> None:
    """The torch path filters two slices per complex FFT (their gain is real and even); it must
    give numpy's rfft2 result, slice by slice, to float32 round-off."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    volume = rng.normal(-200, 300, (n_slices, rows, cols)).astype(np.float32)
    geo = geometry(spacing, n_slices)
    with_numpy = LinearFilterEngine(ramp_filter(), weights_sha256="0" * 64, fft="numpy")
    with_torch = LinearFilterEngine(ramp_filter(), weights_sha256="0" * 64, fft="torch")
    expected = with_numpy.standardize(volume, geo)
    got = with_torch.standardize(volume, geo)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=0.02, rtol=0)
    # Each slice is its own: a slice filtered alone equals the same slice filtered in a stack.
    np.testing.assert_allclose(
        with_torch.standardize(volume[-1:], geometry(spacing, 1)), expected[-1:], atol=0.02
    )


@pytest.mark.parametrize(("rows", "cols"), [(2, 3), (13, 7), (40, 37), (512, 512)])
def test_mirror_padding_in_place_matches_numpy_symmetric_pad(rows: int, cols: int) -> None:
    """The torch path pads inside its complex buffer (`fill_border`); it must put the same pixels
    there as np.pad(mode="symmetric"), also where the border is wider than the slice (13 rows
    get 12 above and 15 below)."""
    padding = MirrorPadding.around(rows, cols)
    stack = np.random.default_rng(2).normal(size=(3, rows, cols)).astype(np.float32)
    expected = padding.pad(stack)
    frames = np.zeros((3, *padding.padded_shape), dtype=np.complex64)
    frames.real[(slice(None), *padding.inside)] = stack
    frames.imag[(slice(None), *padding.inside)] = -stack
    padding.fill_border(frames)
    np.testing.assert_array_equal(frames.real, expected)
    np.testing.assert_array_equal(frames.imag, -expected)


@pytest.mark.parametrize("fft", ["torch", "numpy"])
def test_output_can_be_written_over_the_input(fft: str) -> None:
    """`out=volume` (what the node's pipeline does) gives the same pixels as a new output."""
    if fft == "torch":
        pytest.importorskip("torch")
    volume = np.random.default_rng(3).normal(0, 100, (CHUNK_SLICES + 5, 30, 26))
    volume = volume.astype(np.float32)
    engine = LinearFilterEngine(ramp_filter(), weights_sha256="0" * 64, fft=fft)  # type: ignore[arg-type]
    geo = geometry((0.7, 0.8), volume.shape[0])
    expected = engine.standardize(volume, geo)
    separate = np.full_like(volume, np.nan)
    assert engine.standardize(volume, geo, out=separate) is separate
    np.testing.assert_array_equal(separate, expected)
    assert engine.standardize(volume, geo, out=volume) is volume
    np.testing.assert_array_equal(volume, expected)


def test_an_unusable_output_buffer_is_refused() -> None:
    engine = engine_of(ramp_filter())
    volume = np.zeros((4, 8, 8), np.float32)
    geo = geometry((0.7, 0.7), 4)
    with pytest.raises(EngineError, match="output buffer"):
        engine.standardize(volume, geo, out=np.zeros((4, 8, 8), np.float64))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="output buffer"):
        engine.standardize(volume, geo, out=np.zeros((3, 8, 8), np.float32))
    bigger = np.zeros((5, 8, 8), np.float32)
    with pytest.raises(EngineError, match="partly overlaps"):
        engine.standardize(bigger[:4], geo, out=bigger[1:])


def test_an_unknown_fft_backend_is_refused() -> None:
    with pytest.raises(EngineError, match="FFT backend"):
        LinearFilterEngine(ramp_filter(), weights_sha256="0" * 64, fft="fftw")  # type: ignore[arg-type]


def test_standardize_rejects_bad_input() -> None:
    engine = engine_of(ramp_filter())
    with pytest.raises(EngineError, match="shape"):
        engine.standardize(np.zeros((8, 8), np.float32), geometry((0.7, 0.7), 1))
    with pytest.raises(EngineError, match="NaN"):
        engine.standardize(np.full((1, 8, 8), np.nan, np.float32), geometry((0.7, 0.7), 1))
    with pytest.raises(EngineError, match="spacing"):
        engine.standardize(np.zeros((1, 8, 8), np.float32), geometry((0.0, 0.7), 1))


def test_gain_rolls_off_to_zero_above_fitted_range() -> None:
    lf = ramp_filter(f_max=0.8)
    g = lf.gain_at([0.8, 0.85, 0.9, 1.2])
    assert g[0] == pytest.approx(1 + 4 * 0.8)
    assert 0 < g[1] < g[0]
    assert g[2] == pytest.approx(0.0, abs=1e-12)
    assert g[3] == 0.0


def test_weights_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    sha = save_linear_filter(path, ramp_filter(), created="2026-01-01T00:00:00+00:00")
    loaded = load_linear_filter(path)
    np.testing.assert_allclose(loaded.gain, ramp_filter().gain, rtol=1e-6)
    assert loaded.fit_settings == {"method": "test"}
    engine = LinearFilterEngine.from_file(path)
    assert engine.identity.weights_sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (engine.identity.source_kernel, engine.identity.target_kernel) == ("Br40d", "Bl64d")


def _tensors(n: int = 5) -> dict[str, np.ndarray]:
    return {
        "frequency_lp_per_mm": np.linspace(0, 1, n).astype(np.float32),
        "gain": np.ones(n, np.float32),
        "coherence": np.ones(n, np.float32),
        "counts": np.ones(n, np.int64),
    }


def _metadata(**overrides: str) -> dict[str, str]:
    meta = {
        "format": "ltdiff-node/linear-filter",
        "format_version": "1",
        "engine_kind": "linear-filter",
        "source_kernel": "Br40d",
        "target_kernel": "Bl64d",
        "fit_settings": "{}",
        "training_data": "{}",
        "code_version": "0",
        "created": "2026-01-01",
    }
    meta.update(overrides)
    return meta


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (_metadata(engine_kind="ltdiff"), "engine_kind is 'ltdiff', expected 'linear-filter'"),
        (_metadata(format="other/format"), "format is 'other/format'"),
        (_metadata(format_version="2"), "format_version is '2', expected '1'"),
        ({k: v for k, v in _metadata().items() if k != "source_kernel"}, "lacks"),
    ],
)
def test_strict_load_rejects_wrong_kind_format_or_version(
    tmp_path: Path, metadata: dict[str, str], message: str
) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_save(_tensors(), metadata=metadata))
    with pytest.raises(EngineError, match=message):
        LinearFilterEngine.from_file(path)


def test_strict_load_rejects_wrong_tensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = _tensors()
    tensors["gain"] = np.ones(4, np.float32)
    path.write_bytes(safetensors_save(tensors, metadata=_metadata()))
    with pytest.raises(EngineError, match=r"'gain' has shape \(4,\), expected \(5,\)"):
        LinearFilterEngine.from_file(path)
    tensors = _tensors()
    del tensors["coherence"]
    path.write_bytes(safetensors_save(tensors, metadata=_metadata()))
    with pytest.raises(EngineError, match="tensors are"):
        LinearFilterEngine.from_file(path)


def test_strict_load_rejects_non_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not a weights file at all")
    with pytest.raises(EngineError, match="not a safetensors file"):
        LinearFilterEngine.from_file(path)


def test_shipped_weights_load_and_identity_has_hash() -> None:
    path = shipped_weights_path()
    assert path.stat().st_size < 16_000, "the shipped filter should be a few KB"
    engine = load_engine("linear-filter", None)
    assert isinstance(engine, Engine)
    identity = engine.identity
    assert identity.name == "linear-filter"
    assert identity.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (identity.source_kernel, identity.target_kernel) == ("Br40d", "Bl64d")
    lf = load_linear_filter(path)
    assert lf.gain[0] == 1.0
    # Br40d -> Bl64d sharpens: the gain rises with frequency through the Br40 passband.
    g = lf.gain_at([0.1, 0.3, 0.5])
    assert 1.0 < g[0] < g[1] < g[2]
    assert set(json.loads(json.dumps(lf.training_data))["subjects"]).isdisjoint({"S004", "S005"})


def test_registry_loads_explicit_weights_and_rejects_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_linear_filter(path, ramp_filter())
    assert load_engine("linear-filter", path).identity.source_kernel == "Br40d"
    assert "linear-filter" in KNOWN_ENGINE_KINDS
    with pytest.raises(EngineError, match="known kinds: linear-filter"):
        load_engine("no-such-engine", None)
