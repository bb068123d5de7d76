"""A low-level DICOM requestor for tests that must send what well-behaved libraries refuse to send.

pynetdicom and DCMTK validate what they send (UID lengths, required command elements, matching
presentation contexts), so a test cannot use them to check how the node answers a hostile or
broken peer. HostileSCU encodes the upper-layer PDUs (PS3.8 Section 9.3) and the DIMSE command
set (PS3.7 Section 9.3, implicit VR little endian) by hand, sends whatever it is given verbatim
and reports exactly what came back::

    with HostileSCU("127.0.0.1", port, called_ae="LTDIFF", calling_ae="FUZZER",
                    contexts=[(CTImageStorage, [ExplicitVRLittleEndian])], timeout=30) as scu:
        status = scu.c_store(encoded, sop_class=CTImageStorage, sop_instance="1.2.3")
        if status is None:
            print(scu.outcome)          # "timeout", "aborted" or "closed"

Only the association negotiation is well-behaved (it must be, to reach the DIMSE layer). One
presentation context is proposed per `contexts` entry; to send in several transfer syntaxes of
one SOP class, list the class once per syntax. Operations are synchronous (one request at a
time, as with an asynchronous-operations window of 1). After a timeout, an abort or a closed
connection the association is unusable and further operations raise AssociationUnusableError.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self, cast

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
DEFAULT_MAX_PDU = 16382  # what we announce we can receive (PS3.8 D.1 Maximum Length)
_FALLBACK_FRAGMENT = 16384  # PDU variable-field size used when the peer announces no limit
_MAX_INCOMING_PDU = 256 * 1024 * 1024  # refuse to buffer more than this from a broken peer

# Command set element tags (group 0000), as 32-bit tags.
TAG_GROUP_LENGTH = 0x00000000
TAG_AFFECTED_SOP_CLASS = 0x00000002
TAG_COMMAND_FIELD = 0x00000100
TAG_MESSAGE_ID = 0x00000110
TAG_MESSAGE_ID_RESPONDED = 0x00000120
TAG_PRIORITY = 0x00000700
TAG_DATASET_TYPE = 0x00000800
TAG_STATUS = 0x00000900
TAG_ERROR_COMMENT = 0x00000902
TAG_AFFECTED_SOP_INSTANCE = 0x00001000

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000

Outcome = Literal["response", "timeout", "aborted", "closed"]
CommandValue = bytes | str | int | None


class AssociationUnusableError(RuntimeError):
    """An operation was attempted on an association that is not (or no longer) established."""


@dataclass(frozen=True)
class Response:
    """A DIMSE response as received: the decoded command set elements and the raw dataset."""

    elements: Mapping[int, bytes]
    dataset: bytes | None = None

    def _us(self, tag: int) -> int | None:
        raw = self.elements.get(tag)
        return int.from_bytes(raw[:2], "little") if raw is not None and len(raw) >= 2 else None

    def _text(self, tag: int) -> str | None:
        raw = self.elements.get(tag)
        return None if raw is None else raw.decode("latin-1").rstrip("\0 ")

    @property
    def status(self) -> int | None:
        return self._us(TAG_STATUS)

    @property
    def command_field(self) -> int | None:
        return self._us(TAG_COMMAND_FIELD)

    @property
    def message_id_responded_to(self) -> int | None:
        return self._us(TAG_MESSAGE_ID_RESPONDED)

    @property
    def error_comment(self) -> str | None:
        return self._text(TAG_ERROR_COMMENT)

    @property
    def affected_sop_instance(self) -> str | None:
        return self._text(TAG_AFFECTED_SOP_INSTANCE)

    @property
    def affected_sop_class(self) -> str | None:
        return self._text(TAG_AFFECTED_SOP_CLASS)


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class _Pdu:
    type: int
    body: bytes


@dataclass
class _Incoming:
    """A DIMSE message being reassembled from P-DATA fragments."""

    command: bytearray = field(default_factory=bytearray)
    dataset: bytearray = field(default_factory=bytearray)
    command_done: bool = False
    elements: dict[int, bytes] | None = None


# --- encoding helpers (pure) ------------------------------------------------------------------


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _ae_field(title: str) -> bytes:
    raw = title.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


def encode_associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int = DEFAULT_MAX_PDU,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context per entry (ids 1, 3, 5...)."""
    if not 0 < len(contexts) <= 128:
        raise ValueError(f"between 1 and 128 presentation contexts, not {len(contexts)}")
    items = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for index, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode("ascii"))
        sub += b"".join(_item(0x40, ts.encode("ascii")) for ts in syntaxes)
        items += _item(0x20, struct.pack(">B3x", 2 * index + 1) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, str(PYDICOM_IMPLEMENTATION_UID).encode("ascii"))
    user += _item(0x55, b"HOSTILE_SCU")
    items += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae_field(called_ae) + _ae_field(calling_ae) + bytes(32)
    return _pdu(0x01, fixed + items)


def _sub_items(data: bytes) -> Iterable[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        item_type, length = data[offset], struct.unpack_from(">H", data, offset + 2)[0]
        yield item_type, data[offset + 4 : offset + 4 + length]
        offset += 4 + length


def decode_associate_ac(
    body: bytes, proposed: Sequence[tuple[str, Sequence[str]]]
) -> tuple[list[AcceptedContext], int]:
    """Accepted presentation contexts and the peer's maximum PDU length (0: no limit)."""
    accepted: list[AcceptedContext] = []
    max_pdu = 0
    for item_type, data in _sub_items(body[68:]):
        if item_type == 0x21 and len(data) >= 4:
            context_id, result = data[0], data[2]
            index = (context_id - 1) // 2
            if result != 0 or not 0 <= index < len(proposed):
                continue
            syntaxes = [d for t, d in _sub_items(data[4:]) if t == 0x40]
            if syntaxes:
                ts = syntaxes[0].decode("ascii").rstrip("\0 ")
                accepted.append(AcceptedContext(context_id, proposed[index][0], ts))
        elif item_type == 0x50:
            for sub_type, sub in _sub_items(data):
                if sub_type == 0x51 and len(sub) == 4:
                    max_pdu = struct.unpack(">I", sub)[0]
    return accepted, max_pdu


def _value_bytes(value: bytes | str | int, tag: int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return struct.pack("<H", value)
    raw = value.encode("utf-8")
    if len(raw) % 2:
        # UIDs are padded with NUL, text (AE, LO) with a space (PS3.5 6.2)
        raw += b"\0" if tag in (TAG_AFFECTED_SOP_CLASS, TAG_AFFECTED_SOP_INSTANCE) else b" "
    return raw


def encode_command(elements: Mapping[int, CommandValue]) -> bytes:
    """An implicit VR little endian command set, elements in tag order, group length first.

    Values: bytes go verbatim (odd lengths included), str is UTF-8 and padded to even length,
    int is packed as US; None leaves the element out. A CommandGroupLength given in `elements`
    is used as is (even if wrong); otherwise it is computed.
    """
    body = b""
    for tag in sorted(elements):
        value = elements[tag]
        if tag == TAG_GROUP_LENGTH or value is None:
            continue
        raw = _value_bytes(value, tag)
        body += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    given = elements.get(TAG_GROUP_LENGTH, ...)
    if given is None:
        return body
    length = struct.pack("<I", len(body)) if given is ... else _group_length_bytes(given)
    return struct.pack("<HHI", 0, 0, len(length)) + length + body


def _group_length_bytes(value: bytes | str | int) -> bytes:
    return struct.pack("<I", value) if isinstance(value, int) else _value_bytes(value, 0)


def decode_command(data: bytes) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set (tag -> raw value); a truncated
    trailing element is dropped."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        elements[(group << 16) | elem] = data[offset : offset + length]
        offset += length
    return elements


# --- the requestor ------------------------------------------------------------------------------


class HostileSCU:
    """A synchronous DICOM requestor that sends command sets and datasets verbatim.

    State after association: `associated` (established and usable), `rejected` (A-ASSOCIATE-RJ,
    with `reject_reason` = (result, source, reason)), `aborted` (an A-ABORT was received, with
    `abort_source`/`abort_reason`; also set when the peer aborted instead of answering the
    association request). `outcome` is the result of the last operation: "response",
    "timeout" (nothing complete within `timeout` seconds), "aborted" or "closed" (the connection
    dropped without an A-ABORT).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        called_ae: str = "ANY-SCP",
        calling_ae: str = "HOSTILE",
        contexts: Sequence[tuple[str, Sequence[str]]] = (
            (VERIFICATION, (ImplicitVRLittleEndian,)),
        ),
        timeout: float = 30.0,
        max_pdu: int = DEFAULT_MAX_PDU,
        fragment_size: int | None = None,
    ) -> None:
        """`fragment_size` caps the P-DATA-TF variable field we send (to force many PDUs);
        the peer's announced maximum always applies as well."""
        self.host, self.port = host, port
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.proposed = [(str(a), [str(t) for t in ts]) for a, ts in contexts]
        self.timeout = timeout
        self.max_pdu = max_pdu
        self.fragment_size = fragment_size
        self.accepted: list[AcceptedContext] = []
        self.peer_max_pdu = 0
        self.associated = False
        self.rejected = False
        self.aborted = False
        self.closed = False
        self.reject_reason: tuple[int, int, int] | None = None
        self.abort_source: int | None = None
        self.abort_reason: int | None = None
        self.outcome: Outcome | None = None
        self.last_response: Response | None = None
        self.pdus_sent = 0
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_message_id = 1

    # -- association --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._sock is None and not self.associated:
            self.associate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.associated and exc is None:
            self.release()
        elif self.associated:
            self.abort()
        self.close()

    def associate(self) -> bool:
        """Connect and negotiate; True when established with at least one accepted context."""
        deadline = time.monotonic() + self.timeout
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send(
            encode_associate_rq(self.called_ae, self.calling_ae, self.proposed, self.max_pdu)
        )
        pdu = self._receive_pdu(deadline)
        if pdu is None:
            return False
        if pdu.type == 0x02:
            self.accepted, self.peer_max_pdu = decode_associate_ac(pdu.body, self.proposed)
            self.associated = bool(self.accepted)
            self.outcome = "response"
        elif pdu.type == 0x03 and len(pdu.body) >= 4:
            self.rejected = True
            self.reject_reason = (pdu.body[1], pdu.body[2], pdu.body[3])
            self.outcome = "response"
            self.close()
        else:
            self._note_unexpected(pdu)
        return self.associated

    def release(self) -> bool:
        """A-RELEASE; True when the peer confirmed. Falls back to an abort."""
        if not self.associated:
            return False
        deadline = time.monotonic() + self.timeout
        self.associated = False
        try:
            cast(socket.socket, self._sock).settimeout(self.timeout)
            self._send(_pdu(0x05, bytes(4)))
            while True:
                pdu = self._receive_pdu(deadline)
                if pdu is None:
                    break
                if pdu.type == 0x06:
                    self.close()
                    return True
                if pdu.type == 0x07:
                    self._note_unexpected(pdu)
                    break
        except OSError:
            self.closed = True
        self.abort()
        return False

    def abort(self) -> None:
        """Send an A-ABORT (service user) and close the connection."""
        self.associated = False
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._send(_pdu(0x07, bytes([0, 0, 0, 0])))
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def context_for(
        self, abstract_syntax: str | None = None, transfer_syntax: str | None = None
    ) -> AcceptedContext:
        """The first accepted context matching the abstract and/or transfer syntax."""
        for cx in self.accepted:
            if abstract_syntax is not None and cx.abstract_syntax != abstract_syntax:
                continue
            if transfer_syntax is not None and cx.transfer_syntax != transfer_syntax:
                continue
            return cx
        raise LookupError(
            f"no accepted presentation context for {abstract_syntax} / {transfer_syntax}; "
            f"accepted: {self.accepted}"
        )

    # -- DIMSE ----------------------------------------------------------------------------------

    def c_echo(self, *, message_id: int | None = None, context_id: int | None = None) -> int | None:
        """C-ECHO; the response Status, or None (see `outcome`)."""
        self._require_usable()
        cx_id = context_id if context_id is not None else self.context_for(VERIFICATION).context_id
        command: dict[int, CommandValue] = {
            TAG_AFFECTED_SOP_CLASS: VERIFICATION,
            TAG_COMMAND_FIELD: C_ECHO_RQ,
            TAG_MESSAGE_ID: self._message_id(message_id),
            TAG_DATASET_TYPE: NO_DATASET,
        }
        return self.send_message(encode_command(command), cx_id)

    def c_store(
        self,
        dataset: bytes,
        *,
        sop_class: str | bytes | None,
        sop_instance: str | bytes | None,
        transfer_syntax: str | None = None,
        context_class: str | None = None,
        context_id: int | None = None,
        message_id: int | None = None,
        priority: int = 0,
        overrides: Mapping[int, CommandValue] | None = None,
    ) -> int | None:
        """C-STORE `dataset` (encoded, no file meta) verbatim; the response Status or None.

        `sop_class` and `sop_instance` go into the command set as given (None leaves the element
        out). The presentation context is `context_id`, or the accepted one whose abstract syntax
        is `context_class` (default: `sop_class`) and whose transfer syntax is `transfer_syntax`.
        `overrides` replaces command elements by tag (None removes one), e.g.
        {TAG_MESSAGE_ID: b"\\x01"} for a 1-byte Message ID.
        """
        self._require_usable()
        if context_id is None:
            wanted = context_class if context_class is not None else sop_class
            if isinstance(wanted, bytes):
                wanted = wanted.decode("latin-1")
            context_id = self.context_for(wanted, transfer_syntax).context_id
        command: dict[int, CommandValue] = {
            TAG_AFFECTED_SOP_CLASS: sop_class,
            TAG_COMMAND_FIELD: C_STORE_RQ,
            TAG_MESSAGE_ID: self._message_id(message_id),
            TAG_PRIORITY: priority,
            TAG_DATASET_TYPE: DATASET_PRESENT,
            TAG_AFFECTED_SOP_INSTANCE: sop_instance,
        }
        command.update(overrides or {})
        return self.send_message(encode_command(command), context_id, dataset)

    def send_message(
        self, command: bytes | None, context_id: int, dataset: bytes | None = None
    ) -> int | None:
        """Send an already encoded command set (anything at all; None sends none) and an optional
        dataset, then wait for one complete response message; its Status, or None (see
        `outcome`; None with outcome "response" means the response had no readable Status, and
        `last_response` holds what it had)."""
        self._require_usable()
        deadline = time.monotonic() + self.timeout
        self.last_response = None
        self.outcome = None
        try:
            # a peer that stops reading times out the send
            cast(socket.socket, self._sock).settimeout(self.timeout)
            if command is not None:
                self._send_fragments(context_id, command, is_command=True)
            if dataset is not None:
                self._send_fragments(context_id, dataset, is_command=False)
        except TimeoutError:
            self._fail("timeout")
            return None
        except OSError:
            # the peer may have aborted while we were sending: look for its A-ABORT
            return self._await_response(time.monotonic() + 2.0, after_send_error=True)
        return self._await_response(deadline)

    # -- internals ------------------------------------------------------------------------------

    def _require_usable(self) -> None:
        if not self.associated or self._sock is None:
            raise AssociationUnusableError(
                f"association not usable (rejected: {self.rejected}, aborted: {self.aborted}, "
                f"last outcome: {self.outcome})"
            )

    def _message_id(self, given: int | None) -> int:
        if given is not None:
            return given
        value = self._next_message_id
        self._next_message_id = value % 0xFFFF + 1
        return value

    def _fragment_payload(self) -> int:
        limit = self.peer_max_pdu or _FALLBACK_FRAGMENT
        if self.fragment_size is not None:
            limit = min(limit, self.fragment_size)
        return max(1, limit - 6)  # PDV item length (4) + context id (1) + control header (1)

    def _send_fragments(self, context_id: int, data: bytes, *, is_command: bool) -> None:
        size = self._fragment_payload()
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for index, chunk in enumerate(chunks):
            header = (1 if is_command else 0) | (2 if index == len(chunks) - 1 else 0)
            pdv = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
            self._send(_pdu(0x04, pdv))
            self.pdus_sent += 1

    def _await_response(self, deadline: float, *, after_send_error: bool = False) -> int | None:
        message = _Incoming()
        while True:
            pdu = self._receive_pdu(deadline)
            if pdu is None:  # `outcome` says why: timeout or closed
                if after_send_error and self.outcome == "timeout":
                    self._fail("closed")
                return None
            if pdu.type == 0x04:
                response = self._add_pdata(message, pdu.body)
                if response is not None:
                    self.last_response = response
                    self.outcome = "response"
                    return response.status
            elif pdu.type == 0x05:  # the peer wants to release: confirm and stop
                with contextlib.suppress(OSError):
                    self._send(_pdu(0x06, bytes(4)))
                self._fail("closed")
                self.close()
                return None
            else:
                self._note_unexpected(pdu)
                return None

    @staticmethod
    def _add_pdata(message: _Incoming, body: bytes) -> Response | None:
        offset = 0
        while offset + 6 <= len(body):
            length = struct.unpack_from(">I", body, offset)[0]
            header = body[offset + 5]
            data = body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if header & 1:
                message.command += data
                if header & 2:
                    message.elements = decode_command(bytes(message.command))
                    dataset_type = Response(message.elements)._us(TAG_DATASET_TYPE)
                    if dataset_type == NO_DATASET:
                        return Response(message.elements)
            else:
                message.dataset += data
                if header & 2 and message.elements is not None:
                    return Response(message.elements, bytes(message.dataset))
        return None

    def _fail(self, outcome: Outcome) -> None:
        self.outcome = outcome
        if outcome == "closed":
            self.closed = True
        self.associated = False

    def _note_unexpected(self, pdu: _Pdu) -> None:
        """An A-ABORT (or anything else that is not a valid answer) ends the association."""
        if pdu.type == 0x07 and len(pdu.body) >= 4:
            self.aborted = True
            self.abort_source, self.abort_reason = pdu.body[2], pdu.body[3]
            self._fail("aborted")
        else:
            self._fail("closed")
        self.close()

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise AssociationUnusableError("connection closed")
        self._sock.sendall(data)

    def _receive_pdu(self, deadline: float) -> _Pdu | None:
        """The next PDU; None (with `outcome` set) on timeout or when the connection closes."""
        header = self._receive_exactly(6, deadline)
        if header is None:
            return None
        pdu_type, length = header[0], struct.unpack_from(">I", header, 2)[0]
        if length > _MAX_INCOMING_PDU:
            self._fail("closed")
            self.close()
            return None
        body = self._receive_exactly(length, deadline)
        return None if body is None else _Pdu(pdu_type, body)

    def _receive_exactly(self, n: int, deadline: float) -> bytes | None:
        while len(self._buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._sock is None:
                self._fail("timeout" if self._sock is not None else "closed")
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            except TimeoutError:
                self._fail("timeout")
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self._fail("closed")
                self.close()
                return None
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data
