"""Synthetic CT datasets built in memory, for tests, the demo and the phantom generator.

Everything here is fictional (patient "LTDIFF^PHANTOM") and deterministic: UIDs are derived from
a `uid_seed` string with `engine.derived.name_based_uid` (UUID version 5), so the same
call gives the same UIDs. Datasets carry valid file meta (Explicit VR Little Endian) and the
modules a CT Image Storage instance needs (PS3.3 A.3): Patient, General Study, General Series,
Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel, CT Image,
SOP Common.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from engine.derived import name_based_uid
from engine.pixels import hu_to_stored, write_pixels

AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SyntheticStudy:
    """The Patient, General Study and General Equipment attributes of a synthetic series: all
    fictional. The defaults describe the test series; the routing phantom
    (dicom_node/phantom.py) brings its own."""

    patient_name: str = "LTDIFF^PHANTOM"
    patient_id: str = "LTDIFF-0001"
    study_description: str = "CT Thorax"
    accession_number: str = "SYN0001"
    date: str = "20240102"  # study, series, acquisition and content date (DA)
    time: str = "101500"  # study, series, acquisition and content time (TM)
    manufacturer: str = "SIEMENS"
    model_name: str = "Synthetic CT"
    software_versions: str = "syngo CT VA00"
    institution_name: str | None = "ltdiff test site"  # None: no Institution Name


TEST_STUDY = SyntheticStudy()


def synthetic_uid(uid_seed: str, *parts: object) -> str:
    """Deterministic 2.25.<int> UID from a seed string and parts."""
    return name_based_uid("synthetic", uid_seed, *(str(p) for p in parts))


def phantom_slice(rows: int, cols: int, z_fraction: float = 0.5) -> npt.NDArray[np.float32]:
    """A default test pattern in HU: air (-1000) around a water disc (0) holding a lung-like
    region (-800), a bone rod (+1000) and a soft-tissue insert (+60) whose size varies with
    `z_fraction` (0..1), so slices differ and ordering errors are visible."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = (rows - 1) / 2.0, (cols - 1) / 2.0
    r = np.hypot((y - cy) / max(rows, 1), (x - cx) / max(cols, 1))
    hu = np.full((rows, cols), -1000.0)
    hu[r < 0.45] = 0.0
    hu[np.hypot((y - cy) / rows, (x - cx - 0.2 * cols) / cols) < 0.12] = -800.0
    hu[np.hypot((y - cy - 0.2 * rows) / rows, (x - cx) / cols) < 0.05] = 1000.0
    insert = 0.03 + 0.07 * float(np.clip(z_fraction, 0.0, 1.0))
    hu[np.hypot((y - cy + 0.2 * rows) / rows, (x - cx + 0.15 * cols) / cols) < insert] = 60.0
    return hu.astype(np.float32)


def make_ct_dataset(
    hu: npt.NDArray[np.floating] | None = None,
    *,
    rows: int = 64,
    cols: int = 64,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL_ORIENTATION,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.0,
    instance_number: int = 1,
    kernel: str = "Br40d",
    uid_seed: str = "ltdiff-synthetic",
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_number: int = 3,
    series_description: str | None = None,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    study: SyntheticStudy = TEST_STUDY,
) -> Dataset:
    """One single-frame CT Image Storage instance.

    `hu`: float (rows, cols) image in HU, stored through `hu_to_stored` with the given storage
    (default unsigned 12-bit, intercept -1024, as many scanners write); a `phantom_slice` when
    None. Study, Frame of Reference and (unless given) Series UIDs come from `uid_seed`; the SOP
    Instance UID from the seed, series UID and instance number. `study`: patient, study and
    equipment attributes.
    """
    image = phantom_slice(rows, cols) if hu is None else np.asarray(hu, dtype=np.float32)
    rows, cols = image.shape
    series_uid = series_uid or synthetic_uid(uid_seed, "series")
    sop_uid = sop_uid or synthetic_uid(uid_seed, series_uid, "instance", instance_number)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = (study.date,) * 4
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = (study.time,) * 4
    ds.AccessionNumber = study.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.model_name
    ds.SoftwareVersions = study.software_versions
    if study.institution_name is not None:
        ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series_description or f"Thorax 1.0 {kernel}"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = synthetic_uid(uid_seed, "study")
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.FrameOfReferenceUID = synthetic_uid(uid_seed, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    ds.SliceLocation = f"{float(np.dot(position, np.cross(row_dir, col_dir))):g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept = f"{rescale_intercept:g}"
    ds.RescaleSlope = f"{rescale_slope:g}"
    ds.RescaleType = "HU"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    stored, _ = hu_to_stored(image, ds)
    write_pixels(ds, stored)
    return ds


def make_ct_series(
    n_slices: int,
    rows: int = 64,
    cols: int = 64,
    kernel: str = "Br40d",
    *,
    volume_hu: npt.NDArray[np.floating] | None = None,
    slice_spacing: float = 1.0,
    z0: float = -100.0,
    uid_seed: str = "ltdiff-synthetic",
    **dataset_kwargs: object,
) -> list[Dataset]:
    """`n_slices` instances of one axial series, slice i at z = z0 + i * slice_spacing, Instance
    Number i + 1, in that order.

    `volume_hu`: float [n_slices, rows, cols] in HU, or None for `phantom_slice` patterns that
    change along z. Other keyword arguments go to `make_ct_dataset` (storage, spacing, ...).
    """
    if volume_hu is not None:
        volume = np.asarray(volume_hu, dtype=np.float32)
        if volume.ndim != 3 or volume.shape[0] != n_slices:
            raise ValueError(f"volume_hu shape {volume.shape} does not hold {n_slices} slices")
        rows, cols = volume.shape[1:]
    series_uid = synthetic_uid(uid_seed, "series")
    datasets = []
    for i in range(n_slices):
        image = (
            volume[i]
            if volume_hu is not None
            else phantom_slice(rows, cols, i / max(n_slices - 1, 1))
        )
        datasets.append(
            make_ct_dataset(
                image,
                position=(0.0, 0.0, z0 + i * slice_spacing),
                instance_number=i + 1,
                kernel=kernel,
                uid_seed=uid_seed,
                series_uid=series_uid,
                **dataset_kwargs,  # type: ignore[arg-type]
            )
        )
    return datasets
