"""The C-STORE-RSP command set (PS3.7 9.3.1.2), encoded without pydicom.

pynetdicom encodes every response's command set with pydicom twice (once to learn the
Command Group Length, once to send it), about 0.5 ms of an instance's 6-7 ms. A C-STORE
response that carries only a status is seven elements, encoded here directly, byte for byte as
pynetdicom encodes them (tests/unit/test_dimse_response.py): Implicit VR Little Endian (PS3.7
6.3.1), ascending tags, UIDs padded with a NUL to an even length, the group length first.

A response with an Error Comment or an Offending Element (the node's refusals, see
dicom_node/dimse_guard.py) is left to pynetdicom: `encode_store_response` returns None.
"""

from __future__ import annotations

import struct

from pynetdicom.dimse_primitives import C_STORE

C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 E.1)
#: PDV message control header: command set, last fragment (PS3.8 E.2).
COMMAND_LAST_FRAGMENT = b"\x03"
_TAG_LENGTH = struct.Struct("<HHL")
_US = struct.Struct("<H")


def encode_element(element: int, value: bytes) -> bytes:
    """One command-group element (0000,xxxx), Implicit VR Little Endian."""
    return _TAG_LENGTH.pack(0x0000, element, len(value)) + value


def encode_uid(value: object) -> bytes:
    """A UID value, NUL-padded to an even length."""
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE response primitive, or None when it carries more
    than a status (or is not a response): pynetdicom encodes those itself."""
    if (
        rsp.MessageIDBeingRespondedTo is None
        or rsp.Status is None
        or rsp.ErrorComment is not None
        or rsp.OffendingElement is not None
    ):
        return None
    elements = []
    if rsp.AffectedSOPClassUID is not None:
        elements.append(encode_element(0x0002, encode_uid(rsp.AffectedSOPClassUID)))
    elements += [
        encode_element(0x0100, _US.pack(C_STORE_RSP)),
        encode_element(0x0120, _US.pack(int(rsp.MessageIDBeingRespondedTo))),
        encode_element(0x0800, _US.pack(NO_DATA_SET)),
        encode_element(0x0900, _US.pack(int(rsp.Status))),
    ]
    if rsp.AffectedSOPInstanceUID is not None:
        elements.append(encode_element(0x1000, encode_uid(rsp.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return encode_element(0x0000, struct.pack("<L", len(body))) + body
