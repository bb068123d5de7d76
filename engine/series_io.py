"""Read a CT series from files into one HU volume, with its geometry and provenance.

Two kinds of input are accepted:

- single-frame CT Image Storage (1.2.840.10008.5.1.4.1.1.2): one instance per slice, geometry
  from the Image Plane Module (PS3.3 C.7.6.2);
- Enhanced CT Image Storage (1.2.840.10008.5.1.4.1.1.2.1) and Legacy Converted Enhanced CT
  (1.2.840.10008.5.1.4.1.1.2.2): one or more multi-frame instances, geometry per frame from the
  Plane Position / Plane Orientation / Pixel Measures functional groups and rescale from the
  Pixel Value Transformation functional group (PS3.3 C.7.6.16.2).

Slices are ordered along the slice normal, n = row direction x column direction of Image
Orientation (Patient), by the projection of Image Position (Patient) on n (PS3.3 C.7.6.2.1.1).
Only when positions are missing is Instance Number used, and `LoadedSeries.ordering` says so.

Duplicates: a file whose SOP Instance UID was already read (the same instance received twice)
is skipped and noted. Two *different* instances at the same position are refused with
SeriesError: that is a second reconstruction or phase sharing a Series Instance UID, and
silently keeping one would drop images from the derived series.

Errors name files by file name and SOP Instance UID, never by patient data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine.dicom_facts import CT_SOP_CLASSES, MULTI_FRAME_CT_SOP_CLASSES, functional_group_items
from engine.interface import FloatVolume, SeriesGeometry
from engine.pixels import PixelFormatError, dataset_frames_to_hu, frame_count
from engine.read_ahead import ReadAhead

ORIENTATION_TOLERANCE = 1e-4  # direction cosines
SPACING_TOLERANCE_MM = 1e-3
POSITION_TOLERANCE_MM = 1e-3

Ordering = Literal["slice_position", "instance_number"]


class SeriesError(ValueError):
    """The files do not form one CT series the node can standardize; the message says why."""


@dataclass(frozen=True)
class FrameSource:
    """Where one slice of the volume came from.

    dataset_index: index into `LoadedSeries.datasets`.
    frame_number: 1-based frame number in a multi-frame (Enhanced CT) instance, as used by
        Referenced Frame Number (0008,1160); None for a single-frame instance.
    """

    dataset_index: int
    frame_number: int | None


@dataclass(frozen=True)
class LoadedSeries:
    """A decoded CT series.

    datasets: the source instances with pixel data, in volume order (for Enhanced CT, ordered
        by the position of their first slice).
    volume_hu: float32 [slices, rows, cols] in HU, slices ordered along the slice normal.
    geometry: pixel spacing and slice positions along the normal (mm), in volume order.
    frame_sources: for each slice, which dataset and frame it came from.
    orientation: Image Orientation (Patient), 6 direction cosines shared by all slices.
    ordering: how slices were ordered ("slice_position" or, as a fallback, "instance_number").
    notes: things an admin may want to know (skipped duplicate files, fallback ordering).
    """

    datasets: list[Dataset]
    volume_hu: FloatVolume
    geometry: SeriesGeometry
    frame_sources: tuple[FrameSource, ...]
    orientation: tuple[float, ...]
    ordering: Ordering
    notes: tuple[str, ...]

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def is_multi_frame(self) -> bool:
        return any(fs.frame_number is not None for fs in self.frame_sources)


# Functional-group macros whose contents can be flattened into a single-frame CT Image header,
# and which of their attributes exist in the CT Image IOD (PS3.3 A.3, C.7.6.2, C.8.2.1).
_FLATTENABLE_MACROS: dict[str, tuple[str, ...]] = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"),
    "CTReconstructionSequence": (
        "ConvolutionKernel",
        "ReconstructionDiameter",
        "ReconstructionTargetCenterPatient",
    ),
    "CTXRayDetailsSequence": ("KVP", "FilterType", "FocalSpots"),
    "CTExposureSequence": ("ExposureTimeInms", "XRayTubeCurrentInmA", "ExposureInmAs"),
    "CTAcquisitionDetailsSequence": (
        "GantryDetectorTilt",
        "DataCollectionDiameter",
        "TableHeight",
        "RotationDirection",
        "DataCollectionCenterPatient",
    ),
    "CTTableDynamicsSequence": ("SpiralPitchFactor", "TableSpeed", "TableFeedPerRotation"),
    "IrradiationEventIdentificationSequence": ("IrradiationEventUID",),
}


def frame_header(ds: Dataset, frame_number: int | None) -> Dataset:
    """Attributes describing one frame, flattened to single-frame CT Image form.

    For a single-frame dataset (frame_number None) this is the top level of `ds` itself. For a
    multi-frame dataset the shared, then per-frame functional groups (PS3.3 C.7.6.16) are read
    and the attributes that the CT Image IOD also has (Image Position / Orientation, Pixel
    Spacing, Slice Thickness, Rescale, Window, Convolution Kernel, KVP, ...) are returned at top
    level of a new Dataset. Tolerant: absent macros are skipped.
    """
    if frame_number is None:
        return ds
    index = frame_number - 1
    out = Dataset()
    for macro, keywords in _FLATTENABLE_MACROS.items():
        # Shared first, then per-frame, so a per-frame value wins.
        for item in reversed(functional_group_items(ds, index, macro)):
            for keyword in keywords:
                element = item.get(keyword)
                if element is not None and element != "":
                    setattr(out, keyword, element)
    return out


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        values = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


@dataclass(frozen=True)
class _Slice:
    dataset_index: int
    frame_number: int | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    instance_number: int | None
    sop_instance_uid: str
    name: str


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise SeriesError(f"file {path.name} is not a DICOM file ({exc})") from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise SeriesError(f"file {path.name} could not be read as DICOM: {exc}") from exc
    return ds


def check_instance(ds: Dataset, name: str) -> None:
    """SeriesError unless `ds` is a CT image instance with the attributes a series needs."""
    label = f"file {name} (instance {ds.get('SOPInstanceUID', 'without SOPInstanceUID')})"
    modality = ds.get("Modality")
    if modality != "CT":
        raise SeriesError(
            f"{label}: Modality is {str(modality)!r}, only CT is accepted"
            if modality
            else f"{label}: Modality is missing, only CT is accepted"
        )
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CT_SOP_CLASSES:
        raise SeriesError(
            f"{label}: SOP Class {sop_class or 'missing'!r} is not CT Image Storage or Enhanced CT "
            "Image Storage (localizers as Secondary Capture, dose reports, ... are not images "
            "to standardize)"
        )
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        if not ds.get(keyword):
            raise SeriesError(f"{label}: required attribute {keyword} is missing")


def _slices_of(ds: Dataset, index: int, name: str) -> list[_Slice]:
    multi = str(ds.SOPClassUID) in MULTI_FRAME_CT_SOP_CLASSES
    frames = [i + 1 for i in range(frame_count(ds))] if multi else [None]
    slices = []
    for frame_number in frames:
        header = frame_header(ds, frame_number)
        instance_number = ds.get("InstanceNumber")
        slices.append(
            _Slice(
                dataset_index=index,
                frame_number=frame_number,
                position=_floats(header.get("ImagePositionPatient"), 3),
                orientation=_floats(header.get("ImageOrientationPatient"), 6),
                spacing=_floats(header.get("PixelSpacing"), 2),
                instance_number=None if instance_number in (None, "") else int(instance_number),
                sop_instance_uid=str(ds.SOPInstanceUID),
                name=name,
            )
        )
        label = f"file {name} (instance {ds.SOPInstanceUID}" + (
            f", frame {frame_number})" if frame_number else ")"
        )
        if header.get("RescaleIntercept") in (None, "") and "ModalityLUTSequence" not in ds:
            raise SeriesError(
                f"{label}: Rescale Intercept is missing, so HU cannot be computed "
                "(Type 1 in the CT Image Module)"
            )
    return slices


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    return np.cross(row, col)


def load_series(
    paths: Iterable[str | PathLike[str]], read_ahead: ReadAhead | None = None
) -> LoadedSeries:
    """Read, validate, order and decode the files of one CT series.

    `read_ahead`: files already read and decoded (engine.read_ahead); each one it still holds
    is taken from it instead of being read again, with the same result.
    Raises SeriesError when the files are not one consistent CT series (mixed series, sizes,
    orientations or spacings; different instances at one position; non-CT objects) and
    PixelFormatError when pixel data cannot be decoded to HU.
    """
    path_list = [Path(p) for p in paths]
    if not path_list:
        raise SeriesError("no files given")
    datasets: list[Dataset] = []
    names: list[str] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    ahead: dict[int, FloatVolume] = {}  # index in `datasets` -> its HU frames, read ahead
    for path in sorted(path_list):
        entry = read_ahead.take(path) if read_ahead is not None else None
        ds = _read(path) if entry is None else entry.dataset
        check_instance(ds, path.name)
        sop_uid = str(ds.SOPInstanceUID)
        if sop_uid in seen:
            notes.append(
                f"file {path.name} repeats instance {sop_uid} (already read from "
                f"{seen[sop_uid]}); skipped"
            )
            continue
        seen[sop_uid] = path.name
        datasets.append(ds)
        names.append(path.name)
        if entry is not None:
            ahead[len(datasets) - 1] = entry.hu_frames

    series_uids = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
    if len(series_uids) != 1:
        raise SeriesError(
            f"files belong to {len(series_uids)} different series ({', '.join(series_uids)}); "
            "a job must hold exactly one Series Instance UID"
        )
    kinds = {str(ds.SOPClassUID) in MULTI_FRAME_CT_SOP_CLASSES for ds in datasets}
    if len(kinds) != 1:
        raise SeriesError("series mixes single-frame CT images and Enhanced CT instances")

    slices: list[_Slice] = []
    for index, (ds, name) in enumerate(zip(datasets, names, strict=True)):
        slices.extend(_slices_of(ds, index, name))

    first_ds, first = datasets[0], slices[0]
    rows, cols = int(first_ds.Rows), int(first_ds.Columns)
    for ds, name in zip(datasets, names, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise SeriesError(
                f"file {name} (instance {ds.SOPInstanceUID}) is {ds.Rows}x{ds.Columns} but the "
                f"series is {rows}x{cols}; all images of a series must have the same size"
            )
    _check_same(slices, "orientation", "Image Orientation (Patient)", ORIENTATION_TOLERANCE)
    _check_same(slices, "spacing", "Pixel Spacing", SPACING_TOLERANCE_MM)
    if first.spacing is None:
        raise SeriesError(
            f"file {first.name} (instance {first.sop_instance_uid}): Pixel Spacing is missing"
        )

    ordering: Ordering
    if all(s.position is not None for s in slices) and first.orientation is not None:
        normal = _normal(first.orientation)
        keyed = [(float(np.dot(s.position, normal)), s) for s in slices]  # type: ignore[arg-type]
        keyed.sort(key=lambda pair: (pair[0], pair[1].sop_instance_uid, pair[1].frame_number or 0))
        for (d0, s0), (d1, s1) in itertools.pairwise(keyed):
            if abs(d1 - d0) < POSITION_TOLERANCE_MM:
                raise SeriesError(
                    f"two images share slice position {d0:.3f} mm: {_where(s0)} and {_where(s1)}; "
                    "the series probably holds two reconstructions or phases under one Series "
                    "Instance UID, which the node refuses rather than guessing which to keep"
                )
        ordered = [s for _, s in keyed]
        positions = tuple(d for d, _ in keyed)
        ordering = "slice_position"
    else:
        if any(s.instance_number is None for s in slices if s.frame_number is None):
            raise SeriesError(
                "Image Position (Patient) and Instance Number are both missing on some images; "
                "the slice order cannot be established"
            )
        ordered = sorted(
            slices, key=lambda s: (s.instance_number or 0, s.frame_number or 0, s.sop_instance_uid)
        )
        step = _float_attr(first_ds, "SpacingBetweenSlices") or _float_attr(
            first_ds, "SliceThickness"
        )
        positions = tuple(i * (step or 1.0) for i in range(len(ordered)))
        ordering = "instance_number"
        notes.append(
            "Image Position (Patient) missing: slices ordered by Instance Number, slice positions "
            f"assumed {step or 1.0:g} mm apart"
        )

    volume = np.empty((len(ordered), rows, cols), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    order_of_dataset: list[int] = []
    for s in ordered:
        if s.dataset_index not in order_of_dataset:
            order_of_dataset.append(s.dataset_index)
    new_index = {old: new for new, old in enumerate(order_of_dataset)}
    for slot, s in enumerate(ordered):
        ds = datasets[s.dataset_index]
        if s.dataset_index in ahead:
            volume[slot] = ahead[s.dataset_index][(s.frame_number or 1) - 1]
            if s.frame_number is None:  # freed as it is copied: the peak stays one volume
                del ahead[s.dataset_index]
            continue
        try:
            if frame_count(ds) == 1:  # one slice: decoded straight into the volume
                dataset_frames_to_hu(ds, out=volume[slot : slot + 1])
                continue
            if s.dataset_index not in decoded:
                decoded[s.dataset_index] = dataset_frames_to_hu(ds)
        except PixelFormatError as exc:
            raise PixelFormatError(f"file {s.name}: {exc}") from exc
        volume[slot] = decoded[s.dataset_index][(s.frame_number or 1) - 1]
    decoded.clear()

    spacing = first.spacing
    geometry = SeriesGeometry(
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
        slice_positions_mm=positions,
    )
    return LoadedSeries(
        datasets=[datasets[old] for old in order_of_dataset],
        volume_hu=volume,
        geometry=geometry,
        frame_sources=tuple(
            FrameSource(new_index[s.dataset_index], s.frame_number) for s in ordered
        ),
        orientation=first.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        ordering=ordering,
        notes=tuple(notes),
    )


def _where(s: _Slice) -> str:
    frame = f", frame {s.frame_number}" if s.frame_number is not None else ""
    return f"file {s.name} (instance {s.sop_instance_uid}{frame})"


def _float_attr(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    return float(value)


def _check_same(slices: list[_Slice], field: str, title: str, tolerance: float) -> None:
    reference = getattr(slices[0], field)
    for s in slices[1:]:
        value = getattr(s, field)
        if (reference is None) != (value is None):
            raise SeriesError(f"{title} is present on some images but missing on {_where(s)}")
        if value is not None and np.max(np.abs(np.subtract(value, reference))) > tolerance:
            raise SeriesError(
                f"{title} of {_where(s)} differs from {_where(slices[0])}: "
                f"{list(value)} vs {list(reference)}; all images must share it"
            )
