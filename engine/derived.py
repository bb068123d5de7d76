"""Build the derived (kernel-standardized) CT series: one constructor, validated output.

In highdicom's spirit: never produce an invalid object, strict when writing, tolerant when
reading, Standard terms. `build_derived_series` copies the Patient, Study, Frame of Reference
and geometry of the source, gives the result new UIDs derived deterministically from the source
UIDs and the engine identity, marks it DERIVED\\SECONDARY with a Derivation Description,
Derivation Code, Source Image references and a Contributing Equipment item for this node, writes
the standardized pixels in the source's storage representation, and validates every instance
before returning. docs/DERIVED_SERIES.md explains each choice.

Standard references: PS3.3 A.3 (CT Image IOD), C.7.6.1 (General Image: Image Type, Derivation
Description / Code, Source Image Sequence), C.7.5.1 / C.7.5.2 (General / Enhanced General
Equipment), C.12.1 (SOP Common: Contributing Equipment Sequence), C.12.2 (Common Instance
Reference), PS3.16 CID 7203 (Image Derivation), CID 7202 (Source Image Purposes of Reference),
CID 7005 (Contributing Equipment Purposes of Reference), PS3.5 9.1 (UID encoding).
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from engine.dicom_facts import is_valid_uid
from engine.interface import EngineIdentity, FloatVolume
from engine.part10_writer import element_key
from engine.pixels import PixelFormatError, hu_to_stored, modality_rescale, transfer_syntax_of
from engine.pixels import write_pixels as _write_pixels
from engine.series_io import LoadedSeries, frame_header

MANUFACTURER = "ltdiff-node"
"""Manufacturer written into General Equipment and our Contributing Equipment item.

A constant, not an option: the loop guard (`is_ltdiff_output`) depends on it."""

DERIVATION_MARKER = "ltdiff-node kernel standardization"
"""Start of every Derivation Description we write; the loop guard's second signal."""

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ltdiff-node")


def name_based_uid(*parts: str) -> str:
    """A deterministic UID "2.25.<int>" from a name-based (SHA-1, version 5) UUID of `parts`
    (PS3.5 B.2, ISO/IEC 9834-8). Same parts, same UID; at most 44 characters.

    Note: pydicom's generate_uid(prefix=None) ignores its entropy sources and returns a random
    UUID, so it cannot be used for reproducible UIDs.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


IMPLEMENTATION_CLASS_UID = name_based_uid("implementation class")
IMPLEMENTATION_VERSION_NAME = "LTDIFF_NODE"

# (Code Value, Coding Scheme Designator, Code Meaning), PS3.16.
CODE_EDGE_ENHANCEMENT = ("113086", "DCM", "Edge enhancement")  # CID 7203
CODE_SMOOTHING = ("113087", "DCM", "Smoothing")  # CID 7203
CODE_FRAMES_EXTRACTED = (
    "113091",
    "DCM",
    "Spatially-related frames extracted from the volume",
)  # CID 7203
CODE_SOURCE_FOR_PROCESSING = (
    "121322",
    "DCM",
    "Source image for image processing operation",
)  # CID 7202
CODE_PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # CID 7005
CODE_ACQUISITION_EQUIPMENT = ("109101", "DCM", "Acquisition Equipment")  # CID 7005

# Transfer syntaxes whose decoding may have lost information (PS3.5 A.4, PS3.3 C.7.6.1.1.5).
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_2",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}

# Attributes never copied from a source: they would describe the source, not the derived image.
_DROP_ALWAYS = frozenset(
    {
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "IconImageSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
        "EncryptedAttributesSequence",
        "DataSetTrailingPadding",
        "InstanceCreatorUID",
        "SourceImageSequence",
        "DerivationDescription",
        "DerivationCodeSequence",
        "ReferencedSeriesSequence",
        "StudiesContainingOtherReferencedInstancesSequence",
        "SmallestPixelValueInSeries",
        "LargestPixelValueInSeries",
        "DeviceSerialNumber",
        "DeviceUID",
        "StationName",
        "DateOfLastCalibration",
        "TimeOfLastCalibration",
        "SOPInstanceStatus",
        "SOPAuthorizationDateTime",
        "SOPAuthorizationComment",
    }
)

# Enhanced CT attributes that have no place in a single-frame CT Image (PS3.3 A.38 vs A.3).
_ENHANCED_ONLY = frozenset(
    {
        "NumberOfFrames",
        "FrameIncrementPointer",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
        "DimensionOrganizationType",
        "ConcatenationUID",
        "InConcatenationNumber",
        "InConcatenationTotalNumber",
        "ConcatenationFrameOffsetNumber",
        "SOPInstanceUIDOfConcatenationSource",
        "RepresentativeFrameNumber",
        "PixelPresentation",
        "VolumetricProperties",
        "VolumeBasedCalculationTechnique",
        "AcquisitionContextSequence",
        "ContentQualification",
        "PresentationLUTShape",
        "ReferencedRawDataSequence",
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData",
        "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData",
        "PaletteColorLookupTableUID",
        "ImageType",
    }
)

# Type 1 attributes of the CT Image IOD that must be present with a value (PS3.3 A.3).
_REQUIRED_TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "PixelData",
)
# Type 2 attributes: present, possibly empty (PS3.3 A.3 modules).
_REQUIRED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "PositionReferenceIndicator",
    "SliceThickness",
    "KVP",
    "AcquisitionNumber",
)
_REQUIRED_TYPE1_TAGS = tuple((keyword, Tag(keyword)) for keyword in _REQUIRED_TYPE1)
_REQUIRED_TYPE2_TAGS = tuple((keyword, Tag(keyword)) for keyword in _REQUIRED_TYPE2)

# VRs whose values are text, padded with spaces (UI: with a NUL) to even length (PS3.5 6.2).
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)


class DerivedSeriesError(ValueError):
    """A derived instance could not be built or failed validation; nothing must be sent."""


@dataclass(frozen=True)
class DerivedSeriesOptions:
    """How the derived series presents itself to PACS users.

    series_description_prefix: put in front of "<target>-like <source description>", so a
        viewer user reads e.g. "STD Bl64d-like Thorax 1.0 Br40d" at a glance.
    series_number_offset: added to the source Series Number (IS, kept within 2**31 - 1).
    window_center_width: Window Center / Width (HU) written on every image, or None to keep the
        source's windows. Default lung window (-600 / 1200): the sharp target kernels this node
        produces are read in a lung window.
    window_explanation: Window Center & Width Explanation for that window.
    """

    series_description_prefix: str = "STD"
    series_number_offset: int = 1000
    window_center_width: tuple[float, float] | None = (-600.0, 1200.0)
    window_explanation: str = "LUNG"


@dataclass(frozen=True)
class DerivedSeries:
    """The validated derived series.

    datasets: CT Image Storage instances, each with file meta (Explicit VR Little Endian),
        ready for dcmwrite(enforce_file_format=True) or C-STORE. The series-level sequences
        (Derivation Code, Contributing Equipment, the code items of the references) are one
        object shared by the instances: replace such a sequence on an instance rather than
        change its items in place.
    series_instance_uid: the new Series Instance UID (deterministic, see `derived_series_uid`).
    clipped_pixels: how many output pixels fell outside the storable range and were clipped.
    """

    datasets: list[Dataset]
    series_instance_uid: str
    clipped_pixels: int


def derived_series_uid(source_series_uid: str, identity: EngineIdentity) -> str:
    """Series Instance UID of the derived series: 2.25.<int> from a hash of the source UID and
    the full engine identity (PS3.5 B.2), so re-running the same engine on the same series gives
    the same UID and the PACS updates one series instead of receiving a second one. Run-time
    settings (a sampler's step count) are part of the identity only when the engine has some, so
    engines without settings keep the UIDs they always had."""
    settings = (identity.settings,) if identity.settings else ()
    return name_based_uid(
        "derived series",
        source_series_uid,
        identity.name,
        identity.version,
        identity.weights_sha256,
        identity.source_kernel,
        identity.target_kernel,
        *settings,
    )


def derived_instance_uid(
    derived_series: str, source_sop_instance_uid: str, frame_number: int | None
) -> str:
    """SOP Instance UID of one derived image, deterministic like `derived_series_uid`."""
    return name_based_uid(
        "derived instance", derived_series, source_sop_instance_uid, str(frame_number or 0)
    )


def is_ltdiff_output(ds: Dataset) -> bool:
    """True if `ds` was produced by this node (the loop guard).

    Header only and cheap: looks for a Contributing Equipment item whose Manufacturer is
    "ltdiff-node", or a Derivation Description starting with our marker. Works on a dataset read
    with `stop_before_pixels=True`.
    """
    for item in ds.get("ContributingEquipmentSequence") or []:
        if str(item.get("Manufacturer", "")).strip() == MANUFACTURER:
            return True
    description = str(ds.get("DerivationDescription", "") or "")
    return description.startswith(DERIVATION_MARKER)


def series_description(source_description: str, identity: EngineIdentity, prefix: str) -> str:
    """'<prefix> <target>-like <source description>', cut to the 64 characters of LO."""
    text = " ".join(p for p in (prefix, f"{identity.target_kernel}-like", source_description) if p)
    return text.strip()[:64]


DERIVATION_DESCRIPTION_MAX = 1024
"""Characters of an ST value (PS3.5 6.2)."""


def derivation_description(identity: EngineIdentity, note: str = "") -> str:
    """Derivation Description (ST): what was done, by which engine and weights, and what the
    result is not (an original target-kernel reconstruction). `note` (the validated-envelope
    check, engine.envelope_policy) follows, cut with "..." where the whole would exceed the
    1024 characters of ST."""
    text = (
        f"{DERIVATION_MARKER}: {identity.source_kernel} -> {identity.target_kernel}-like by "
        f"{identity.name} {identity.version}, weights sha256 {identity.weights_sha256}"
        f"{f', settings {identity.settings}' if identity.settings else ''}. "
        f"Post-processed from the {identity.source_kernel} reconstruction; not an original "
        f"{identity.target_kernel} reconstruction."
    )
    if note:
        room = DERIVATION_DESCRIPTION_MAX - len(text) - 1
        text += " " + (note if len(note) <= room else note[: max(room - 3, 0)] + "...")
    return text[:DERIVATION_DESCRIPTION_MAX]


def _kernel_sharpness(kernel: str) -> int | None:
    """The number in a kernel name (Br40d -> 40, B70f -> 70): higher is sharper for the
    Siemens-style names this node handles; None when there is none."""
    match = re.search(r"(\d+)", kernel)
    return int(match.group(1)) if match else None


def derivation_code(identity: EngineIdentity) -> tuple[str, str, str]:
    """CID 7203 code for the kernel change: Edge enhancement towards a sharper kernel, Smoothing
    towards a softer one (by the kernel number); Edge enhancement when it cannot be told, as the
    node's purpose is the sharp lung look."""
    source, target = (
        _kernel_sharpness(identity.source_kernel),
        _kernel_sharpness(identity.target_kernel),
    )
    if source is not None and target is not None and target < source:
        return CODE_SMOOTHING
    return CODE_EDGE_ENHANCEMENT


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _now_parts(now: datetime) -> tuple[str, str, str]:
    """DA, TM and DT (with UTC offset when `now` is timezone-aware) for `now`, as given."""
    offset = now.strftime("%z")
    return (
        now.strftime("%Y%m%d"),
        now.strftime("%H%M%S.%f"),
        now.strftime("%Y%m%d%H%M%S.%f") + offset,
    )


def _is_copied(tag: BaseTag, *, multi_frame: bool) -> bool:
    """Whether a top-level source attribute stays true for a derived image: public, not pixel
    data, not one `_DROP_ALWAYS` names (nor, for Enhanced CT, `_ENHANCED_ONLY`)."""
    if tag.is_private or tag.group in (0x7FE0, 0xFFFA, 0xFFFC):
        return False
    keyword = keyword_for_tag(tag)
    return not (keyword in _DROP_ALWAYS or (multi_frame and keyword in _ENHANCED_ONLY))


_IMMUTABLE_VALUES = (str, int, float, bytes, PersonName, type(None))


def _shallow_copy(element: DataElement) -> DataElement:
    """What `copy.copy(element)` gives (a DataElement keeps its state in its `__dict__` and has
    no `__copy__`), without `copy`'s generic protocol: a tenth of the time, for the ~40
    elements of every instance."""
    duplicate = object.__new__(type(element))
    duplicate.__dict__.update(element.__dict__)
    return duplicate


def _copy_element(element: DataElement) -> DataElement:
    """A copy of a decoded element that shares nothing mutable with it: a shallow copy when
    its value is immutable (a string, number or bytes), else a deep copy, in which the
    immutable values of a multi-valued element are shared rather than copied."""
    value = element.value
    if element.VR != "SQ" and isinstance(value, _IMMUTABLE_VALUES):
        return _shallow_copy(element)
    memo: dict[int, object] = {}
    if isinstance(value, MultiValue):
        memo = {id(item): item for item in value if isinstance(item, _IMMUTABLE_VALUES)}
    return copy.deepcopy(element, memo)


def _copy_source(
    src: Dataset, *, multi_frame: bool, copied: dict[BaseTag, bool] | None = None
) -> dict[BaseTag, DataElement | RawDataElement]:
    """Public top-level attributes of `src` that stay true for a derived image (private tags
    and pixel data dropped; for Enhanced CT, multi-frame-only attributes dropped too), as the
    elements of a Dataset to be. `copied`: the decision per tag, remembered across calls.

    An element not decoded yet (most of a file read from disk) is an immutable tuple of its
    bytes: shared, it is decoded in the copy as it would be in the source, with the same
    Specific Character Set and Pixel Representation (both copied). Decoded elements are
    copied (`_copy_element`), so the source is never changed through them."""
    decisions: dict[BaseTag, bool] = {} if copied is None else copied
    out: dict[BaseTag, DataElement | RawDataElement] = {}
    # items(), not elements(): the same undecoded elements without sorting the tags (the
    # writer sorts them) or looking each one up again.
    for tag, element in src.items():
        keep = decisions.get(tag)
        if keep is None:
            keep = decisions[tag] = _is_copied(Tag(tag), multi_frame=multi_frame)
        if keep:
            out[tag] = element if isinstance(element, RawDataElement) else _copy_element(element)
    return out


def _contributing_equipment(
    src: Dataset, identity: EngineIdentity, contribution_dt: str
) -> Sequence:
    items = [copy.deepcopy(item) for item in src.get("ContributingEquipmentSequence") or []]
    has_acquisition = any(
        str(code.get("CodeValue", "")) == CODE_ACQUISITION_EQUIPMENT[0]
        for item in items
        for code in item.get("PurposeOfReferenceCodeSequence") or []
    )
    if not has_acquisition and src.get("Manufacturer"):
        scanner = Dataset()
        for keyword in (
            "Manufacturer",
            "InstitutionName",
            "InstitutionAddress",
            "InstitutionalDepartmentName",
            "StationName",
            "ManufacturerModelName",
            "DeviceSerialNumber",
            "SoftwareVersions",
        ):
            if src.get(keyword) not in (None, ""):
                setattr(scanner, keyword, copy.deepcopy(src[keyword].value))
        scanner.PurposeOfReferenceCodeSequence = Sequence([_code_item(CODE_ACQUISITION_EQUIPMENT)])
        items.append(scanner)
    ours = Dataset()
    ours.Manufacturer = MANUFACTURER
    ours.ManufacturerModelName = identity.name[:64]
    ours.SoftwareVersions = identity.version[:64]
    ours.ContributionDateTime = contribution_dt
    ours.ContributionDescription = (
        f"Kernel standardization {identity.source_kernel} -> {identity.target_kernel}-like "
        f"({identity.short})"
    )[:1024]
    ours.PurposeOfReferenceCodeSequence = Sequence([_code_item(CODE_PROCESSING_EQUIPMENT)])
    items.append(ours)
    return Sequence(items)


def declares_pixel_padding(loaded: LoadedSeries) -> bool:
    """Whether a source instance declares Pixel Padding: the builder then needs the source HU
    (`loaded.volume_hu`) to keep those pixels, so the engine must not write over them."""
    return any(ds.get("PixelPaddingValue") not in (None, "") for ds in loaded.datasets)


def _padding_mask(
    source_hu: np.ndarray, ds: Dataset, slope: float, intercept: float
) -> np.ndarray | None:
    """Pixels that were Pixel Padding (PS3.3 C.7.5.1.1.2) in the source, or None."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or pad == "":
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = sorted((int(pad), int(pad) if limit in (None, "") else int(limit)))
    source_stored = np.rint((source_hu.astype(np.float64) - intercept) / slope)
    mask: np.ndarray = (source_stored >= low) & (source_stored <= high)
    return mask if mask.any() else None


def build_derived_series(
    loaded: LoadedSeries,
    volume_hu: FloatVolume,
    identity: EngineIdentity,
    options: DerivedSeriesOptions | None = None,
    *,
    now: datetime | None = None,
    derivation_note: str = "",
) -> DerivedSeries:
    """Build the validated derived CT series for `volume_hu` (the engine output, HU, same shape
    as `loaded.volume_hu`): every instance of `DerivedSeriesBuilder`, in volume order. Raises
    DerivedSeriesError."""
    builder = DerivedSeriesBuilder(
        loaded, volume_hu, identity, options, now=now, derivation_note=derivation_note
    )
    datasets, clipped = builder.build_range(0, builder.n_slices)
    return DerivedSeries(
        datasets=datasets,
        series_instance_uid=builder.series_instance_uid,
        clipped_pixels=clipped,
    )


class DerivedSeriesBuilder:
    """Builds the derived series one instance at a time, so that a caller can write and send the
    first instances while later ones are still being built (and never holds them all).

    Single-frame sources: one CT Image Storage instance per source instance. Enhanced CT
    sources: one single-frame CT Image Storage instance per frame, referencing the enhanced
    instance and its frame in the Source Image Sequence (Referenced Frame Number), because every
    PACS and viewer displays CT Image Storage while Enhanced CT support is still patchy.
    Source Pixel Padding pixels are kept as padding. `derivation_note`: appended to the
    Derivation Description (why this engine ran, engine.envelope_policy). Every instance is
    validated before it is returned; a failure raises DerivedSeriesError. What does not depend
    on the slot is computed once per source series and its sequences are shared by the
    instances (see `DerivedSeries.datasets`).
    """

    def __init__(
        self,
        loaded: LoadedSeries,
        volume_hu: FloatVolume,
        identity: EngineIdentity,
        options: DerivedSeriesOptions | None = None,
        *,
        now: datetime | None = None,
        derivation_note: str = "",
    ) -> None:
        if volume_hu.shape != loaded.volume_hu.shape:
            raise DerivedSeriesError(
                f"engine output shape {volume_hu.shape} differs from the source volume "
                f"{loaded.volume_hu.shape}"
            )
        if np.may_share_memory(volume_hu, loaded.volume_hu) and declares_pixel_padding(loaded):
            raise DerivedSeriesError(
                "the engine output is in the source volume, but the source's Pixel Padding "
                "pixels are needed to build the derived series"
            )
        self._loaded = loaded
        self._volume_hu = volume_hu
        self._identity = identity
        self._options = options or DerivedSeriesOptions()
        self._date, self._time, self._datetime = _now_parts(now or datetime.now().astimezone())
        self._source_series = loaded.series_instance_uid
        self.series_instance_uid = derived_series_uid(self._source_series, identity)
        self._derivation = derivation_description(identity, derivation_note)
        self._code = derivation_code(identity)
        self._copied: dict[bool, dict[BaseTag, bool]] = {False: {}, True: {}}
        self._constants_by_source: dict[object, list[tuple[str, object, DataElement]]] = {}
        self._source_purpose = Sequence([_code_item(CODE_SOURCE_FOR_PROCESSING)])

    @property
    def n_slices(self) -> int:
        return len(self._loaded.frame_sources)

    def build_range(self, start: int, stop: int) -> tuple[list[Dataset], int]:
        """The instances of slots [start, stop) in volume order, and how many of their pixels
        were clipped to the storable range."""
        datasets, clipped = [], 0
        for slot in range(start, min(stop, self.n_slices)):
            ds, slot_clipped = self.build(slot)
            datasets.append(ds)
            clipped += slot_clipped
        return datasets, clipped

    def build(self, slot: int) -> tuple[Dataset, int]:
        """The validated instance of one slot (0-based, volume order) and its clipped pixels."""
        loaded = self._loaded
        source = loaded.frame_sources[slot]
        src = loaded.datasets[source.dataset_index]
        multi_frame = source.frame_number is not None
        ds = Dataset(_copy_source(src, multi_frame=multi_frame, copied=self._copied[multi_frame]))
        for element in list(ds.values()):
            if element.VR == "SQ" and isinstance(element, DataElement):
                ds[element.tag] = element  # as Dataset.__setitem__ files a sequence
        if multi_frame:
            for element in frame_header(src, source.frame_number):
                ds.add(copy.deepcopy(element))
            ds.InstanceNumber = slot + 1
            ds.SliceLocation = f"{loaded.geometry.slice_positions_mm[slot]:.6g}"
        source_sop = str(src.SOPInstanceUID)

        # SOP Common, General Series, General Image, Equipment: the same on every instance of
        # a source series (`_constants`); the SOP Instance UID and the references are not.
        for keyword, value, element in self._constants(src, multi_frame=multi_frame):
            if _reusable(ds, element):
                # Sequences are shared (the encoder then encodes them once), other values not.
                ds[element.tag] = (
                    _shallow_copy(element) if element.VR == "SQ" else _copy_element(element)
                )
            else:
                setattr(ds, keyword, value)  # keeps the VR of the copied source element
        ds.SOPInstanceUID = derived_instance_uid(
            self.series_instance_uid, source_sop, source.frame_number
        )
        self._add_references(ds, src, source_sop, source.frame_number)

        # Lossy history must survive decompression (PS3.3 C.7.6.1.1.5).
        lossy_method = _LOSSY_METHODS.get(str(transfer_syntax_of(src)))
        if lossy_method is not None and ds.get("LossyImageCompression") != "01":
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = lossy_method

        if self._options.window_center_width is not None:
            for keyword in ("VOILUTSequence", "VOILUTFunction"):
                if keyword in ds:
                    del ds[keyword]

        if not ds.get("FrameOfReferenceUID"):
            # Type 1 for CT, yet absent in some real files. Invent one per source series, so
            # the derived images at least share a frame of reference among themselves.
            ds.FrameOfReferenceUID = name_based_uid("frame of reference", self._source_series)
        for keyword, tag in _REQUIRED_TYPE2_TAGS:
            if tag not in ds:
                setattr(ds, keyword, None)

        ds.file_meta = _file_meta(ds)
        clipped = self._store_pixels(ds, slot, source_sop)
        validate_derived_instance(ds)
        return ds, clipped

    def _constants(
        self, src: Dataset, *, multi_frame: bool
    ) -> list[tuple[str, object, DataElement]]:
        """(keyword, value, element) of the attributes every instance from `src` gets that do
        not depend on the slot, in the order they are set. Remembered per distinct value of
        the source attributes they are made of (`_source_key`), so a series computes them once
        and its instances share the sequence values (an encoder then encodes them once)."""
        key = _source_key(src, multi_frame=multi_frame)
        known = self._constants_by_source.get(key) if key is not None else None
        if known is None:
            known = self._make_constants(src, multi_frame=multi_frame)
            if key is not None:
                self._constants_by_source[key] = known
        return known

    def _make_constants(
        self, src: Dataset, *, multi_frame: bool
    ) -> list[tuple[str, object, DataElement]]:
        identity, options = self._identity, self._options
        date, time = self._date, self._time
        source_number = src.get("SeriesNumber")
        number = (int(source_number) if source_number not in (None, "") else 0) + (
            options.series_number_offset
        )
        source_type = [str(v) for v in (src.get("ImageType") or [])]
        value3 = source_type[2] if len(source_type) > 2 else "AXIAL"
        if value3 not in ("AXIAL", "LOCALIZER"):
            value3 = "AXIAL"  # the only Value 3 terms of the CT Image Module (C.8.2.1.1.1)
        codes = [_code_item(self._code)]
        if multi_frame:
            codes.append(_code_item(CODE_FRAMES_EXTRACTED))
        values: list[tuple[str, object]] = [
            ("SOPClassUID", CTImageStorage),
            ("SeriesInstanceUID", self.series_instance_uid),
            ("InstanceCreationDate", date),
            ("InstanceCreationTime", time),
            ("SeriesDate", date),
            ("SeriesTime", time),
            ("ContentDate", date),
            ("ContentTime", time),
            ("SeriesNumber", min(max(number, 0), 2**31 - 1)),
            (
                "SeriesDescription",
                series_description(
                    str(src.get("SeriesDescription", "") or ""),
                    identity,
                    options.series_description_prefix,
                ),
            ),
            ("ImageType", ["DERIVED", "SECONDARY", value3]),
            ("DerivationDescription", self._derivation),
            ("DerivationCodeSequence", Sequence(codes)),
            # This node made the instance; the scanner is kept as acquisition equipment.
            (
                "ContributingEquipmentSequence",
                _contributing_equipment(src, identity, self._datetime),
            ),
            ("Manufacturer", MANUFACTURER),
            ("ManufacturerModelName", identity.name[:64]),
            ("SoftwareVersions", identity.version[:64]),
        ]
        if options.window_center_width is not None:
            center, width = (f"{v:g}" for v in options.window_center_width)
            values += [
                ("WindowCenter", center),
                ("WindowWidth", width),
                ("WindowCenterWidthExplanation", options.window_explanation),
            ]
        scratch = Dataset()
        for keyword, value in values:
            setattr(scratch, keyword, value)
        return [(keyword, value, scratch[keyword]) for keyword, value in values]

    def _add_references(
        self, ds: Dataset, src: Dataset, source_sop: str, frame_number: int | None
    ) -> None:
        """Source Image Sequence (PS3.3 C.7.6.1) and Referenced Series Sequence (C.12.2).

        Built from elements rather than attribute by attribute: the same Datasets, at a third
        of the cost (this runs for every instance)."""
        sop_class = src.SOPClassUID
        reference = [
            DataElement(_REFERENCED_SOP_CLASS_UID, "UI", sop_class),
            DataElement(_REFERENCED_SOP_INSTANCE_UID, "UI", source_sop),
        ]
        if frame_number is not None:
            reference.append(DataElement(_REFERENCED_FRAME_NUMBER, "IS", frame_number))
        reference.append(DataElement(_PURPOSE_OF_REFERENCE, "SQ", self._source_purpose))
        ds[_SOURCE_IMAGE_SEQUENCE] = DataElement(
            _SOURCE_IMAGE_SEQUENCE, "SQ", Sequence([_item_of(reference)])
        )
        instance = _item_of(
            [
                DataElement(_REFERENCED_SOP_CLASS_UID, "UI", sop_class),
                DataElement(_REFERENCED_SOP_INSTANCE_UID, "UI", source_sop),
            ]
        )
        series = _item_of(
            [
                DataElement(_SERIES_INSTANCE_UID, "UI", self._source_series),
                DataElement(_REFERENCED_INSTANCE_SEQUENCE, "SQ", Sequence([instance])),
            ]
        )
        ds[_REFERENCED_SERIES_SEQUENCE] = DataElement(
            _REFERENCED_SERIES_SEQUENCE, "SQ", Sequence([series])
        )

    def _store_pixels(self, ds: Dataset, slot: int, source_sop: str) -> int:
        """Write the slot's output pixels into `ds` in the source's storage representation
        (source Pixel Padding kept); return how many were clipped."""
        try:
            rescale = modality_rescale(ds)
            if rescale is None:
                raise DerivedSeriesError(
                    f"source instance {source_sop} has no Rescale Slope / Intercept to store HU"
                )
            slope, intercept = rescale
            hu = self._volume_hu[slot]
            source_hu = self._loaded.volume_hu[slot]
            mask = _padding_mask(source_hu, ds, slope, intercept)
            if mask is not None:
                hu = np.where(mask, source_hu, hu)
            stored, clipped = hu_to_stored(hu, ds)
            _write_pixels(ds, stored)
        except PixelFormatError as exc:
            raise DerivedSeriesError(f"source instance {source_sop}: {exc}") from exc
        return clipped


_CONSTANTS_SOURCE_TAGS = tuple(
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet",
        "ImageType",
        "Manufacturer",
        "InstitutionName",
        "InstitutionAddress",
        "StationName",
        "SeriesDescription",
        "InstitutionalDepartmentName",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SeriesNumber",
        "SoftwareVersions",
        "ContributingEquipmentSequence",
    )
)
"""The source attributes `DerivedSeriesBuilder._make_constants` reads."""


def _source_key(src: Dataset, *, multi_frame: bool) -> tuple[object, ...] | None:
    """A key equal for two sources exactly when their `_CONSTANTS_SOURCE_TAGS` are (same raw
    bytes read the same way, or the same exactly-typed value); None when one cannot be keyed."""
    parts: list[object] = [multi_frame]
    for tag in _CONSTANTS_SOURCE_TAGS:
        if tag not in src:
            parts.append(None)
            continue
        key = element_key(src.get_item(tag))
        if key is None:
            return None
        parts.append(key)
    return tuple(parts)


_REFERENCED_SOP_CLASS_UID = Tag("ReferencedSOPClassUID")
_REFERENCED_SOP_INSTANCE_UID = Tag("ReferencedSOPInstanceUID")
_REFERENCED_FRAME_NUMBER = Tag("ReferencedFrameNumber")
_PURPOSE_OF_REFERENCE = Tag("PurposeOfReferenceCodeSequence")
_SOURCE_IMAGE_SEQUENCE = Tag("SourceImageSequence")
_SERIES_INSTANCE_UID = Tag("SeriesInstanceUID")
_REFERENCED_INSTANCE_SEQUENCE = Tag("ReferencedInstanceSequence")
_REFERENCED_SERIES_SEQUENCE = Tag("ReferencedSeriesSequence")


def _item_of(elements: list[DataElement]) -> Dataset:
    """A sequence item holding `elements` (decoded, in ascending tag order, none of them raw or
    private): what setting them one by one would give."""
    return Dataset({element.tag: element for element in elements})


def _reusable(ds: Dataset, constant: DataElement) -> bool:
    """Whether a copy of `constant` may replace what `ds` holds under its tag: yes when
    nothing or an element of the same VR (not a sequence) is there. Otherwise the value is set
    on the element there (as an attribute assignment does), which keeps its VR and, for a
    sequence, its undefined length."""
    if constant.tag not in ds:
        return True
    existing = ds.get_item(constant.tag)
    vr = existing.VR if existing.VR is not None else constant.VR  # implicit VR: dictionary VR
    return vr == constant.VR and vr != "SQ"


def _file_meta(ds: Dataset) -> FileMetaDataset:
    return FileMetaDataset(
        {
            element.tag: element
            for element in (
                DataElement(0x00020002, "UI", ds.SOPClassUID),
                DataElement(0x00020003, "UI", ds.SOPInstanceUID),
                DataElement(0x00020010, "UI", ExplicitVRLittleEndian),
                DataElement(0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
                DataElement(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
            )
        }
    )


def _is_empty(ds: Dataset, tag: BaseTag) -> bool:
    """Whether `ds` lacks `tag` or its value reads as None or "" (`ds.get(keyword)`), told from
    the bytes of an element not decoded yet (a copied source element), so that validating
    does not decode it: text of only padding reads as "", binary values of no bytes as None."""
    if tag not in ds:
        return True
    element = ds.get_item(tag)
    # Implicit VR (None) and UN are decoded with the dictionary's VR: decode those to tell.
    if isinstance(element, RawDataElement) and element.VR not in (None, "UN"):
        raw = element.value
        if not raw:
            return True
        return element.VR in _TEXT_VRS and not raw.strip(b" \x00")
    return ds[tag].value in (None, "")


def validate_derived_instance(ds: Dataset) -> None:
    """Raise DerivedSeriesError unless `ds` is a complete CT Image Storage instance: Type 1
    attributes present with values, Type 2 present, UIDs well formed, file meta consistent,
    Pixel Data of Rows x Columns x Bits Allocated / 8 bytes (padded to even length)."""
    label = f"derived instance {ds.get('SOPInstanceUID', '?')}"
    problems = [f"{k} missing or empty" for k, tag in _REQUIRED_TYPE1_TAGS if _is_empty(ds, tag)]
    problems += [f"{k} missing" for k, tag in _REQUIRED_TYPE2_TAGS if tag not in ds]
    if ds.get("SOPClassUID") != CTImageStorage:
        problems.append(f"SOP Class {ds.get('SOPClassUID')} is not CT Image Storage")
    if ds.get("Modality") != "CT":
        problems.append("Modality is not CT")
    image_type = list(ds.get("ImageType") or [])
    if image_type[:2] != ["DERIVED", "SECONDARY"]:
        problems.append(f"Image Type {image_type} is not DERIVED\\SECONDARY")
    uid_keywords = (
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
    )
    for keyword in uid_keywords:
        if ds.get(keyword) not in (None, "") and not is_valid_uid(ds.get(keyword)):
            problems.append(f"{keyword} {ds.get(keyword)!r} is not a valid UID")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        problems.append("file meta information missing")
    else:
        if meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
            problems.append("file meta Media Storage SOP Instance UID differs from the dataset")
        if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID"):
            problems.append("file meta Media Storage SOP Class UID differs from the dataset")
        if meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
            problems.append("transfer syntax is not Explicit VR Little Endian")
    if not problems:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        expected += expected % 2
        if len(ds.PixelData) != expected:
            problems.append(f"Pixel Data has {len(ds.PixelData)} bytes, expected {expected}")
        if int(ds.HighBit) != int(ds.BitsStored) - 1:
            problems.append("High Bit is not Bits Stored - 1")
    if problems:
        raise DerivedSeriesError(f"{label} is invalid: " + "; ".join(problems))
