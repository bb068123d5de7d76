"""The decision outside a learned engine's validated envelope (engine/envelope_policy.py), and
the pipeline that applies it, with in-test engines (no torch)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite
from tests_support import chest_envelope, write_series

from dicom_node.engine_host import outside_envelope_fields
from engine.derived import DERIVATION_MARKER, derivation_description, derived_series_uid
from engine.envelope import SeriesMeasurement, ValidatedEnvelope
from engine.envelope_policy import (
    EnvelopeCheck,
    EnvelopePolicy,
    EnvelopeStatus,
    OutsideEnvelope,
    OutsideEnvelopeError,
    choose_engine,
    measure_loaded,
    series_header_values,
)
from engine.interface import (
    EngineError,
    EngineIdentity,
    FloatVolume,
    SeriesGeometry,
    deliver,
)
from engine.noise_level import measure_noise_hu
from engine.pipeline import standardize_series
from engine.series_io import load_series
from engine.synthetic import make_ct_series, phantom_slice

NOW = datetime(2024, 5, 6, 7, 8, 9)
INSIDE = SeriesMeasurement(0.7, 1.0, 512, 512, "Br40d", 12.0)
OUTSIDE = SeriesMeasurement(0.4, 5.0, 512, 512, "Br40d", 0.0)
"""0.4 mm pixels, 5 mm slices and a noise-free (implausible) noise level: three violations."""


class FakeEngine:
    """Adds `offset` HU; `envelope` like a learned engine's (None: like the linear filter)."""

    def __init__(
        self, name: str, envelope: ValidatedEnvelope | None = None, offset: float = 0.0
    ) -> None:
        self.name = name
        self.envelope = envelope
        self.offset = offset
        self.runs = 0
        self.noise_given: list[float | None] = []

    @property
    def identity(self) -> EngineIdentity:
        return EngineIdentity(self.name, "1.0", self.name[0] * 64, "Br40d", "Bl64d")

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        self.runs += 1
        self.noise_given.append(noise_hu)
        return deliver(volume_hu + np.float32(self.offset), out)


class Measure:
    """A measurement that counts its calls."""

    def __init__(self, value: SeriesMeasurement) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> SeriesMeasurement:
        self.calls += 1
        return self.value


def _policy(action: OutsideEnvelope, fallback: FakeEngine | None = None) -> EnvelopePolicy:
    return EnvelopePolicy(action, None if fallback is None else (lambda: fallback))


def test_engine_without_an_envelope_runs_unmeasured_with_status_none():
    engine, measure = FakeEngine("linear-filter"), Measure(OUTSIDE)
    ran, check = choose_engine(engine, measure, _policy(OutsideEnvelope.FAIL))
    assert ran is engine
    assert check.status is EnvelopeStatus.NONE and check.measurement is None
    assert measure.calls == 0, "nothing to check: the series is not measured"
    assert check.derivation_note() == ""
    assert check.as_log()["envelope"] == "none"


@pytest.mark.parametrize("action", list(OutsideEnvelope))
def test_series_inside_the_envelope_runs_the_engine_whatever_the_action(action):
    engine, fallback = FakeEngine("ltdiff++", chest_envelope()), FakeEngine("linear-filter")
    ran, check = choose_engine(engine, Measure(INSIDE), _policy(action, fallback))
    assert ran is engine
    assert (check.status, check.violations, check.ran) == (
        EnvelopeStatus.INSIDE,
        (),
        engine.identity,
    )
    assert check.as_log()["envelope"] == "inside"
    assert "inside the validated envelope of ltdiff++" in check.derivation_note()


def test_outside_with_fallback_runs_the_fallback_engine_and_says_why():
    engine, fallback = FakeEngine("ltdiff++", chest_envelope()), FakeEngine("linear-filter")
    ran, check = choose_engine(
        engine, Measure(OUTSIDE), _policy(OutsideEnvelope.FALLBACK, fallback)
    )
    assert ran is fallback
    assert check.status is EnvelopeStatus.FALLBACK
    assert (check.checked, check.ran) == (engine.identity, fallback.identity)
    assert len(check.violations) == 3, check.violations
    note = check.derivation_note()
    assert note.startswith(f"Input outside the validated envelope of {engine.identity.short} (")
    assert "pixel spacing 0.400 mm is outside the validated 0.6-1 mm" in note
    assert "slice thickness 5 mm" in note and "noise level 0.0 HU" in note
    assert note.endswith("; fallback engine linear-filter.")
    log = check.as_log()
    assert log["envelope"] == "fallback" and log["envelope_action"] == "fallback"
    assert log["pixel_spacing_mm"] == 0.4 and log["slice_thickness_mm"] == 5.0
    assert log["matrix"] == "512x512" and log["noise_hu"] == 0.0
    assert log["source_kernel"] == "Br40d"


def test_outside_with_fail_raises_a_readable_engine_error_naming_engine_and_violations():
    engine = FakeEngine("ltdiff++", chest_envelope())
    with pytest.raises(OutsideEnvelopeError) as caught:
        choose_engine(engine, Measure(OUTSIDE), _policy(OutsideEnvelope.FAIL))
    error = caught.value
    assert isinstance(error, EngineError) and isinstance(error, RuntimeError)
    message = str(error)
    assert engine.identity.short in message
    for violation in error.check.violations:
        assert violation in message
    assert len(error.check.violations) == 3
    assert "outside_envelope = fail" in message
    assert "'" not in message, "no quotes: the node's redaction would hide quoted text"
    assert error.check.status is EnvelopeStatus.OUTSIDE_FAILED and error.check.ran is None


def test_outside_with_process_runs_the_engine_and_marks_it():
    engine = FakeEngine("ltdiff++", chest_envelope())
    ran, check = choose_engine(engine, Measure(OUTSIDE), _policy(OutsideEnvelope.PROCESS))
    assert ran is engine
    assert check.status is EnvelopeStatus.OUTSIDE_PROCESSED
    assert check.derivation_note().startswith(
        f"Processed outside the validated envelope of {engine.identity.short}"
    )
    assert "pixel spacing 0.400 mm" in check.derivation_note()


def test_a_fallback_outside_its_own_envelope_fails_without_a_second_fallback():
    engine = FakeEngine("ltdiff++", chest_envelope())
    fallback = FakeEngine("other-model", chest_envelope(noise_hu=(1.0, 50.0)))
    with pytest.raises(OutsideEnvelopeError) as caught:
        choose_engine(engine, Measure(OUTSIDE), _policy(OutsideEnvelope.FALLBACK, fallback))
    check = caught.value.check
    assert check.status is EnvelopeStatus.OUTSIDE_FAILED
    assert check.fallback_violations and check.ran is None
    assert "also outside the validated envelope of the fallback engine" in str(caught.value)
    assert fallback.runs == 0


def test_a_fallback_with_an_envelope_the_series_fits_runs():
    engine = FakeEngine("ltdiff++", chest_envelope())
    wide = ValidatedEnvelope.from_dict(
        {
            "format": "ltdiff-node/envelope/1",
            "pixel_spacing_mm": [0.3, 1.0],
            "slice_thickness_mm": [0.5, 6.0],
            "rows": [64, 512],
            "columns": [64, 512],
            "source_kernels": ["Br40d"],
            "noise_hu": [0.0, 50.0],
        }
    )
    fallback = FakeEngine("wide-model", wide)
    ran, check = choose_engine(
        engine, Measure(OUTSIDE), _policy(OutsideEnvelope.FALLBACK, fallback)
    )
    assert ran is fallback and check.status is EnvelopeStatus.FALLBACK


def test_the_fallback_is_loaded_only_when_needed():
    loads = []

    def load() -> FakeEngine:
        loads.append(1)
        return FakeEngine("linear-filter")

    engine = FakeEngine("ltdiff++", chest_envelope())
    choose_engine(engine, Measure(INSIDE), EnvelopePolicy(OutsideEnvelope.FALLBACK, load))
    assert loads == []
    choose_engine(engine, Measure(OUTSIDE), EnvelopePolicy(OutsideEnvelope.FALLBACK, load))
    assert loads == [1]


def test_outside_envelope_log_fields_only_for_series_outside():
    engine, fallback = FakeEngine("ltdiff++", chest_envelope()), FakeEngine("linear-filter")
    _, inside = choose_engine(engine, Measure(INSIDE), _policy(OutsideEnvelope.FALLBACK, fallback))
    assert outside_envelope_fields(inside.as_log()) is None
    _, check = choose_engine(engine, Measure(OUTSIDE), _policy(OutsideEnvelope.FALLBACK, fallback))
    summary = {**check.as_log(), "engine": fallback.identity.short, "slices_in": 3}
    fields = outside_envelope_fields(summary)
    assert fields is not None
    assert fields["action"] == "fallback" and fields["outcome"] == "fallback"
    assert fields["engine"] == engine.identity.short
    assert fields["ran_engine"] == fallback.identity.short
    assert fields["violations"] == list(check.violations)
    assert fields["pixel_spacing_mm"] == 0.4 and "slices_in" not in fields


def test_long_violations_keep_the_derivation_description_within_st_length():
    identity = EngineIdentity("ltdiff++", "1.0", "a" * 64, "Br40d", "Bl64d", "ddim8 eta0")
    check = EnvelopeCheck(
        EnvelopeStatus.OUTSIDE_PROCESSED,
        OutsideEnvelope.PROCESS,
        identity,
        identity,
        OUTSIDE,
        tuple(f"violation number {i} " * 10 for i in range(10)),
    )
    text = derivation_description(identity, check.derivation_note())
    assert len(text) <= 1024
    assert text.startswith(DERIVATION_MARKER) and text.endswith("...")
    assert "Processed outside the validated envelope" in text


# ---- measuring a series from its files ------------------------------------------------------


def _write(directory: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def test_series_measurement_reads_thickness_and_the_first_kernel_value(tmp_path):
    datasets = make_ct_series(3, 64, 64, pixel_spacing=(0.4, 0.4), slice_thickness=5.0)
    for ds in datasets:
        ds.ConvolutionKernel = ["Br40d", "3"]  # kernel and strength (Siemens ADMIRE)
    loaded = load_series(_write(tmp_path / "multi", datasets))
    assert series_header_values(loaded) == (5.0, "Br40d")
    m = measure_loaded(loaded)
    assert (m.pixel_spacing_mm, m.slice_thickness_mm, m.rows, m.columns) == (0.4, 5.0, 64, 64)
    assert m.noise_hu == 0.0, "the synthetic phantom is noise-free"

    for ds in datasets:
        del ds.SliceThickness
        del ds.ConvolutionKernel
    loaded = load_series(_write(tmp_path / "absent", datasets))
    assert series_header_values(loaded) == (None, None)
    violations = chest_envelope().violations(measure_loaded(loaded))
    assert any("SliceThickness absent" in v for v in violations)
    assert any("ConvolutionKernel absent" in v for v in violations)


def _noisy(n: int = 3, size: int = 64, sd: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(7)
    volume = np.stack([phantom_slice(size, size, i / max(n - 1, 1)) for i in range(n)])
    return (volume + rng.normal(0.0, sd, volume.shape)).astype(np.float32)


def test_pipeline_runs_the_fallback_on_a_series_outside_and_names_it_in_the_headers(tmp_path):
    paths = write_series(
        tmp_path / "thick",
        n_slices=3,
        pixel_spacing=(0.4, 0.4),
        slice_thickness=5.0,
        slice_spacing=5.0,
    )
    engine = FakeEngine("ltdiff++", chest_envelope(), offset=1.0)
    fallback = FakeEngine("linear-filter", offset=2.0)
    policy = _policy(OutsideEnvelope.FALLBACK, fallback)
    result = standardize_series(paths, engine, now=NOW, envelope=policy)
    assert (engine.runs, fallback.runs) == (0, 1)
    assert result.identity == fallback.identity
    assert result.envelope is not None and result.envelope.status is EnvelopeStatus.FALLBACK
    assert result.series_instance_uid == derived_series_uid(
        str(pydicom.dcmread(paths[0]).SeriesInstanceUID), fallback.identity
    ), "the derived Series UID follows the engine that ran"
    description = str(result.datasets[0].DerivationDescription)
    assert "-like by linear-filter 1.0" in description
    assert f"outside the validated envelope of {engine.identity.short}" in description
    assert "pixel spacing 0.400 mm is outside" in description
    assert description.endswith("fallback engine linear-filter.")
    assert len(description) <= 1024


def test_pipeline_inside_the_envelope_runs_the_engine(tmp_path):
    paths = write_series(tmp_path / "inside", n_slices=3, volume_hu=_noisy())
    engine = FakeEngine("ltdiff++", chest_envelope(), offset=1.0)
    fallback = FakeEngine("linear-filter")
    result = standardize_series(
        paths, engine, now=NOW, envelope=_policy(OutsideEnvelope.FAIL, fallback)
    )
    assert (engine.runs, fallback.runs) == (1, 0)
    assert result.envelope is not None and result.envelope.status is EnvelopeStatus.INSIDE
    noise = result.envelope.measurement.noise_hu if result.envelope.measurement else None
    assert noise is not None and 15.0 < noise < 25.0, noise
    assert "Input inside the validated envelope of ltdiff++." in str(
        result.datasets[0].DerivationDescription
    )


def test_pipeline_hands_the_envelope_noise_measurement_to_the_engine(tmp_path):
    """The envelope check measured the noise of the very volume the engine gets, with the
    function the engine would use: the engine receives it rather than measuring again."""
    paths = write_series(tmp_path / "inside", n_slices=3, volume_hu=_noisy())
    engine = FakeEngine("ltdiff++", chest_envelope())
    result = standardize_series(paths, engine, now=NOW, envelope=_policy(OutsideEnvelope.FAIL))
    loaded = load_series(paths)
    expected = measure_noise_hu(loaded.volume_hu, float(np.mean(loaded.geometry.pixel_spacing_mm)))
    assert result.envelope is not None and result.envelope.measurement is not None
    assert engine.noise_given == [expected] == [result.envelope.measurement.noise_hu]
    unchecked = FakeEngine("ltdiff++", chest_envelope())
    standardize_series(paths, unchecked, now=NOW)
    assert unchecked.noise_given == [None], "without a check the engine measures it itself"


def test_pipeline_without_a_policy_does_not_check_the_envelope(tmp_path):
    paths = write_series(tmp_path / "thick", n_slices=2, pixel_spacing=(0.4, 0.4))
    engine = FakeEngine("ltdiff++", chest_envelope())
    result = standardize_series(paths, engine, now=NOW)
    assert engine.runs == 1 and result.envelope is None
    assert "envelope" not in str(result.datasets[0].DerivationDescription)


def test_pipeline_fail_writes_nothing_and_raises(tmp_path):
    paths = write_series(tmp_path / "thick", n_slices=2, pixel_spacing=(0.4, 0.4))
    engine = FakeEngine("ltdiff++", chest_envelope())
    with pytest.raises(OutsideEnvelopeError, match=r"pixel spacing 0\.400 mm"):
        standardize_series(paths, engine, now=NOW, envelope=_policy(OutsideEnvelope.FAIL))
    assert engine.runs == 0
