"""The validated envelope as data (engine/envelope.py), its place in the weights file, and the
series condition of the LTDiff++ denoiser (engine/ltdiff/latent_diffusion.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ltdiff_support import TINY_DENOISER, tiny_weights

from engine.envelope import (
    SeriesMeasurement,
    Span,
    ValidatedEnvelope,
    engine_envelope,
    measure_series,
)
from engine.interface import EngineError, SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.latent_diffusion import LatentDenoiser, series_condition_vector
from engine.ltdiff.weights import load_weights, parse_weights, save_weights
from engine.synthetic import phantom_slice

ENVELOPE = ValidatedEnvelope(
    pixel_spacing_mm=Span(0.625, 0.977),
    slice_thickness_mm=Span(1.0, 1.0),
    rows=Span(512, 512),
    columns=Span(512, 512),
    source_kernels=("Br40d",),
    noise_hu=Span(9.0, 29.0),
    validated_on=("S001", "S004"),
)
INSIDE = SeriesMeasurement(0.703, 1.0, 512, 512, "Br40d", 12.0)


def test_a_series_like_the_training_data_is_inside() -> None:
    assert ENVELOPE.violations(INSIDE) == ()


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (
            {"pixel_spacing_mm": 0.4},
            "pixel spacing 0.400 mm is outside the validated 0.625-0.977 mm",
        ),
        ({"slice_thickness_mm": 5.0}, "slice thickness 5 mm is outside the validated 1 mm"),
        ({"slice_thickness_mm": None}, "slice thickness is not stated"),
        ({"rows": 256, "columns": 256}, "matrix 256x256 is outside"),
        ({"source_kernel": "B30f"}, "source kernel B30f is not one the weights were validated"),
        ({"source_kernel": None}, "source kernel is not stated"),
        ({"noise_hu": 150.0}, "noise level 150.0 HU is outside the validated 9-29 HU"),
        ({"noise_hu": 0.0}, "noise level 0.0 HU is outside"),
        ({"noise_hu": None}, "noise level could not be measured"),
    ],
)
def test_each_quantity_outside_gives_one_readable_reason(change: dict, phrase: str) -> None:
    reasons = ENVELOPE.violations(replace(INSIDE, **change))
    assert len(reasons) == 1
    assert phrase in reasons[0]


def test_header_round_off_at_the_edges_and_kernel_case_are_tolerated() -> None:
    assert ENVELOPE.violations(replace(INSIDE, pixel_spacing_mm=0.9771)) == ()
    assert ENVELOPE.violations(replace(INSIDE, source_kernel=" br40d ")) == ()


def test_json_round_trip_and_strict_parsing() -> None:
    data = json.loads(ENVELOPE.to_json())
    assert ValidatedEnvelope.from_dict(data) == ENVELOPE
    with pytest.raises(ValueError, match="format"):
        ValidatedEnvelope.from_dict({**data, "format": "other"})
    with pytest.raises(ValueError, match="noise_hu"):
        ValidatedEnvelope.from_dict({**data, "noise_hu": [30.0]})
    with pytest.raises(ValueError, match="range"):
        ValidatedEnvelope.from_dict({**data, "noise_hu": [30.0, 9.0]})
    with pytest.raises(ValueError, match="source_kernels"):
        ValidatedEnvelope.from_dict({**data, "source_kernels": []})
    assert "noise 9-29 HU" in ENVELOPE.describe()


def test_weights_carry_their_envelope_and_engines_expose_it(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(path, replace(tiny_weights(), envelope=ENVELOPE))
    weights, sha = load_weights(path)
    assert weights.envelope == ENVELOPE
    engine = LTDiffEngine(weights, weights_sha256=sha)
    assert engine_envelope(engine) == ENVELOPE
    # A file without one (every file before the envelope existed) loads with None.
    save_weights(path, tiny_weights())
    assert load_weights(path)[0].envelope is None
    assert engine_envelope(object()) is None


def test_a_malformed_envelope_in_a_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    bad = replace(tiny_weights(), envelope=ENVELOPE)
    save_weights(path, bad)
    data = path.read_bytes().replace(b"ltdiff-node/envelope/1", b"ltdiff-node/envelope/X")
    with pytest.raises(EngineError, match="envelope format"):
        parse_weights(data, source="w")


def test_measure_series_reads_spacing_matrix_and_noise() -> None:
    rng = np.random.default_rng(0)
    volume = np.stack([phantom_slice(96, 96)] * 3) + rng.normal(0, 20.0, (3, 96, 96))
    m = measure_series(
        volume.astype(np.float32),
        SeriesGeometry((0.7, 0.72), (0.0, 1.0, 2.0)),
        slice_thickness_mm=5.0,
        source_kernel="Br40d",
    )
    assert (m.rows, m.columns, m.slice_thickness_mm) == (96, 96, 5.0)
    assert m.pixel_spacing_mm == pytest.approx(0.71)
    assert m.noise_hu is not None and 15.0 < m.noise_hu < 22.0
    assert m.as_log()["matrix"] == "96x96"


def test_series_condition_is_zero_at_the_reference_and_finite_for_a_noise_free_input() -> None:
    assert series_condition_vector("none", 0.7, 10.0) == []
    assert series_condition_vector("spacing-noise", 0.75, 15.0) == [0.0, 0.0]
    lo = series_condition_vector("spacing-noise", 0.625, 0.0)
    assert all(np.isfinite(lo)) and lo[0] < 0 and lo[1] < 0
    with pytest.raises(ValueError, match="spacing"):
        series_condition_vector("spacing-noise", 0.0, 10.0)


def test_a_conditioned_denoiser_starts_exactly_where_its_unconditioned_weights_were() -> None:
    torch.manual_seed(0)
    plain = LatentDenoiser(TINY_DENOISER)
    with torch.no_grad():
        plain.head.weight.normal_(0.0, 0.05)
    conditioned = LatentDenoiser(replace(TINY_DENOISER, condition="spacing-noise"))
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("series_mlp.") for k in missing) and missing
    z = torch.randn(2, 4, 8, 8)
    c = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    series = torch.tensor([[0.5, -1.0], [-0.3, 2.0]])
    with torch.no_grad():
        assert torch.equal(plain(z, t, c), conditioned(z, t, c, series))
        conditioned.series_mlp[2].weight.fill_(0.1)  # type: ignore[index]
        assert not torch.allclose(plain(z, t, c), conditioned(z, t, c, series))
    with pytest.raises(ValueError, match="series"):
        conditioned(z, t, c)


def test_a_conditioned_engine_depends_on_spacing_and_needs_a_measurable_series() -> None:
    weights = tiny_weights()
    den = LatentDenoiser(replace(TINY_DENOISER, condition="spacing-noise"))
    den.load_state_dict(dict(weights.denoiser_state or {}), strict=False)
    with torch.no_grad():
        den.series_mlp[2].weight.normal_(0.0, 0.5)  # type: ignore[index]
    conditioned = replace(weights, denoiser_config=den.config, denoiser_state=den.state_dict())
    engine = LTDiffEngine(conditioned, weights_sha256="test")
    rng = np.random.default_rng(0)
    volume = (np.stack([phantom_slice(32, 32)] * 2) + rng.normal(0, 15.0, (2, 32, 32))).astype(
        np.float32
    )
    near = engine.standardize(volume, SeriesGeometry((0.7, 0.7), (0.0, 1.0)), seed=3)
    far = engine.standardize(volume, SeriesGeometry((0.95, 0.95), (0.0, 1.0)), seed=3)
    again = engine.standardize(volume, SeriesGeometry((0.7, 0.7), (0.0, 1.0)), seed=3)
    assert np.array_equal(near, again)
    assert not np.allclose(near, far)
    air = np.full((2, 32, 32), -1000.0, dtype=np.float32)
    with pytest.raises(EngineError, match="cannot measure the noise level"):
        engine.standardize(air, SeriesGeometry((0.7, 0.7), (0.0, 1.0)))
