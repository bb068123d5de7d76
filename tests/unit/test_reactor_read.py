"""dicom_node/reactor.py's PDU reading: the read-ahead buffer and the P-DATA-TF decode."""

from __future__ import annotations

import random
import struct

import pytest
from pynetdicom.pdu import P_DATA_TF

from dicom_node import reactor


class _Peer:
    """A socket stand-in whose recv_into hands out `data` in pieces of random size."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self.data = data
        self.pos = 0
        self.rng = random.Random(seed)
        self.reads = 0

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        self.reads += 1
        n = min(len(view), nbytes or len(view), self.rng.randint(1, 70_000))
        chunk = self.data[self.pos : self.pos + n]
        view[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _pdv(context_id: int, control: int, payload: bytes) -> bytes:
    return struct.pack(">LB", len(payload) + 2, context_id) + bytes([control]) + payload


def _p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def test_pdus_come_out_whole_and_unchanged_across_buffer_renewals():
    rng = random.Random(1)
    pdus = [_p_data(_pdv(1, 0, rng.randbytes(rng.randint(1, 40_000)))) for _ in range(60)]
    peer = _Peer(b"".join(pdus))
    inbox = reactor._Inbox()
    taken = []
    for _ in pdus:
        assert inbox.fill(peer, 6)
        (length,) = struct.unpack(">L", inbox.peek(6)[2:6])
        assert inbox.fill(peer, 6 + length)
        taken.append(inbox.take(6 + length))
    # every view still holds its PDU: later reads never wrote over what was handed out
    assert [bytes(v) for v in taken] == pdus
    assert peer.reads < len(pdus) * 2, "reads bring in several PDUs at once"


def test_a_huge_declared_length_allocates_only_what_arrives():
    peer = _Peer(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"x" * 300_000)
    inbox = reactor._Inbox()
    assert inbox.fill(peer, 6)
    assert not inbox.fill(peer, 6 + 0xFFFFFFF0), "the peer closed before the PDU was complete"
    assert len(inbox._buf) <= inbox.available() + reactor._READ_CHUNK


def test_p_data_tf_values_are_the_items_payloads():
    first, second = b"\x01" * 11, b"\x02" * 4
    raw = _p_data(_pdv(1, 0x03, first), _pdv(3, 0x02, second))
    decoded = reactor._p_data_tf(memoryview(raw))
    assert type(decoded) is P_DATA_TF  # pynetdicom's logging handlers look the type up exactly
    primitive = decoded.to_primitive()
    values = [(cid, bytes(data)) for cid, data in primitive.presentation_data_value_list]
    assert values == [(1, b"\x03" + first), (3, b"\x02" + second)]
    reference = P_DATA_TF()
    reference.decode(raw)
    assert [(i.context_id, bytes(i.data)) for i in reference.presentation_data_value_items] == [
        (cid, bytes(data)) for cid, data in primitive.presentation_data_value_list
    ]


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">LB", 50, 1) + b"\x00" * 10,  # item runs past the PDU
        struct.pack(">LB", 1, 1),  # no message control header
        b"\x00\x00",  # truncated item length
    ],
)
def test_malformed_p_data_tf_is_refused(body):
    raw = struct.pack(">BBL", 0x04, 0, len(body)) + body
    with pytest.raises(ValueError, match="item"):
        reactor._p_data_tf(memoryview(raw))
