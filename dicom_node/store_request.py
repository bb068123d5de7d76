"""A C-STORE request put on the wire directly: the exporter's send path for plain TCP.

pynetdicom sends a message as one P-DATA primitive per fragment, each handed to the
association's DUL thread through a queue, run through the state machine, encoded and sent with
its own `send` call: with a PACS that takes 16 KB PDUs that is some 33 hand-offs for one 526 KB
CT image, and the exporter needed about twice DCMTK storescu's time to send a series. Here the
command set (`encode_store_request`) and the data set, read from the file as it is stored, are
framed into the same P-DATA-TF PDUs pynetdicom would produce (`frame_message`, byte for byte,
tests/unit/test_store_request.py) and written to the socket by the exporter's thread in one go
(`send_within`); the answer still comes through pynetdicom (the DUL thread reads it).

Wire formats: PS3.7 6.3.1 and 9.3.1.1 (the command set, Implicit VR Little Endian, group length
first, UIDs padded with NUL), PS3.8 9.3.5 and E.2 (P-DATA-TF: type 04H, a 4-byte big-endian
length, PDV items of a 4-byte length, the presentation context ID and the message control
header: bit 0 set for a command, bit 1 for the last fragment). Every fragment's PDV item, its
6 header bytes included, fits the peer's Maximum Length (0: no limit, one fragment each).

Only for associations over plain TCP: an SSL socket cannot be written by one thread while the
DUL thread reads it, so TLS destinations keep pynetdicom's path.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator

from dicom_node.dimse_response import encode_element, encode_uid

C_STORE_RQ = 0x0001
#: Command Data Set Type: a data set follows (any value but 0101H, PS3.7 E.1); pynetdicom's 0001H.
DATA_SET_PRESENT = 0x0001
#: Message control headers (PS3.8 E.2).
COMMAND_MORE, COMMAND_LAST, DATA_MORE, DATA_LAST = 0x01, 0x03, 0x00, 0x02
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_US = struct.Struct("<H")
_PDV_OVERHEAD = 6  # item length (4), presentation context ID (1), message control header (1)


def encode_store_request(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int
) -> bytes:
    """The command set of a C-STORE-RQ with a data set (no Move Originator), encoded as
    pynetdicom encodes it."""
    body = b"".join(
        (
            encode_element(0x0002, encode_uid(sop_class_uid)),
            encode_element(0x0100, _US.pack(C_STORE_RQ)),
            encode_element(0x0110, _US.pack(message_id)),
            encode_element(0x0700, _US.pack(priority)),
            encode_element(0x0800, _US.pack(DATA_SET_PRESENT)),
            encode_element(0x1000, encode_uid(sop_instance_uid)),
        )
    )
    return encode_element(0x0000, struct.pack("<L", len(body))) + body


def _fragments(data: memoryview, size: int) -> Iterator[memoryview]:
    if size <= 0 or len(data) <= size:
        yield data
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


def frame_message(
    context_id: int, command: bytes, data_set: bytes | memoryview, max_pdu_length: int
) -> list[bytes | memoryview]:
    """The P-DATA-TF PDUs of one message (command set, then data set), one PDV per PDU, as
    pieces to write in order (headers and views into `command` / `data_set`, no copies).

    `max_pdu_length`: the peer's Maximum Length Received (0: no limit). Raises ValueError when
    it is too small to carry any data (1 to 6)."""
    if 0 < max_pdu_length <= _PDV_OVERHEAD:
        raise ValueError(f"maximum PDU length {max_pdu_length} cannot carry a PDV")
    size = max_pdu_length - _PDV_OVERHEAD if max_pdu_length else 0
    pieces: list[bytes | memoryview] = []
    for data, more, last in (
        (memoryview(command), COMMAND_MORE, COMMAND_LAST),
        (memoryview(data_set), DATA_MORE, DATA_LAST),
    ):
        fragments = list(_fragments(data, size))
        for i, fragment in enumerate(fragments):
            control = last if i == len(fragments) - 1 else more
            item_length = len(fragment) + 2
            pieces.append(
                _PDU_HEADER.pack(0x04, 0x00, item_length + 4)
                + _PDV_HEADER.pack(item_length, context_id, control)
            )
            pieces.append(fragment)
    return pieces


class SendTimeoutError(OSError):
    """The peer took none of the data for longer than the allowed time."""


def send_within(sock: socket.socket, pieces: list[bytes | memoryview], timeout_s: float) -> None:
    """Write `pieces` to a connected, blocking TCP socket, in order and completely.

    Writes without blocking (MSG_DONTWAIT) and waits for room with select, so a peer that stops
    reading cannot hold the caller for more than `timeout_s` without progress: SendTimeoutError
    then (the association must be aborted: part of a message is out). OSError for a closed
    connection, as from the socket."""
    pending = [memoryview(p).cast("B") for p in pieces if len(p)]
    index = 0
    while index < len(pending):
        try:
            sent = sock.sendmsg(pending[index : index + 512], [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        while sent and index < len(pending):
            head = pending[index]
            if sent >= len(head):
                sent -= len(head)
                index += 1
            else:
                pending[index] = head[sent:]
                sent = 0
        if index < len(pending):
            _wait_writable(sock, timeout_s)


def _wait_writable(sock: socket.socket, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SendTimeoutError(f"the peer took no data for {timeout_s:g} s")
        if poller.poll(left * 1000.0):
            return
