"""Reading a series ahead of its job (engine/read_ahead.py): what `load_series` gets from files
read ahead is what it would have read itself; a file replaced since, a cache that filled up or
a read that was interrupted leave the rest to the job; a bad file is reported by the job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from derived_sources import SOURCES
from pydicom import dcmread, dcmwrite
from tests_support import write_series

from engine.pixels import dataset_frames_to_hu
from engine.read_ahead import ReadAhead
from engine.series_io import LoadedSeries, SeriesError, load_series

SLICE_BYTES = 64 * 64 * 4  # float32 HU of one 64 x 64 slice


def _same_series(a: LoadedSeries, b: LoadedSeries) -> None:
    np.testing.assert_array_equal(a.volume_hu, b.volume_hu)
    assert a.geometry == b.geometry
    assert a.frame_sources == b.frame_sources
    assert (a.orientation, a.ordering, a.notes) == (b.orientation, b.ordering, b.notes)
    assert [ds.SOPInstanceUID for ds in a.datasets] == [ds.SOPInstanceUID for ds in b.datasets]
    for x, y in zip(a.datasets, b.datasets, strict=True):
        without_pixels = {e.tag for e in x if e.keyword != "PixelData"}
        assert without_pixels == {e.tag for e in y if e.keyword != "PixelData"}
        for tag in without_pixels:
            assert x[tag].value == y[tag].value, tag


def _paths(files: list[Path]) -> list[str]:
    return [str(p) for p in files]


def test_a_series_read_ahead_loads_as_it_would_from_its_files(tmp_path):
    files = write_series(tmp_path / "in", n_slices=6, uid_seed="ahead")
    cache = ReadAhead(max_bytes=1 << 30)
    assert cache.read("series-1", _paths(files)) == 6
    assert len(cache) == 6 and cache.bytes_held == 6 * SLICE_BYTES

    entry = cache.take(files[2])
    assert entry is not None and "PixelData" not in entry.dataset
    np.testing.assert_array_equal(entry.hu_frames, dataset_frames_to_hu(dcmread(files[2])))
    cache.read("series-1", _paths(files))  # the file taken is read again when hinted again

    from_cache = load_series(files, cache)
    assert cache.taken == 7 and len(cache) == 0 and cache.bytes_held == 0
    _same_series(from_cache, load_series(files))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_kind_of_source_loads_the_same_read_ahead(tmp_path, source):
    """Implicit VR, padding, RLE, Enhanced CT (one entry for many frames), lossy JPEG 2000."""
    files = SOURCES[source][0](tmp_path)
    cache = ReadAhead(max_bytes=1 << 30)
    assert cache.read("s", _paths(files)) == len(files)
    loaded = load_series(files, cache)
    assert cache.taken == len(files)
    _same_series(loaded, load_series(files))


def test_a_file_replaced_after_it_was_read_ahead_is_read_again(tmp_path):
    files = write_series(tmp_path / "in", n_slices=4, uid_seed="replaced")
    cache = ReadAhead(max_bytes=1 << 30)
    cache.read("s", _paths(files))
    # The same instance received again with other pixels: a new file renamed over the old one.
    ds = dcmread(files[1])
    ds.PixelData = (np.frombuffer(ds.PixelData, dtype=np.int16) + 7).tobytes()
    dcmwrite(tmp_path / "new.dcm", ds, enforce_file_format=True)
    (tmp_path / "new.dcm").replace(files[1])

    loaded = load_series(files, cache)
    assert cache.taken == 3, "the replaced file was not taken from the cache"
    _same_series(loaded, load_series(files))


def test_a_full_cache_or_an_interruption_leaves_the_rest_to_the_job(tmp_path):
    files = write_series(tmp_path / "in", n_slices=5, uid_seed="bounded")
    small = ReadAhead(max_bytes=2 * SLICE_BYTES)
    assert small.read("s", _paths(files)) == 2 and small.full
    _same_series(load_series(files, small), load_series(files))
    assert small.taken == 2

    one_short = ReadAhead(max_bytes=2 * SLICE_BYTES - 1)
    assert one_short.read("s", _paths(files)) == 1 and not one_short.full
    assert one_short.pending == 0, "the rest did not fit: left to the job"
    _same_series(load_series(files, one_short), load_series(files))

    asked = iter([False, True])
    cache = ReadAhead(max_bytes=1 << 30)
    assert cache.read("s", _paths(files), interrupted=lambda: next(asked, True)) == 1
    assert cache.pending == 4, "what was not read stays to read"
    assert cache.read("s", []) == 4 and cache.pending == 0
    assert cache.read("other series", _paths(files[:1])) == 1
    assert len(cache) == 1, "a hint for another series drops the first one's files"


@pytest.mark.parametrize("defect", ["not-dicom", "wrong-modality", "truncated"])
def test_a_bad_file_is_not_kept_and_the_job_reports_it_as_before(tmp_path, defect):
    files = write_series(tmp_path / "in", n_slices=3, uid_seed=f"bad-{defect}")
    bad = files[1]
    if defect == "not-dicom":
        bad.write_bytes(b"this is not DICOM" * 20)
    elif defect == "wrong-modality":
        ds = dcmread(bad)
        ds.Modality = "MR"
        dcmwrite(bad, ds, enforce_file_format=True)
    else:
        bad.write_bytes(bad.read_bytes()[:-1000])
    cache = ReadAhead(max_bytes=1 << 30)
    assert cache.read("s", _paths(files)) == 2
    assert cache.read("s", _paths(files)) == 0, "a file that failed is not tried again"

    with pytest.raises(ValueError, match=r"^file ") as without:
        load_series(files)
    with pytest.raises(ValueError, match=r"^file ") as with_cache:
        load_series(files, cache)
    assert type(with_cache.value) is type(without.value)
    assert str(with_cache.value) == str(without.value)
    if defect != "truncated":
        assert isinstance(without.value, SeriesError)


def test_a_file_gone_after_it_was_read_ahead_is_not_used(tmp_path):
    files = write_series(tmp_path / "in", n_slices=3, uid_seed="gone")
    cache = ReadAhead(max_bytes=1 << 30)
    cache.read("s", _paths(files))
    files[0].unlink()
    assert cache.take(files[0]) is None
    assert dataclasses.is_dataclass(cache.take(files[1]))
    assert cache.taken == 1
