"""The DICOM File Format's header (PS3.10 7.1): preamble, prefix and File Meta Information.

A pure encoder (and `dataset_offset`, its reader for the exporter), no I/O: the C-STORE handler
writes `file_header(...)` and the received dataset buffer side by side (one `os.writev`),
instead of pynetdicom's `Event.encoded_dataset()`, which runs pydicom's file-meta writer and
copies the 526 KB dataset twice.

The File Meta Information is group 0002 in Explicit VR Little Endian (PS3.10 7.1, PS3.5 7.1.2),
with its group length first, and holds what pynetdicom's `create_file_meta` puts there, in tag
order: (0002,0001) version 00 01, (0002,0002) Media Storage SOP Class UID, (0002,0003) Media
Storage SOP Instance UID, (0002,0010) Transfer Syntax UID, (0002,0012) Implementation Class UID,
(0002,0013) Implementation Version Name. The bytes are those `Event.encoded_dataset()` writes
before the dataset (tests/unit/test_part10.py), so a spooled file is what it was before.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\0" * 128 + b"DICM"
FILE_META_VERSION = b"\x00\x01"
_UID_MAX = 64  # UI (PS3.5 Table 6.2-1)
_SH_MAX = 16
_SHORT = struct.Struct("<HH2sH")  # tag, VR, 2-byte length
_LONG = struct.Struct("<HH2s2xL")  # tag, VR, reserved, 4-byte length (OB, UN, ...)


class FileMetaError(ValueError):
    """A value cannot be encoded in the File Meta Information."""


def _padded(value: str, pad: bytes, max_len: int, what: str) -> bytes:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise FileMetaError(f"{what} is not ASCII") from exc
    if len(raw) > max_len or b"\\" in raw:
        raise FileMetaError(f"{what} is longer than {max_len} characters or multi-valued")
    return raw + pad if len(raw) % 2 else raw


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    implementation_class_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version_name: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """The encoded File Meta Information, (0002,0000) group length first.

    UIDs are padded with a NUL, the SH value with a space, to an even length (PS3.5 6.2).
    Raises FileMetaError for a value that is too long, multi-valued or not ASCII.
    """
    body = [
        _element(0x0001, b"OB", FILE_META_VERSION),
        _element(0x0002, b"UI", _padded(sop_class_uid, b"\0", _UID_MAX, "SOP Class UID")),
        _element(0x0003, b"UI", _padded(sop_instance_uid, b"\0", _UID_MAX, "SOP Instance UID")),
        _element(
            0x0010, b"UI", _padded(transfer_syntax_uid, b"\0", _UID_MAX, "Transfer Syntax UID")
        ),
        _element(
            0x0012,
            b"UI",
            _padded(implementation_class_uid, b"\0", _UID_MAX, "Implementation Class UID"),
        ),
        _element(
            0x0013,
            b"SH",
            _padded(implementation_version_name, b" ", _SH_MAX, "Implementation Version Name"),
        ),
    ]
    encoded = b"".join(body)
    return _element(0x0000, b"UL", struct.pack("<L", len(encoded))) + encoded


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information: what precedes the dataset in a file
    (the bytes `Event.encoded_dataset()` puts before it)."""
    return PREAMBLE + file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid)


#: Bytes of a file up to and with the File Meta Information Group Length's value: preamble,
#: "DICM" and (0002,0000) explicit VR "UL", length 4.
FILE_HEAD_BYTES = 144
_GROUP_LENGTH_HEADER = b"DICM" + _SHORT.pack(0x0002, 0x0000, b"UL", 4)


def dataset_offset(head: bytes) -> int | None:
    """Where the data set starts in a DICOM file, from its first FILE_HEAD_BYTES: after the
    preamble, "DICM" and the file meta group, whose length (0002,0000) says how long it is.
    None when the file does not start that way (the caller parses the file meta instead)."""
    if len(head) < FILE_HEAD_BYTES or head[128:140] != _GROUP_LENGTH_HEADER:
        return None
    return FILE_HEAD_BYTES + int.from_bytes(head[140:144], "little")
