"""The standardize_series / write_series path with trivial in-test engines."""

from __future__ import annotations

import errno
import itertools
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite

from engine import durable
from engine.derived import DerivedSeriesOptions
from engine.interface import (
    Engine,
    EngineError,
    EngineIdentity,
    FloatVolume,
    SeriesGeometry,
    deliver,
)
from engine.pipeline import seed_for_series, standardize_series, write_series
from engine.series_io import SeriesError, load_series
from engine.synthetic import make_ct_series

NOW = datetime(2024, 5, 6, 7, 8, 9)


class IdentityEngine:
    """Returns its input plus `offset_hu`; records the seed and geometry it was given and
    whether it was asked to write over its input."""

    def __init__(self, offset_hu: float = 0.0) -> None:
        self.offset_hu = np.float32(offset_hu)
        self.seeds: list[int] = []
        self.geometries: list[SeriesGeometry] = []
        self.over_input: list[bool] = []

    @property
    def identity(self) -> EngineIdentity:
        return EngineIdentity("identity", "0.0.1", "f" * 64, "Br40d", "Bl64d")

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        self.seeds.append(seed)
        self.geometries.append(geometry)
        self.over_input.append(out is volume_hu)
        return deliver(volume_hu + self.offset_hu, out)


class ShapeBreakingEngine(IdentityEngine):
    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        return volume_hu[:, :-1, :].copy()


def _source(tmp_path: Path, n: int = 4) -> list[Path]:
    paths = []
    for i, ds in enumerate(make_ct_series(n, 24, 24)):
        path = tmp_path / "in" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def test_identity_engine_satisfies_the_engine_protocol():
    assert isinstance(IdentityEngine(), Engine)


def test_pipeline_round_trip_with_identity_engine_keeps_hu(tmp_path):
    paths = _source(tmp_path)
    engine = IdentityEngine()
    result = standardize_series(paths, engine, DerivedSeriesOptions(), now=NOW)
    assert result.n_slices == 4 == len(result.datasets)
    assert result.clipped_pixels == 0
    assert result.identity == engine.identity
    assert min(result.timings.decode_ms, result.timings.engine_ms, result.timings.encode_ms) >= 0
    written = write_series(result.datasets, tmp_path / "out")
    assert [p.name for p in written] == [f"{ds.SOPInstanceUID}.dcm" for ds in result.datasets]
    source, derived = load_series(paths), load_series(written)
    np.testing.assert_allclose(derived.volume_hu, source.volume_hu, atol=0.5)
    assert derived.series_instance_uid == result.series_instance_uid
    assert engine.geometries[0] == source.geometry


def test_seed_derived_from_source_series_uid_unless_given(tmp_path):
    paths = _source(tmp_path, n=1)
    engine = IdentityEngine()
    first = standardize_series(paths, engine, now=NOW)
    standardize_series(paths, engine, now=NOW, seed=7)
    expected = seed_for_series(first.source_series_instance_uid)
    assert engine.seeds == [expected, 7]
    assert first.seed == expected
    assert 0 <= expected < 2**64


def test_rerun_gives_same_uids(tmp_path):
    paths = _source(tmp_path, n=2)
    first = standardize_series(paths, IdentityEngine(), now=NOW)
    second = standardize_series(paths, IdentityEngine())
    assert first.series_instance_uid == second.series_instance_uid
    assert [d.SOPInstanceUID for d in first.datasets] == [d.SOPInstanceUID for d in second.datasets]


def test_our_own_output_is_refused(tmp_path):
    result = standardize_series(_source(tmp_path, n=2), IdentityEngine(), now=NOW)
    written = write_series(result.datasets, tmp_path / "out")
    with pytest.raises(SeriesError, match="ltdiff-node output"):
        standardize_series(written, IdentityEngine())


def test_engine_returning_wrong_shape_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="shape"):
        standardize_series(_source(tmp_path, n=2), ShapeBreakingEngine())


@pytest.mark.parametrize("padding", [False, True])
def test_the_engine_writes_over_the_source_volume_unless_padding_needs_it(tmp_path, padding):
    """Without Pixel Padding the source HU are dead once the engine read them, so the engine
    gets them as its output buffer; with padding the build needs them and they stay."""
    paths = _source(tmp_path, n=2)
    if padding:
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.add_new("PixelPaddingValue", "US", 24)  # stored 24 = -1000 HU: the air outside
            ds.save_as(path)
    engine = IdentityEngine(offset_hu=100.0)
    result = standardize_series(paths, engine, now=NOW)
    assert engine.over_input == [not padding]
    source = load_series(paths).volume_hu
    derived = load_series(write_series(result.datasets, tmp_path / "out")).volume_hu
    air = source == -1000.0
    assert air.any()
    np.testing.assert_allclose(derived[~air], source[~air] + 100.0, atol=0.5)
    np.testing.assert_allclose(derived[air], -1000.0 if padding else -900.0, atol=0.5)


def test_a_failed_write_raises_its_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Files are written by a pool of threads: the disk's error (ENOSPC here) still reaches the
    caller as raised, after the other writes ended, and no temporary file stays behind."""
    result = standardize_series(_source(tmp_path, n=6), IdentityEngine(), now=NOW)
    real = durable.write_pieces
    calls = itertools.count()

    def third_fails(fd, pieces):
        if next(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, pieces)

    monkeypatch.setattr(durable, "write_pieces", third_fails)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left") as raised:
        write_series(result.datasets, out)
    assert raised.value.errno == errno.ENOSPC
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 5 and not any(name.endswith(durable.TEMPORARY_SUFFIX) for name in left)
    for name in left:
        assert pydicom.dcmread(out / name).SOPInstanceUID == name.removesuffix(".dcm")


def test_write_series_leaves_no_partial_files_and_reads_back(tmp_path):
    result = standardize_series(_source(tmp_path, n=2), IdentityEngine(), now=NOW)
    out = tmp_path / "nested" / "out"
    written = write_series(result.datasets, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    back = pydicom.dcmread(written[0])
    assert back.preamble is not None
    assert back.file_meta.MediaStorageSOPInstanceUID
    assert back.SOPInstanceUID == result.datasets[0].SOPInstanceUID
