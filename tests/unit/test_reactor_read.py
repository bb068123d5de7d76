"""dicom_node/reactor.py's PDU reading: the read-ahead buffer and the P-DATA-TF decode."""

from __future__ import annotations

import random
import struct
from typing import cast

import pytest
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
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


def _dul_with_buffered(data: bytes) -> reactor.EventDrivenDUL:
    assoc = Association(AE(), "acceptor")
    reactor.adapt(assoc)
    assoc.unbind(evt.EVT_PDU_RECV, standard_pdu_recv_handler)  # whatever the log level
    dul = cast(reactor.EventDrivenDUL, assoc.dul)
    dul.state_machine.current_state = "Sta6"
    assert dul._inbox.fill(_Peer(data), len(data))
    return dul


def _take_first(dul: reactor.EventDrivenDUL) -> P_DATA_TF:
    (length,) = struct.unpack(">L", dul._inbox.peek(6)[2:6])
    return reactor._p_data_tf(dul._inbox.take(6 + length))


def _values(pdu: P_DATA_TF) -> list[bytes]:
    return [bytes(item.presentation_data_value) for item in pdu.presentation_data_value_items]


def test_buffered_p_data_is_merged_up_to_the_end_of_the_message():
    fragments = [_pdv(1, 0x00, b"a" * 10), _pdv(1, 0x00, b"b" * 10), _pdv(1, 0x02, b"c")]
    next_command = _p_data(_pdv(1, 0x03, b"next message"))
    dul = _dul_with_buffered(b"".join(_p_data(f) for f in fragments) + next_command)
    first = _take_first(dul)
    dul._merge_buffered_p_data(first)
    assert _values(first) == [b"\x00" + b"a" * 10, b"\x00" + b"b" * 10, b"\x02c"]
    assert bytes(dul._inbox.peek(dul._inbox.available())) == next_command, "the next message stays"


@pytest.mark.parametrize(
    "following",
    [
        _p_data(_pdv(1, 0x02, b"last"))[:-2],  # not complete yet
        struct.pack(">BBL", 0x04, 0, 3) + b"\x00\x00\x00",  # does not decode: refused on its own
        struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4,  # an A-RELEASE-RQ
    ],
)
def test_what_cannot_be_merged_stays_in_the_buffer(following):
    dul = _dul_with_buffered(_p_data(_pdv(1, 0x00, b"first")) + following)
    first = _take_first(dul)
    dul._merge_buffered_p_data(first)
    assert _values(first) == [b"\x00first"]
    assert bytes(dul._inbox.peek(dul._inbox.available())) == following


def test_nothing_is_merged_while_someone_listens_to_pdus():
    dul = _dul_with_buffered(_p_data(_pdv(1, 0x00, b"1")) + _p_data(_pdv(1, 0x02, b"2")))
    dul.assoc.bind(evt.EVT_PDU_RECV, standard_pdu_recv_handler)
    first = _take_first(dul)
    dul._merge_buffered_p_data(first)
    assert _values(first) == [b"\x001"]
