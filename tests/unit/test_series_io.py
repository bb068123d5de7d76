"""Series loading: ordering, validation, Enhanced CT frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from engine.pixels import PixelFormatError
from engine.series_io import FrameSource, SeriesError, load_series
from engine.synthetic import make_ct_dataset, make_ct_series


def _write(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"img{i:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return str(path)


def test_series_sorted_by_position_not_instance_number(tmp_path):
    datasets = make_ct_series(4, 16, 16)
    # Scramble instance numbers against positions: position must win.
    for ds, number in zip(datasets, (3, 1, 4, 2), strict=True):
        ds.InstanceNumber = number
    paths = _write(datasets[::-1], tmp_path)
    loaded = load_series(paths)
    assert loaded.ordering == "slice_position"
    assert loaded.geometry.slice_positions_mm == (-100.0, -99.0, -98.0, -97.0)
    assert [ds.SOPInstanceUID for ds in loaded.datasets] == [ds.SOPInstanceUID for ds in datasets]
    expected = np.stack([pydicom.dcmread(p).pixel_array for p in paths[::-1]]) - 1024.0
    np.testing.assert_array_equal(loaded.volume_hu, expected)
    assert loaded.frame_sources == tuple(FrameSource(i, None) for i in range(4))


def test_slices_sorted_along_normal_for_feet_first_orientation(tmp_path):
    # Row x column along -z: the normal points to the feet, so higher z comes first.
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    datasets = make_ct_series(3, 8, 8, orientation=orientation)
    loaded = load_series(_write(datasets, tmp_path))
    assert [float(ds.ImagePositionPatient[2]) for ds in loaded.datasets] == [-98.0, -99.0, -100.0]
    assert loaded.geometry.slice_positions_mm == (98.0, 99.0, 100.0)


def test_missing_positions_fall_back_to_instance_number_and_say_so(tmp_path):
    datasets = make_ct_series(3, 8, 8)
    for ds, number in zip(datasets, (2, 3, 1), strict=True):
        del ds.ImagePositionPatient
        ds.InstanceNumber = number
    loaded = load_series(_write(datasets, tmp_path))
    assert loaded.ordering == "instance_number"
    assert [int(ds.InstanceNumber) for ds in loaded.datasets] == [1, 2, 3]
    assert any("Instance Number" in note for note in loaded.notes)


def test_mixed_series_rejected(tmp_path):
    first = make_ct_series(2, 8, 8, uid_seed="a")
    second = make_ct_series(2, 8, 8, uid_seed="b", z0=0.0)
    with pytest.raises(SeriesError, match="2 different series"):
        load_series(_write(first + second, tmp_path))


def test_different_image_sizes_rejected(tmp_path):
    datasets = make_ct_series(2, 8, 8)
    datasets.append(
        make_ct_dataset(
            rows=16,
            cols=16,
            position=(0, 0, 5),
            instance_number=3,
            series_uid=datasets[0].SeriesInstanceUID,
        )
    )
    with pytest.raises(SeriesError, match="same size"):
        load_series(_write(datasets, tmp_path))


def test_different_orientation_and_spacing_rejected(tmp_path):
    datasets = make_ct_series(3, 8, 8)
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.1]
    with pytest.raises(SeriesError, match="Image Orientation"):
        load_series(_write(datasets, tmp_path / "o"))
    datasets = make_ct_series(3, 8, 8)
    datasets[2].PixelSpacing = [0.8, 0.8]
    with pytest.raises(SeriesError, match="Pixel Spacing"):
        load_series(_write(datasets, tmp_path / "s"))


def test_two_instances_at_one_position_rejected(tmp_path):
    datasets = make_ct_series(2, 8, 8)
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient
    with pytest.raises(SeriesError, match="share slice position"):
        load_series(_write(datasets, tmp_path))


def test_same_instance_received_twice_is_skipped_and_noted(tmp_path):
    datasets = make_ct_series(3, 8, 8)
    loaded = load_series(_write([*datasets, datasets[1]], tmp_path))
    assert len(loaded.datasets) == 3
    assert any("repeats instance" in note for note in loaded.notes)


def test_non_ct_and_junk_files_rejected_by_file_name(tmp_path):
    with pytest.raises(SeriesError, match="Modality is 'MR'"):
        load_series([_testfile("MR_small.dcm")])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(SeriesError, match=r"junk\.dcm"):
        load_series([junk])


def test_error_messages_carry_no_patient_data(tmp_path):
    datasets = make_ct_series(2, 8, 8)
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient
    with pytest.raises(SeriesError) as excinfo:
        load_series(_write(datasets, tmp_path))
    assert "PHANTOM" not in str(excinfo.value)
    assert "LTDIFF-0001" not in str(excinfo.value)


def test_real_ct_file_loads_as_one_slice():
    loaded = load_series([_testfile("CT_small.dcm")])
    assert loaded.volume_hu.shape == (1, 128, 128)
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(loaded.volume_hu[0], expected)


def test_undecodable_pixels_raise_pixel_format_error_naming_the_file(tmp_path):
    ds = make_ct_dataset(rows=8, cols=8)
    ds.PixelData = ds.PixelData[:10]
    path = _write([ds], tmp_path)[0]
    with pytest.raises(PixelFormatError, match=path.name):
        load_series([path])


def test_enhanced_ct_frames_loaded_with_positions():
    path = _testfile("eCT_Supplemental.dcm")
    loaded = load_series([path])
    # Orientation (-1,0,0 / 0,1,0): normal is -z, so z=-149 (frame 2) comes before z=-159.
    assert loaded.frame_sources == (FrameSource(0, 2), FrameSource(0, 1))
    assert loaded.geometry.slice_positions_mm == (149.0, 159.0)
    assert loaded.geometry.pixel_spacing_mm == (0.388672, 0.388672)
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float32) - 1024.0
    np.testing.assert_array_equal(loaded.volume_hu, frames[::-1])
    assert loaded.is_multi_frame
