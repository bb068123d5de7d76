"""dicom_node/part10.py: the file header the spool writes before a received dataset is the one
pynetdicom's Event.encoded_dataset() writes, and a conformant reader accepts the file."""

from __future__ import annotations

from io import BytesIO

import pytest
from dicom_bytes import encode
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage  # type: ignore[attr-defined]

from dicom_node.part10 import FileMetaError, file_header, file_meta
from dicom_node.spool import Spool
from engine.synthetic import make_ct_dataset


def _pynetdicom_header(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """What Event.encoded_dataset() puts before the dataset (pynetdicom 3.0.4, events.py)."""
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
    )
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta)


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,  # 19 characters: padded
        ImplicitVRLittleEndian,  # 17
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,  # 22: even, no padding
        JPEG2000Lossless,
    ],
)
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [
        (str(CTImageStorage), "1.2.3.4"),  # even length
        (str(EnhancedCTImageStorage), "1.2.3.45"),  # odd length
        (str(CTImageStorage), "2.25." + "1" * 59),  # 64 characters, the longest UID
    ],
)
def test_file_header_is_byte_for_byte_pynetdicoms(sop_class, sop_instance, syntax):
    assert file_header(sop_class, sop_instance, str(syntax)) == _pynetdicom_header(
        sop_class, sop_instance, str(syntax)
    )


def test_group_length_counts_the_rest_of_group_0002():
    meta = file_meta(str(CTImageStorage), "1.2.3", str(ExplicitVRLittleEndian))
    assert meta[:8] == b"\x02\x00\x00\x00UL\x04\x00"
    assert int.from_bytes(meta[8:12], "little") == len(meta) - 12


@pytest.mark.parametrize(
    ("sop_instance", "why"),
    [("2.25." + "1" * 60, "longer"), ("1.2\\3.4", "multi-valued"), ("1.2.é", "ASCII")],
)
def test_a_value_that_cannot_be_encoded_is_refused(sop_instance, why):
    with pytest.raises(FileMetaError, match=why):
        file_meta(str(CTImageStorage), sop_instance, str(ExplicitVRLittleEndian))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_spooled_file_of_header_and_dataset_buffer_reads_back_as_the_sent_dataset(
    tmp_path, syntax
):
    """The handler's write: header and the received BytesIO's buffer, side by side (writev)."""
    ds = make_ct_dataset(rows=16, cols=16)
    received = BytesIO(encode(ds, implicit=syntax.is_implicit_VR))
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    pieces = (file_header(sop_class, sop_uid, str(syntax)), received.getbuffer())
    path, created = Spool(tmp_path).store(str(ds.SeriesInstanceUID), sop_uid, pieces)
    assert created
    assert path.read_bytes() == pieces[0] + received.getvalue()
    back = dcmread(path)  # strict enough: fails on a malformed preamble or meta
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.file_meta.MediaStorageSOPInstanceUID == sop_uid
    assert back.file_meta.MediaStorageSOPClassUID == sop_class
    assert back.SOPInstanceUID == sop_uid
    assert back.PixelData == ds.PixelData
    assert [e.tag for e in back] == [e.tag for e in ds]
