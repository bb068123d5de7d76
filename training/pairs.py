"""Find source-kernel / target-kernel slice pairs in folders of DICOM files, by tags only.

A PACS export names files arbitrarily and mixes series, so pairing never looks at file names or
file order. Two slices pair when they belong to the same study (StudyInstanceUID) and frame of
reference (FrameOfReferenceUID), one series' ConvolutionKernel matches the source pattern and the
other's the target pattern, and their ImagePositionPatient agree within a tolerance.

Only headers are read (`stop_before_pixels=True`). Files that are not DICOM (truth.npz, JSON
sidecars, ...) are skipped silently; DICOM files that cannot be paired are reported, not fatal.

Subjects are labelled by the name of the folder holding a series (e.g. "S001"), never by
PatientName or PatientID, so labels can go into logs.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

DEFAULT_SOURCE_KERNEL = r"^Br40"
DEFAULT_TARGET_KERNEL = r"^Bl64"
POSITION_TOLERANCE_MM = 0.01
DEFAULT_HOLDOUT = frozenset({"S004", "S005"})

_HEADER_TAGS = [
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ConvolutionKernel",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "AcquisitionNumber",
]


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one image that pairing needs."""

    path: Path
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    kernel: str
    position_mm: tuple[float, float, float]
    z_mm: float
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    acquisition_number: int | None


@dataclass(frozen=True)
class SlicePair:
    """One source-kernel slice and the target-kernel slice at the same position."""

    source_path: Path
    target_path: Path
    z_mm: float
    """Position along the slice normal (ImagePositionPatient projected on it); z for axial."""
    position_mm: tuple[float, float, float]


@dataclass(frozen=True)
class PairedSeries:
    """A source series and a target series of one study and frame of reference, paired by slice.

    same_acquisition: both series come from the same acquisition (equal AcquisitionNumber, or
        neither has one): the same raw data reconstructed twice. A pair across acquisitions (a
        repeat scan) has different noise and is kept for evaluation, not for fitting filters.
    """

    study_uid: str
    frame_of_reference_uid: str
    subject_label: str
    source_series_uid: str
    target_series_uid: str
    source_kernel: str
    target_kernel: str
    pairs: tuple[SlicePair, ...]
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    same_acquisition: bool

    @property
    def n_slices(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class PairingResult:
    """Everything found: the paired series, and what could not be paired and why."""

    paired: tuple[PairedSeries, ...]
    unpaired: tuple[tuple[Path, str], ...]
    """(file, reason) for source/target-kernel slices left without a partner."""
    issues: tuple[str, ...]
    """Series-level problems (mismatched matrices, studies without a partner series, ...)."""


@dataclass
class _Series:
    uid: str
    slices: list[SliceHeader]

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def subject_label(self) -> str:
        labels = Counter(s.path.parent.name for s in self.slices)
        return labels.most_common(1)[0][0]


def read_slice_header(path: Path) -> SliceHeader | None:
    """Header of a CT/MR-like image file, or None if it is not DICOM or lacks pairing tags."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError):
        return None
    return _header_from_dataset(path, ds)


def _header_from_dataset(path: Path, ds: Dataset) -> SliceHeader | None:
    required = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient")
    if any(ds.get(key) in (None, "") for key in required):
        return None
    position = tuple(float(v) for v in ds.ImagePositionPatient)
    orientation = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    spacing = [float(v) for v in ds.get("PixelSpacing", [0.0, 0.0])]
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    kernel_value = ds.get("ConvolutionKernel", "")
    # Siemens may write ["Br40d", "3"] (kernel, iterative strength): the kernel is the first value.
    if not isinstance(kernel_value, str):
        kernel_value = next(iter(kernel_value), "")
    kernel = str(kernel_value or "")
    acquisition = ds.get("AcquisitionNumber")
    return SliceHeader(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        kernel=kernel,
        position_mm=(position[0], position[1], position[2]),
        z_mm=float(np.dot(normal, position)),
        pixel_spacing_mm=(spacing[0], spacing[1]),
        rows=int(ds.get("Rows", 0)),
        columns=int(ds.get("Columns", 0)),
        acquisition_number=int(acquisition) if acquisition not in (None, "") else None,
    )


def _iter_files(roots: Iterable[Path]) -> Iterable[Path]:
    for root in map(Path, roots):
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(p for p in root.rglob("*") if p.is_file())
        else:
            raise FileNotFoundError(f"data folder {root} does not exist")


def find_paired_series(
    roots: Path | Sequence[Path],
    *,
    source_kernel: str = DEFAULT_SOURCE_KERNEL,
    target_kernel: str = DEFAULT_TARGET_KERNEL,
    tolerance_mm: float = POSITION_TOLERANCE_MM,
) -> PairingResult:
    """Scan one or several folder trees and pair source/target-kernel slices by tags.

    source_kernel / target_kernel: regular expressions matched (re.search) against the first
        value of ConvolutionKernel.
    Each source series is paired with every target series of the same study and frame of
    reference (several roots may hold target series of one study, e.g. a repeat scan); results
    are sorted by subject, then same-acquisition pairs first. Slices within a pair are sorted by
    z_mm, ascending.
    """
    root_list = [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]
    source_re, target_re = re.compile(source_kernel), re.compile(target_kernel)
    series: dict[str, _Series] = {}
    seen_sops: set[str] = set()
    for path in _iter_files(root_list):
        header = read_slice_header(path)
        if header is None or header.sop_instance_uid in seen_sops:
            continue
        seen_sops.add(header.sop_instance_uid)
        series.setdefault(header.series_uid, _Series(header.series_uid, [])).slices.append(header)

    groups: dict[tuple[str, str], tuple[list[_Series], list[_Series]]] = defaultdict(
        lambda: ([], [])
    )
    for s in series.values():
        key = (s.first.study_uid, s.first.frame_of_reference_uid)
        if source_re.search(s.first.kernel):
            groups[key][0].append(s)
        elif target_re.search(s.first.kernel):
            groups[key][1].append(s)

    paired: list[PairedSeries] = []
    unpaired: list[tuple[Path, str]] = []
    issues: list[str] = []
    for sources, targets in groups.values():
        for s in sources + targets:
            _check_series_consistency(s, issues)
        if not targets or not sources:
            lonely = sources or targets
            for s in lonely:
                issues.append(
                    f"{s.subject_label}: series {s.uid} ({s.first.kernel}) has no "
                    f"{'target' if not targets else 'source'}-kernel series in its study "
                    f"and frame of reference"
                )
                unpaired.extend((h.path, "no partner series") for h in s.slices)
            continue
        used_targets: set[Path] = set()
        for src in sources:
            for tgt in targets:
                result = _pair_series(src, tgt, tolerance_mm, issues, unpaired)
                if result is not None:
                    paired.append(result)
                    used_targets.update(p.target_path for p in result.pairs)
        for tgt in targets:
            for h in tgt.slices:
                if h.path not in used_targets:
                    unpaired.append((h.path, "no source slice at this position"))

    paired.sort(key=lambda p: (p.subject_label, not p.same_acquisition, p.target_series_uid))
    return PairingResult(tuple(paired), tuple(sorted(unpaired)), tuple(issues))


def _check_series_consistency(s: _Series, issues: list[str]) -> None:
    shapes = {(h.rows, h.columns) for h in s.slices}
    spacings = {h.pixel_spacing_mm for h in s.slices}
    if len(shapes) > 1 or len(spacings) > 1:
        issues.append(
            f"{s.subject_label}: series {s.uid} mixes matrix sizes {sorted(shapes)} or pixel "
            f"spacings {sorted(spacings)}; slices that differ from the partner are left unpaired"
        )


def _pair_series(
    src: _Series,
    tgt: _Series,
    tolerance_mm: float,
    issues: list[str],
    unpaired: list[tuple[Path, str]],
) -> PairedSeries | None:
    label = src.subject_label
    targets = sorted(tgt.slices, key=lambda h: h.z_mm)
    target_z = [h.z_mm for h in targets]
    taken: set[int] = set()
    pairs: list[SlicePair] = []
    mismatched = 0
    for h in sorted(src.slices, key=lambda h: h.z_mm):
        lo = bisect.bisect_left(target_z, h.z_mm - tolerance_mm)
        hi = bisect.bisect_right(target_z, h.z_mm + tolerance_mm)
        match = next(
            (
                i
                for i in range(lo, hi)
                if i not in taken
                and max(
                    abs(a - b) for a, b in zip(h.position_mm, targets[i].position_mm, strict=True)
                )
                <= tolerance_mm
            ),
            None,
        )
        if match is None:
            unpaired.append((h.path, f"no {tgt.first.kernel} slice of series {tgt.uid} here"))
            continue
        t = targets[match]
        if (h.rows, h.columns) != (t.rows, t.columns) or not np.allclose(
            h.pixel_spacing_mm, t.pixel_spacing_mm, rtol=0, atol=1e-4
        ):
            mismatched += 1
            unpaired.append((h.path, f"matrix/spacing differs from {t.path.name}"))
            continue
        taken.add(match)
        pairs.append(SlicePair(h.path, t.path, h.z_mm, h.position_mm))
    if mismatched:
        issues.append(
            f"{label}: {mismatched} slices of {src.first.kernel} series {src.uid} differ in matrix "
            f"size or pixel spacing from {tgt.first.kernel} series {tgt.uid}"
        )
    if not pairs:
        issues.append(
            f"{label}: no slice of series {src.uid} ({src.first.kernel}) matches series {tgt.uid} "
            f"({tgt.first.kernel}) in position"
        )
        return None
    first_src, first_tgt = src.first, tgt.first
    return PairedSeries(
        study_uid=first_src.study_uid,
        frame_of_reference_uid=first_src.frame_of_reference_uid,
        subject_label=label,
        source_series_uid=src.uid,
        target_series_uid=tgt.uid,
        source_kernel=first_src.kernel,
        target_kernel=first_tgt.kernel,
        pairs=tuple(pairs),
        pixel_spacing_mm=first_src.pixel_spacing_mm,
        rows=first_src.rows,
        columns=first_src.columns,
        same_acquisition=first_src.acquisition_number == first_tgt.acquisition_number,
    )


def split_by_subject(
    paired: Iterable[PairedSeries], holdout: Collection[str] = DEFAULT_HOLDOUT
) -> tuple[list[PairedSeries], list[PairedSeries]]:
    """(training, held out): series whose subject label is in `holdout` go to the second list."""
    train: list[PairedSeries] = []
    held: list[PairedSeries] = []
    for p in paired:
        (held if p.subject_label in holdout else train).append(p)
    return train, held


def read_hu(path: Path) -> np.ndarray[tuple[int, int], np.dtype[np.float32]]:
    """Pixels of a single-frame image in HU: stored * RescaleSlope + RescaleIntercept.

    float32 [rows, cols]. PS3.3 C.11.1.1.2: the rescale applies to the stored values as decoded.
    """
    ds = dcmread(path)
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"{path.name}: expected a single-frame image, got shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(
        np.float32
    )
