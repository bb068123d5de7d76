"""Hand-encoded DICOM datasets for tests that need what pydicom will not write: sequences nested
hundreds of levels deep, lengths that lie, deflate bombs. Explicit VR Little Endian unless said
otherwise (PS3.5 7.1.2); no file meta."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom import dcmwrite
from pydicom.dataset import Dataset

UNDEFINED = 0xFFFFFFFF


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a defined length."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def nested_sequence(depth: int, tag: tuple[int, int] = (0x0018, 0xA001)) -> bytes:
    """`depth` levels of one sequence (default ContributingEquipmentSequence) inside its own item,
    undefined lengths throughout, as a hostile sender would write it in a few KB."""
    group, elem = tag
    opening = struct.pack("<HH2sHL", group, elem, b"SQ", 0, UNDEFINED) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, UNDEFINED
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    """A pydicom dataset encoded without file meta."""
    buf = BytesIO()
    ds_copy = ds.copy()
    ds_copy.file_meta = Dataset()  # type: ignore[assignment]
    dcmwrite(buf, ds_copy, implicit_vr=implicit, little_endian=little)
    return buf.getvalue()


def deflate(data: bytes) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian uses (PS3.5 A.5)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def deflate_bomb(dataset: bytes, padding_mb: int) -> bytes:
    """An encoded dataset followed by `padding_mb` MB of zero Data Set Trailing Padding
    (FFFC,FFFC), deflated: about 1 KB on the wire per MB inflated.

    Built in constant time: after a full flush a deflate stream refers to nothing before it, so
    one compressed megabyte of zeros is repeated, then a final empty block ends the stream.
    """
    head = struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, padding_mb << 20)
    prefix = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = prefix.compress(dataset + head) + prefix.flush(zlib.Z_FULL_FLUSH)
    megabyte = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = megabyte.compress(bytes(1 << 20)) + megabyte.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    return start + block * padding_mb + end


_LONG = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def top_level_elements(encoded: bytes) -> list[tuple[int, int, int]]:
    """(offset, tag, header size) of each top-level element of an explicit VR little endian
    dataset written by pydicom (defined lengths)."""
    found = []
    pos = 0
    while pos + 8 <= len(encoded):
        group, elem = struct.unpack_from("<HH", encoded, pos)
        vr = encoded[pos + 4 : pos + 6]
        if vr in _LONG:
            length = struct.unpack_from("<L", encoded, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", encoded, pos + 6)[0]
            header = 8
        found.append((pos, (group << 16) | elem, header))
        if length == UNDEFINED:
            break
        pos += header + length
    return found


def replace_value(encoded: bytes, tag: int, value: bytes) -> bytes:
    """`encoded` with the value of top-level element `tag` replaced by `value` as raw bytes
    (padded to even length; explicit VR little endian), whatever its VR allows."""
    if len(value) % 2:
        value += b" "
    elements = top_level_elements(encoded)
    for i, (offset, found, header) in enumerate(elements):
        if found != tag:
            continue
        end = elements[i + 1][0] if i + 1 < len(elements) else len(encoded)
        head = bytearray(encoded[offset : offset + header])
        if header == 12:
            struct.pack_into("<L", head, 8, len(value))
        else:
            struct.pack_into("<H", head, 6, len(value))
        return encoded[:offset] + bytes(head) + value + encoded[end:]
    raise KeyError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the dataset")
