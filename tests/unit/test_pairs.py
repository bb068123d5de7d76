"""Pairing source/target-kernel slices by DICOM tags, never by file names or order."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from training.pairs import find_paired_series, read_hu, split_by_subject

STUDY = "1.2.3.4.1"
FRAME = "1.2.3.4.2"


def write_slice(
    folder: Path,
    *,
    series_uid: str,
    kernel: str,
    z: float,
    study: str = STUDY,
    frame: str = FRAME,
    size: int = 8,
    acquisition: int = 1,
    value: int = 1000,
) -> Path:
    """A minimal CT slice, named by a random UUID so names carry no order or meaning."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame
    ds.ConvolutionKernel = kernel
    ds.AcquisitionNumber = acquisition
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((size, size), value, np.uint16).tobytes()
    path = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, kernel: str, zs: list[float], **kwargs: object) -> str:
    series_uid = generate_uid()
    for z in zs:
        write_slice(folder, series_uid=series_uid, kernel=kernel, z=z, **kwargs)  # type: ignore[arg-type]
    return series_uid


def test_pairs_matched_by_position_not_filename(tmp_path: Path) -> None:
    subject = tmp_path / "S001"
    zs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    rng = np.random.default_rng(0)
    write_series(subject, "Br40d", list(rng.permutation(zs)))
    write_series(subject, "Bl64d", [z + 0.004 for z in rng.permutation(zs)])  # within 0.01 mm
    (subject / "truth.json").write_text("{}")  # non-DICOM files are ignored
    (subject / "truth.npz").write_bytes(b"\x93NUMPY not dicom")

    result = find_paired_series(tmp_path)

    assert result.issues == ()
    assert result.unpaired == ()
    (paired,) = result.paired
    assert paired.subject_label == "S001"
    assert (paired.source_kernel, paired.target_kernel) == ("Br40d", "Bl64d")
    assert [p.z_mm for p in paired.pairs] == sorted(zs)
    for pair in paired.pairs:
        source, target = dcmread(pair.source_path), dcmread(pair.target_path)
        assert source.ConvolutionKernel == "Br40d"
        assert target.ConvolutionKernel == "Bl64d"
        assert abs(source.ImagePositionPatient[2] - target.ImagePositionPatient[2]) < 0.01


def test_unpaired_slices_reported(tmp_path: Path) -> None:
    subject = tmp_path / "S002"
    write_series(subject, "Br40d", [0.0, 1.0, 2.0])
    write_series(subject, "Bl64d", [0.0, 1.0, 2.5])  # 2.5 is 0.5 mm off: no partner
    write_series(tmp_path / "S003", "Br40d", [0.0], study="1.2.3.9")  # no target series at all

    result = find_paired_series(tmp_path)

    (paired,) = result.paired
    assert [p.z_mm for p in paired.pairs] == [0.0, 1.0]
    reasons = [reason for _, reason in result.unpaired]
    assert len(result.unpaired) == 3, reasons
    assert any("no source slice" in r for r in reasons)
    assert any("no partner series" in r for r in reasons)
    assert any("S003" in issue and "no target-kernel series" in issue for issue in result.issues)


def test_repeat_target_series_in_second_root_is_paired_as_other_acquisition(
    tmp_path: Path,
) -> None:
    zs = [0.0, 1.0]
    write_series(tmp_path / "train" / "S004", "Br40d", zs)
    original = write_series(tmp_path / "train" / "S004", "Bl64d", zs)
    repeat = write_series(tmp_path / "repeat" / "S004", "Bl64d", zs, acquisition=2)

    result = find_paired_series([tmp_path / "train", tmp_path / "repeat"])

    assert [(p.target_series_uid, p.same_acquisition) for p in result.paired] == [
        (original, True),
        (repeat, False),
    ]
    assert all(p.subject_label == "S004" and p.n_slices == 2 for p in result.paired)


def test_mismatched_matrix_sizes_are_reported_not_paired(tmp_path: Path) -> None:
    write_series(tmp_path / "S001", "Br40d", [0.0, 1.0], size=8)
    write_series(tmp_path / "S001", "Bl64d", [0.0, 1.0], size=16)

    result = find_paired_series(tmp_path)

    assert result.paired == ()
    assert len(result.unpaired) == 4
    assert any("matrix size" in issue for issue in result.issues)


def test_other_frame_of_reference_does_not_pair(tmp_path: Path) -> None:
    write_series(tmp_path / "S001", "Br40d", [0.0])
    write_series(tmp_path / "S001", "Bl64d", [0.0], frame="1.2.3.4.99")
    assert find_paired_series(tmp_path).paired == ()


def test_kernel_patterns_are_configurable(tmp_path: Path) -> None:
    write_series(tmp_path / "S001", "B30f", [0.0])
    write_series(tmp_path / "S001", "B70f", [0.0])
    assert find_paired_series(tmp_path).paired == ()
    result = find_paired_series(tmp_path, source_kernel=r"^B30", target_kernel=r"^B70")
    assert [(p.source_kernel, p.target_kernel) for p in result.paired] == [("B30f", "B70f")]


def test_split_by_subject_holds_out_evaluation_subjects(tmp_path: Path) -> None:
    for subject in ("S001", "S004", "S005", "S006"):
        write_series(tmp_path / subject, "Br40d", [0.0], study=f"1.2.3.{int(subject[1:])}")
        write_series(tmp_path / subject, "Bl64d", [0.0], study=f"1.2.3.{int(subject[1:])}")
    train, held = split_by_subject(find_paired_series(tmp_path).paired)
    assert [p.subject_label for p in train] == ["S001", "S006"]
    assert [p.subject_label for p in held] == ["S004", "S005"]


def test_read_hu_applies_rescale(tmp_path: Path) -> None:
    path = write_slice(tmp_path, series_uid=generate_uid(), kernel="Br40d", z=0.0, value=1064)
    hu = read_hu(path)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, 40.0)


def test_missing_data_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_paired_series(tmp_path / "nope")
