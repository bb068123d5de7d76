"""The exporter's direct C-STORE send path: the same bytes as pynetdicom, and no endless wait."""

from __future__ import annotations

import socket
import threading
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom_node.store_request import (
    SendTimeoutError,
    encode_store_request,
    frame_message,
    send_within,
)

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.12345678901234567890123"  # odd length: padded


def _pynetdicom_pdus(
    data_set: bytes, max_pdu: int, message_id: int = 7, priority: int = 2, context_id: int = 3
) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = SOP_CLASS
    req.AffectedSOPInstanceUID = SOP_INSTANCE
    req.Priority = priority
    req.DataSet = BytesIO(data_set)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = b""
    for pdata in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += pdu.encode()
    return out


@pytest.mark.parametrize(
    ("size", "max_pdu"),
    [
        (526_000, 16_384),  # a CT image to a PACS with 16 KB PDUs
        (16_378, 16_384),  # exactly one full fragment
        (16_379, 16_384),  # one byte into a second fragment
        (10, 16_384),
        (300_000, 0),  # no limit: one fragment each
        (1_000, 7),  # the smallest usable PDU: one byte per fragment
        (100, 40),  # the command set itself fragmented
    ],
)
def test_the_pdus_are_byte_identical_to_pynetdicoms(size: int, max_pdu: int) -> None:
    data_set = bytes(range(256)) * (size // 256) + bytes(size % 256)
    command = encode_store_request(7, SOP_CLASS, SOP_INSTANCE, 2)
    ours = b"".join(bytes(p) for p in frame_message(3, command, data_set, max_pdu))
    assert ours == _pynetdicom_pdus(data_set, max_pdu)


def test_a_pdu_too_small_for_any_data_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        frame_message(1, b"x", b"y", 6)


def test_send_within_writes_everything_in_order() -> None:
    a, b = socket.socketpair()
    received = bytearray()

    def read() -> None:
        while chunk := b.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    pieces: list[bytes | memoryview] = [bytes([i % 251]) * (1000 + i) for i in range(2000)]
    send_within(a, pieces, timeout_s=30.0)
    a.close()
    reader.join(timeout=30)
    b.close()
    assert bytes(received) == b"".join(pieces)


def test_a_peer_that_stops_reading_ends_the_send_after_the_timeout() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(SendTimeoutError, match="no data"):
            send_within(a, [b"\0" * (64 << 20)], timeout_s=0.3)
    finally:
        a.close()
        b.close()
