"""Derived series headers, UIDs, validation and the loop guard."""

from __future__ import annotations

import copy
import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

import engine.derived as derived_module
from engine.derived import (
    CODE_EDGE_ENHANCEMENT,
    CODE_FRAMES_EXTRACTED,
    CODE_PROCESSING_EQUIPMENT,
    CODE_SMOOTHING,
    CODE_SOURCE_FOR_PROCESSING,
    DerivedSeriesError,
    DerivedSeriesOptions,
    build_derived_series,
    derivation_description,
    derived_series_uid,
    is_ltdiff_output,
    is_valid_uid,
    name_based_uid,
    validate_derived_instance,
)
from engine.interface import EngineIdentity
from engine.series_io import LoadedSeries, load_series
from engine.synthetic import make_ct_series

IDENTITY = EngineIdentity(
    name="linear-filter",
    version="0.1.0",
    weights_sha256="0123456789abcdef" * 4,
    source_kernel="Br40d",
    target_kernel="Bl64d",
)
NOW = datetime(2024, 5, 6, 7, 8, 9)


def _loaded(tmp_path: Path, n: int = 3, **kwargs) -> LoadedSeries:
    paths = []
    for i, ds in enumerate(make_ct_series(n, 16, 16, **kwargs)):
        ds.add_new(0x00091010, "LO", "vendor secret")
        path = tmp_path / f"{i}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return load_series(paths)


def _build(loaded: LoadedSeries, volume=None, identity=IDENTITY, options=None):
    volume = loaded.volume_hu.copy() if volume is None else volume
    return build_derived_series(loaded, volume, identity, options, now=NOW)


def test_synthetic_series_uids_are_reproducible():
    assert make_ct_series(1, 4, 4)[0].SOPInstanceUID == make_ct_series(1, 4, 4)[0].SOPInstanceUID


def test_codes_match_pydicom_code_dictionary():
    for ours, theirs in (
        (CODE_EDGE_ENHANCEMENT, codes.cid7203.EdgeEnhancement),
        (CODE_SMOOTHING, codes.cid7203.Smoothing),
        (CODE_FRAMES_EXTRACTED, codes.cid7203.SpatiallyRelatedFramesExtractedFromTheVolume),
        (CODE_SOURCE_FOR_PROCESSING, codes.DCM.SourceImageForImageProcessingOperation),
        (CODE_PROCESSING_EQUIPMENT, codes.cid7005.ProcessingEquipment),
    ):
        assert ours[:2] == (theirs.value, theirs.scheme_designator)
        assert ours[2].lower() == theirs.meaning.lower()


def test_derived_uids_deterministic_and_differ_from_source(tmp_path):
    loaded = _loaded(tmp_path)
    first, second = _build(loaded), _build(loaded)
    assert first.series_instance_uid == second.series_instance_uid
    assert [d.SOPInstanceUID for d in first.datasets] == [d.SOPInstanceUID for d in second.datasets]
    source_uids = {str(ds.SOPInstanceUID) for ds in loaded.datasets}
    out_uids = {str(ds.SOPInstanceUID) for ds in first.datasets}
    assert len(out_uids) == 3
    assert not out_uids & source_uids
    assert first.series_instance_uid != loaded.series_instance_uid
    assert first.series_instance_uid.startswith("2.25.")
    assert all(is_valid_uid(uid) for uid in out_uids | {first.series_instance_uid})
    other = EngineIdentity("linear-filter", "0.2.0", IDENTITY.weights_sha256, "Br40d", "Bl64d")
    assert derived_series_uid(loaded.series_instance_uid, other) != first.series_instance_uid


def test_engine_settings_enter_the_series_uid_only_when_present():
    source = "1.2.3.4"
    plain = EngineIdentity("ltdiff++", "0.1.0", "ab" * 32, "Br40d", "Bl64d")
    eight = EngineIdentity("ltdiff++", "0.1.0", "ab" * 32, "Br40d", "Bl64d", "ddim8 eta0")
    four = EngineIdentity("ltdiff++", "0.1.0", "ab" * 32, "Br40d", "Bl64d", "ddim4 eta0")
    uids = {derived_series_uid(source, i) for i in (plain, eight, four)}
    assert len(uids) == 3, "a sampler change must give a new derived series"
    # An engine without settings keeps the UID it had before settings existed (name-based on
    # the same parts), so upgrading the node does not duplicate the linear engine's series.
    assert derived_series_uid(source, plain) == name_based_uid(
        "derived series", source, "ltdiff++", "0.1.0", "ab" * 32, "Br40d", "Bl64d"
    )
    assert eight.short.endswith(" ddim8 eta0") and not plain.short.endswith("eta0")
    assert ", settings ddim8 eta0. " in derivation_description(eight)
    assert "settings" not in derivation_description(plain)


def test_derived_headers_keep_patient_study_for_and_mark_derived(tmp_path):
    loaded = _loaded(tmp_path)
    derived = _build(loaded)
    for src, out in zip(loaded.datasets, derived.datasets, strict=True):
        for keyword in (
            "PatientName",
            "PatientID",
            "StudyInstanceUID",
            "AccessionNumber",
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "InstanceNumber",
            "SliceLocation",
            "InstitutionName",
        ):
            assert out[keyword].value == src[keyword].value, keyword
        assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert out.ConvolutionKernel == "Br40d", "must not claim an original Bl64d acquisition"
        assert out.SeriesDescription == "STD Bl64d-like Thorax 1.0 Br40d"
        assert out.SeriesNumber == 1003
        assert out.DerivationDescription.startswith("ltdiff-node kernel standardization")
        assert IDENTITY.weights_sha256 in out.DerivationDescription
        assert out.DerivationCodeSequence[0].CodeValue == "113086"
        source_ref = out.SourceImageSequence[0]
        assert source_ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert source_ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        ours = out.ContributingEquipmentSequence[-1]
        assert ours.Manufacturer == "ltdiff-node"
        assert ours.SoftwareVersions == "0.1.0"
        assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        scanner = out.ContributingEquipmentSequence[0]
        assert scanner.Manufacturer == "SIEMENS"
        assert out.Manufacturer == "ltdiff-node"
        assert (out.WindowCenter, out.WindowWidth) == (-600, 1200)
        assert out.SeriesDate == "20240506"
        assert out.InstanceCreationTime.startswith("070809")
        assert not any(element.tag.is_private for element in out), "private tags are dropped"


def test_options_change_description_number_and_window(tmp_path):
    loaded = _loaded(tmp_path, n=1)
    options = DerivedSeriesOptions(
        series_description_prefix="", series_number_offset=50, window_center_width=None
    )
    out = _build(loaded, options=options).datasets[0]
    assert out.SeriesDescription == "Bl64d-like Thorax 1.0 Br40d"
    assert out.SeriesNumber == 53
    assert (out.WindowCenter, out.WindowWidth) == (40, 400), "source window kept"


def test_smoothing_code_when_target_kernel_is_softer(tmp_path):
    loaded = _loaded(tmp_path, n=1)
    softer = EngineIdentity("linear-filter", "0.1.0", IDENTITY.weights_sha256, "Bl64d", "Br40d")
    out = _build(loaded, identity=softer).datasets[0]
    assert out.DerivationCodeSequence[0].CodeValue == "113087"


def test_pixels_written_in_source_storage_and_clipping_counted(tmp_path):
    loaded = _loaded(tmp_path, n=2)
    volume = loaded.volume_hu.copy()
    volume[0, 0, :4] = -2000.0  # unsigned 12-bit with intercept -1024 cannot go below -1024
    derived = _build(loaded, volume)
    assert derived.clipped_pixels == 4
    out = derived.datasets[0]
    assert (out.BitsStored, out.PixelRepresentation, out.RescaleIntercept) == (12, 0, -1024)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.pixel_array[0, :4].tolist() == [0, 0, 0, 0]


def test_pixel_padding_is_preserved(tmp_path):
    loaded = _loaded(tmp_path, n=1)
    src = loaded.datasets[0]
    src.PixelPaddingValue = 24  # stored 24 = -1000 HU: the air outside the phantom
    volume = loaded.volume_hu + 100.0
    out = _build(loaded, volume).datasets[0]
    padded = loaded.volume_hu[0] == -1000.0
    assert padded.any()
    assert (out.pixel_array[padded] == 24).all()
    assert (out.pixel_array[~padded] == src.pixel_array[~padded] + 100).all()


def test_an_output_written_over_a_padded_source_is_refused(tmp_path):
    """The padding pixels come from the source volume: an engine output in that same memory
    would silently lose them."""
    loaded = _loaded(tmp_path, n=1)
    loaded.datasets[0].PixelPaddingValue = 24
    with pytest.raises(DerivedSeriesError, match="Pixel Padding"):
        _build(loaded, loaded.volume_hu)
    loaded.datasets[0].PixelPaddingValue = None
    assert len(_build(loaded, loaded.volume_hu).datasets) == 1


def test_lossy_source_stays_marked_lossy(tmp_path):
    path = get_testdata_file("693_J2KI.dcm")
    if path is None:
        pytest.skip("693_J2KI.dcm not available")
    loaded = load_series([path])
    out = _build(loaded).datasets[0]
    assert out.LossyImageCompression == "01"
    assert "FrameOfReferenceUID" not in loaded.datasets[0], "this real file lacks it"
    assert out.FrameOfReferenceUID.startswith("2.25."), "invented, deterministic"
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_enhanced_ct_source_gives_one_ct_image_per_frame():
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("eCT_Supplemental.dcm not available")
    loaded = load_series([path])
    derived = _build(loaded)
    assert len(derived.datasets) == 2
    for slot, out in enumerate(derived.datasets):
        assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert "NumberOfFrames" not in out
        assert "PerFrameFunctionalGroupsSequence" not in out
        reference = out.SourceImageSequence[0]
        assert reference.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
        assert reference.ReferencedFrameNumber == loaded.frame_sources[slot].frame_number
        assert [c.CodeValue for c in out.DerivationCodeSequence] == ["113086", "113091"]
        assert out.InstanceNumber == slot + 1
    assert [float(d.ImagePositionPatient[2]) for d in derived.datasets] == [-149.0, -159.0]
    assert derived.datasets[0].PixelSpacing == [0.388672, 0.388672]


def test_loop_guard_recognises_our_output(tmp_path):
    loaded = _loaded(tmp_path, n=1)
    out = _build(loaded).datasets[0]
    assert is_ltdiff_output(out)
    assert not is_ltdiff_output(loaded.datasets[0])
    buffer = io.BytesIO()
    dcmwrite(buffer, out, enforce_file_format=True)
    buffer.seek(0)
    assert is_ltdiff_output(pydicom.dcmread(buffer, stop_before_pixels=True))
    del out.ContributingEquipmentSequence
    assert is_ltdiff_output(out), "the Derivation Description marker alone is enough"


def test_derived_passes_validation_and_round_trips_through_dcmwrite(tmp_path):
    loaded = _loaded(tmp_path)
    derived = _build(loaded)
    for out in derived.datasets:
        validate_derived_instance(out)
        buffer = io.BytesIO()
        dcmwrite(buffer, out, enforce_file_format=True)
        buffer.seek(0)
        back = pydicom.dcmread(buffer)
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.SOPInstanceUID == out.SOPInstanceUID
        validate_derived_instance(back)
        np.testing.assert_array_equal(back.pixel_array, out.pixel_array)


def test_validation_rejects_broken_instances(tmp_path):
    out = _build(_loaded(tmp_path, n=1)).datasets[0]
    out.PixelData = out.PixelData[:-2]
    with pytest.raises(DerivedSeriesError, match="Pixel Data has"):
        validate_derived_instance(out)
    out = _build(_loaded(tmp_path, n=1)).datasets[0]
    out.SeriesInstanceUID = "1.02.3"
    out.FrameOfReferenceUID = ""
    with pytest.raises(DerivedSeriesError, match=r"FrameOfReferenceUID missing.*not a valid UID"):
        validate_derived_instance(out)


def test_wrong_volume_shape_rejected(tmp_path):
    loaded = _loaded(tmp_path, n=2)
    with pytest.raises(DerivedSeriesError, match="shape"):
        _build(loaded, loaded.volume_hu[:1].copy())


def _encoded(datasets) -> list[bytes]:
    out = []
    for ds in datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_sources_read_lazily_or_fully_decoded_give_the_same_bytes_and_stay_unchanged(tmp_path):
    """The builder shares a source's not-yet-decoded elements instead of deep-copying them
    (a 300-slice series spent half its build time in deepcopy): the derived instances must be
    byte for byte those built from fully decoded sources, latin-1 text and sequences included,
    and the sources must not change."""
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99TEST", "Prozedur Ä"
    paths = []
    for i, ds in enumerate(make_ct_series(3, 16, 16)):
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.InstitutionName = "Klinik Süd"
        ds.ProcedureCodeSequence = pydicom.Sequence([item])
        paths.append(tmp_path / f"{i}.dcm")
        dcmwrite(paths[-1], ds, enforce_file_format=True)
    loaded = load_series(paths)
    before = [ds.get_item("InstitutionName") for ds in loaded.datasets]
    assert all(isinstance(e, pydicom.dataelem.RawDataElement) for e in before), "read lazily"
    lazy = _encoded(_build(loaded).datasets)
    sources = _encoded(loaded.datasets)
    for ds in loaded.datasets:
        for element in ds:  # iterating decodes every element
            del element
    assert [ds.get_item("InstitutionName") for ds in loaded.datasets] != before
    decoded = _encoded(_build(loaded).datasets)
    assert lazy == decoded
    assert _encoded(loaded.datasets) == sources
    derived = pydicom.dcmread(io.BytesIO(lazy[0]))
    assert derived.InstitutionName == "Klinik Süd"
    assert derived.ProcedureCodeSequence[0].CodeMeaning == "Prozedur Ä"


@pytest.mark.parametrize(
    ("vr", "raw", "implicit"),
    [
        ("CS", b"CT", False),
        ("CS", b"  ", False),
        ("UI", b"\x00", False),
        ("UI", b"1.2.3\x00", False),
        ("DS", b"", False),
        ("DS", b"-1024 ", False),
        ("IS", b" ", False),
        ("CS", b"\\", False),  # two empty values: a MultiValue, not ""
        ("US", b"\x00\x00", False),  # binary zero is a value
        ("US", b"", False),
        ("CS", b"  ", True),  # implicit VR: told by decoding
        ("US", b"\x00\x00", True),
        ("UN", b"  ", False),  # UN: decoded with the dictionary's VR (CS), so told by decoding
        ("UN", b"CT", False),
    ],
)
def test_type1_emptiness_is_told_from_raw_bytes_as_decoding_would(vr, raw, implicit):
    """Validation decides "missing or empty" on the undecoded bytes of copied source elements
    (decoding them all cost a sixth of the build); the answer must be what `ds.get(keyword) in
    (None, "")` says after decoding."""
    tag = pydicom.tag.Tag("Modality" if vr != "US" else "Rows")
    if vr in ("DS", "IS", "UI"):
        tag = pydicom.tag.Tag(
            {"DS": "RescaleIntercept", "IS": "InstanceNumber", "UI": "SOPInstanceUID"}[vr]
        )
    element = pydicom.dataelem.RawDataElement(
        tag, None if implicit else vr, len(raw), raw, 0, implicit, True
    )
    ds = pydicom.Dataset({tag: element})
    decoded = pydicom.Dataset({tag: element}).get(tag)
    expected = decoded is None or decoded.value in (None, "")
    assert derived_module._is_empty(ds, tag) is expected
    if not implicit and vr != "UN":
        assert isinstance(ds.get_item(tag), pydicom.dataelem.RawDataElement), "left undecoded"
    assert derived_module._is_empty(pydicom.Dataset(), tag)


def test_shallow_copy_is_copy_copy():
    """`_shallow_copy` stands in for copy.copy of a DataElement; it is only that while pydicom
    keeps an element's state in its __dict__ with no copy hooks of its own."""
    for hook in ("__copy__", "__getstate__", "__setstate__", "__slots__"):
        assert hook not in vars(pydicom.dataelem.DataElement), hook
    element = pydicom.dataelem.DataElement(0x00080060, "CS", "CT")
    element.private_creator = None
    duplicate = derived_module._shallow_copy(element)
    assert duplicate is not element
    assert type(duplicate) is type(element)
    assert vars(duplicate) == vars(copy.copy(element))
    duplicate.value = "MR"
    assert element.value == "CT"
