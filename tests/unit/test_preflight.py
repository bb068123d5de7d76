"""Reception limits (dicom_node/preflight.py): what is refused before pydicom parses a dataset."""

from __future__ import annotations

import struct
import time
from io import BytesIO

import pytest
from dicom_bytes import deflate, deflate_bomb, element, encode, nested_sequence
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_preamble
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.audit.reception import read_subject
from dicom_node.preflight import (
    DatasetRejectedError,
    ReceptionLimits,
    inflate_capped,
    read_header,
    scan_structure,
)
from dicom_node.scp import HEADER_KEYWORDS, HEADER_TAGS, routing_header
from engine.synthetic import make_ct_series

LIMITS = ReceptionLimits()


def _dataset_bytes(path: str) -> tuple[bytes, str]:
    """The encoded dataset of a Part 10 file (after its file meta) and its transfer syntax."""
    raw = open(path, "rb").read()  # noqa: PTH123, SIM115 - a small test file
    ds = dcmread(path, stop_before_pixels=True)
    fp = BytesIO(raw)
    read_preamble(fp, False)
    # group 0002 is explicit VR LE; its group length says where the dataset starts
    group_length = struct.unpack("<L", raw[fp.tell() + 8 : fp.tell() + 12])[0]
    start = fp.tell() + 12 + group_length
    return raw[start:], str(ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle.dcm",
        "rtplan.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
    ],
)
def test_real_files_in_every_encoding_pass_and_decode(name):
    data, syntax = _dataset_bytes(get_testdata_file(name))
    header = read_header(data, syntax, LIMITS)
    assert header.SOPInstanceUID == dcmread(get_testdata_file(name)).SOPInstanceUID
    assert "PixelData" not in header, "the header stops before the pixel data"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_header_is_every_element_before_the_top_level_pixel_data(name):
    """read_header hands pydicom only the bytes before Pixel Data (no copy of the pixels): the
    scan finds where it starts, and the header has every element the full decode has before it."""
    data, syntax = _dataset_bytes(get_testdata_file(name))
    syntax_uid = UID(syntax)
    structure = scan_structure(
        data,
        implicit_vr=syntax_uid.is_implicit_VR,
        little_endian=syntax_uid.is_little_endian,
        limits=LIMITS,
    )
    assert structure.pixel_data_at is not None
    assert data[structure.pixel_data_at : structure.pixel_data_at + 4] == b"\xe0\x7f\x10\x00"
    full = dcmread(get_testdata_file(name))
    before = [e.tag for e in full if e.tag < 0x7FE00010]
    assert [e.tag for e in read_header(data, syntax, LIMITS)] == before


def test_synthetic_ct_in_implicit_and_big_endian_encodings_passes():
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="preflight")
    for implicit, little, syntax in (
        (True, True, ImplicitVRLittleEndian),
        (False, True, ExplicitVRLittleEndian),
        (False, False, ExplicitVRBigEndian),
    ):
        data = encode(ds, implicit=implicit, little=little)
        assert read_header(data, syntax, LIMITS).SeriesInstanceUID == ds.SeriesInstanceUID


def test_sequences_nested_300_deep_are_refused_as_a_limit_quickly():
    data = element(0x0008, 0x0060, b"CS", b"CT") + nested_sequence(300)
    assert len(data) < 12_000, "the campaign's poison pill was a few KB on the wire"
    started = time.perf_counter()
    with pytest.raises(DatasetRejectedError, match="nested deeper than 16") as info:
        read_header(data, ExplicitVRLittleEndian, LIMITS)
    assert info.value.limit
    assert time.perf_counter() - started < 1.0


def test_nesting_up_to_the_limit_passes_and_one_more_is_refused():
    limits = ReceptionLimits(max_sequence_depth=5)
    assert (
        scan_structure(
            nested_sequence(5), implicit_vr=False, little_endian=True, limits=limits
        ).max_depth
        == 5
    )
    with pytest.raises(DatasetRejectedError):
        scan_structure(nested_sequence(6), implicit_vr=False, little_endian=True, limits=limits)


def test_implicit_vr_nesting_is_counted_too():
    # implicit VR: undefined-length elements are sequences (PS3.5 7.5.1)
    opening = struct.pack("<HHL", 0x0018, 0xA001, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with pytest.raises(DatasetRejectedError, match="nested deeper"):
        scan_structure(
            opening * 40 + closing * 40, implicit_vr=True, little_endian=True, limits=LIMITS
        )


def test_element_count_limit():
    data = b"".join(element(0x0009, 0x1000 + i % 0xFF, b"LO", b"ab") for i in range(500))
    with pytest.raises(DatasetRejectedError, match="more than 100 data elements") as info:
        scan_structure(
            data,
            implicit_vr=False,
            little_endian=True,
            limits=ReceptionLimits(max_elements=100),
        )
    assert info.value.limit


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 720) + b"1.2.3\x00", "truncated value"),
        (struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 4000) + b"\x00" * 16, "truncated"),
        (
            struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF),
            "without its delimiter",
        ),
        (
            struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 8) + struct.pack("<HHL", 8, 0x10, 0),
            "where a sequence item was expected",
        ),
        (struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF), "undefined length"),
        (struct.pack("<HHL", 0xFFFE, 0xE00D, 0), "item delimiter outside"),
    ],
)
def test_malformed_structure_is_refused_as_malformed_not_as_a_limit(data, why):
    with pytest.raises(DatasetRejectedError, match=why) as info:
        scan_structure(data, implicit_vr=False, little_endian=True, limits=LIMITS)
    assert not info.value.limit


def test_trailing_bytes_shorter_than_a_header_are_tolerated():
    data = element(0x0008, 0x0060, b"CS", b"CT") + b"\x00\x00\x00"
    assert scan_structure(data, implicit_vr=False, little_endian=True, limits=LIMITS).elements == 1


def test_deflate_bomb_stops_at_the_cap_with_bounded_memory():
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="bomb")
    bomb = deflate_bomb(encode(ds), 256)
    assert len(bomb) < 400_000, "a 256 MB bomb is a few hundred KB on the wire"
    limits = ReceptionLimits(max_dataset_bytes=8 << 20)
    with pytest.raises(DatasetRejectedError, match="inflates beyond the limit of 8 MB") as info:
        read_header(bomb, DeflatedExplicitVRLittleEndian, limits)
    assert info.value.limit


def test_deflated_dataset_under_the_cap_decodes():
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="deflated")
    data = deflate(encode(ds))
    assert read_header(data, DeflatedExplicitVRLittleEndian, LIMITS).SOPInstanceUID == (
        ds.SOPInstanceUID
    )
    assert len(inflate_capped(data, 1 << 20)) == len(encode(ds))


def test_corrupt_deflate_stream_is_malformed():
    with pytest.raises(DatasetRejectedError, match="does not inflate") as info:
        inflate_capped(b"\xff" * 64, 1 << 20)
    assert not info.value.limit


def test_an_uncompressed_dataset_over_the_size_limit_is_refused():
    with pytest.raises(DatasetRejectedError, match="larger than the limit of 1 MB"):
        read_header(
            bytes(2 << 20), ExplicitVRLittleEndian, ReceptionLimits(max_dataset_bytes=1 << 20)
        )


# ---- read_header(tags=...): the handler's subset of the top-level elements ----------------------

_SUBSET_FILES = [
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "rtplan.dcm",
    "eCT_Supplemental.dcm",
]


def _syntax_flags(syntax: str) -> tuple[bool, bool]:
    uid = UID(syntax)
    return uid.is_implicit_VR, uid.is_little_endian


@pytest.mark.parametrize("name", _SUBSET_FILES)
def test_a_tag_subset_decodes_the_same_values_as_the_whole_header(name):
    """The handler decodes only HEADER_TAGS: each of them has the value (and the character set
    decoding) the whole header gives it, and nothing else but the first element and Specific
    Character Set is decoded."""
    data, syntax = _dataset_bytes(get_testdata_file(name))
    whole = read_header(data, syntax, LIMITS)
    subset = read_header(data, syntax, LIMITS, tags=HEADER_TAGS)
    first = next(iter(whole)).tag
    assert {e.tag for e in subset} == {
        t for t in (e.tag for e in whole) if t in HEADER_TAGS or t in (first, 0x00080005)
    }
    for keyword in HEADER_KEYWORDS:
        assert subset.get(keyword) == whole.get(keyword), keyword
    assert read_subject(subset) == read_subject(whole)
    assert routing_header(subset) == routing_header(whole)


def test_a_tag_subset_keeps_the_character_set_of_non_ascii_text():
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="charset")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Thorax nativ Übersicht"
    ds.PatientName = "Müller^Jürgen"
    data = encode(ds)
    subset = read_header(data, ExplicitVRLittleEndian, LIMITS, tags=HEADER_TAGS)
    assert subset.SeriesDescription == "Thorax nativ Übersicht"
    assert str(subset.PatientName) == "Müller^Jürgen"


def test_the_scan_lists_every_top_level_element_in_order():
    data, syntax = _dataset_bytes(get_testdata_file("CT_small.dcm"))
    implicit, little = _syntax_flags(syntax)
    structure = scan_structure(data, implicit_vr=implicit, little_endian=little, limits=LIMITS)
    tags = [
        struct.unpack_from("<HH", data, start)[0] << 16 | struct.unpack_from("<HH", data, start)[1]
        for start in structure.top_level
    ]
    assert tags == [e.tag for e in dcmread(get_testdata_file("CT_small.dcm"))]
    assert structure.top_level[0] == 0
    assert structure.pixel_data_at in structure.top_level


def test_a_subset_without_pixel_data_ends_at_the_end_of_the_dataset():
    data = element(0x0008, 0x0060, b"CS", b"CT") + element(0x0020, 0x000E, b"UI", b"1.2.3\x00")
    subset = read_header(data, ExplicitVRLittleEndian, LIMITS, tags=HEADER_TAGS)
    assert subset.SeriesInstanceUID == "1.2.3"
    assert subset.Modality == "CT"


_REFUSED = [
    (element(0x0008, 0x0060, b"CS", b"CT") + nested_sequence(300), "nested deeper than 16"),
    (struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 720) + b"1.2.3\x00", "truncated value"),
    (
        struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF),
        "without its delimiter",
    ),
    (struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF), "undefined length"),
    (struct.pack("<HHL", 0xFFFE, 0xE00D, 0), "item delimiter outside"),
    (
        element(0x0020, 0x000E, b"UI", b"1.2.3\x00")
        + struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 40),
        "truncated value of \\(0009,1010\\)",
    ),
]


@pytest.mark.parametrize(("data", "why"), _REFUSED)
def test_a_tag_subset_refuses_exactly_what_the_whole_header_refuses(data, why):
    """Limits and malformed structure are checked on the whole dataset, also on elements the
    handler does not decode."""
    for tags in (None, HEADER_TAGS):
        with pytest.raises(DatasetRejectedError, match=why):
            read_header(data, ExplicitVRLittleEndian, LIMITS, tags=tags)


def test_a_tag_subset_refuses_too_many_elements_and_bombs_as_limits():
    many = b"".join(element(0x0009, 0x1000 + i % 0xFF, b"LO", b"ab") for i in range(500))
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="bomb")
    bomb = deflate_bomb(encode(ds), 64)
    for data, syntax, limits in (
        (many, ExplicitVRLittleEndian, ReceptionLimits(max_elements=100)),
        (bomb, DeflatedExplicitVRLittleEndian, ReceptionLimits(max_dataset_bytes=8 << 20)),
    ):
        with pytest.raises(DatasetRejectedError) as info:
            read_header(data, syntax, limits, tags=HEADER_TAGS)
        assert info.value.limit
