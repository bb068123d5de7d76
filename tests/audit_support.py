"""Test helpers for the audit trail: a structural check of audit messages against the DICOM
Audit Message Schema, a parser of RFC 5424 records and syslog receivers (UDP and TLS).

`check_audit_message` writes the Relax NG schema of PS3.15 A.5.1 out as rules (no RELAX NG
validator is installed): the order and cardinality of elements, required attributes, no
attributes the schema does not define, and the enumerated values (EventActionCode,
EventOutcomeIndicator, NetworkAccessPointTypeCode, ParticipantObjectTypeCode and its role).
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CODED = {"csd-code", "codeSystemName", "originalText"}


def _fail(element: ET.Element, why: str) -> AssertionError:
    return AssertionError(f"<{element.tag}>: {why}")


def _sequence(element: ET.Element, pattern: str) -> None:
    """The children's tag names, space-separated, must match `pattern` (a regex of tags)."""
    tags = "".join(f"{child.tag} " for child in element)
    if not re.fullmatch(pattern, tags):
        raise _fail(element, f"children {tags.split()} do not follow {pattern!r}")


def _attributes(
    element: ET.Element, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> None:
    missing = required - set(element.attrib)
    unknown = set(element.attrib) - required - optional
    if missing or unknown:
        raise _fail(element, f"missing attributes {missing or '{}'}, unknown {unknown or '{}'}")


def _enum(element: ET.Element, name: str, allowed: set[str]) -> None:
    value = element.get(name)
    if value is not None and value not in allowed:
        raise _fail(element, f"{name}={value!r} is not one of {sorted(allowed)}")


def _coded(element: ET.Element) -> None:
    _attributes(element, CODED, {"displayName"})
    if len(element):
        raise _fail(element, "a coded value has no children")


def _numbers(lo: int, hi: int) -> set[str]:
    return {str(i) for i in range(lo, hi + 1)}


def check_audit_message(xml: str) -> ET.Element:
    """Parse one message and check it against the schema; returns the root element."""
    if "\n" in xml or "\r" in xml:
        raise AssertionError("an audit message is one line")
    root = ET.fromstring(xml)
    if root.tag != "AuditMessage" or root.attrib:
        raise _fail(root, "the root is a bare AuditMessage")
    _sequence(
        root,
        r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
        r"(ParticipantObjectIdentification )*",
    )
    event = root.find("EventIdentification")
    assert event is not None
    _attributes(event, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    when = datetime.fromisoformat(event.attrib["EventDateTime"])
    if when.tzinfo is None:
        raise _fail(event, "EventDateTime has no time zone (A.5.2.5)")
    _enum(event, "EventActionCode", set("CRUDE"))
    _enum(event, "EventOutcomeIndicator", {"0", "4", "8", "12"})
    _sequence(event, r"EventID (EventTypeCode )*(EventOutcomeDescription )?")
    for child in event:
        if child.tag != "EventOutcomeDescription":
            _coded(child)
    for participant in root.findall("ActiveParticipant"):
        _attributes(
            participant,
            {"UserID", "UserIsRequestor"},
            {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"},
        )
        _enum(participant, "UserIsRequestor", {"true", "false"})
        _enum(participant, "NetworkAccessPointTypeCode", _numbers(1, 5))
        _sequence(participant, r"(RoleIDCode )*(MediaIdentifier )?")
        for role in participant.findall("RoleIDCode"):
            _coded(role)
    source = root.find("AuditSourceIdentification")
    assert source is not None
    _attributes(source, {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    _sequence(source, r"(AuditSourceTypeCode )*")
    for code in source:
        if "csd-code" not in code.attrib:
            raise _fail(code, "csd-code is required")
    for obj in root.findall("ParticipantObjectIdentification"):
        _participant_object(obj)
    return root


def _participant_object(obj: ET.Element) -> None:
    _attributes(
        obj,
        {"ParticipantObjectID"},
        {
            "ParticipantObjectTypeCode",
            "ParticipantObjectTypeCodeRole",
            "ParticipantObjectDataLifeCycle",
            "ParticipantObjectSensitivity",
        },
    )
    _enum(obj, "ParticipantObjectTypeCode", _numbers(1, 4))
    _enum(obj, "ParticipantObjectTypeCodeRole", _numbers(1, 26))
    _enum(obj, "ParticipantObjectDataLifeCycle", _numbers(1, 15))
    _sequence(
        obj,
        r"ParticipantObjectIDTypeCode (ParticipantObjectName |ParticipantObjectQuery )"
        r"(ParticipantObjectDetail )*(ParticipantObjectDescription )*",
    )
    for child in obj:
        if child.tag == "ParticipantObjectIDTypeCode":
            _coded(child)
        elif child.tag == "ParticipantObjectDetail":
            _attributes(child, {"type", "value"})
            base64.b64decode(child.attrib["value"], validate=True)
        elif child.tag == "ParticipantObjectDescription":
            _sequence(
                child,
                r"(MPPS )*(Accession )*(SOPClass )*(ParticipantObjectContainsStudy )?"
                r"(Encrypted )?(Anonymized )?",
            )
            for accession in child.findall("Accession"):
                _attributes(accession, {"Number"})
            for sop in child.findall("SOPClass"):
                _attributes(sop, {"NumberOfInstances"}, {"UID"})
                int(sop.attrib["NumberOfInstances"])


def code(element: ET.Element | None) -> tuple[str, str, str]:
    """(csd-code, codeSystemName, originalText) of a coded element."""
    assert element is not None, "coded element missing"
    return (
        element.attrib["csd-code"],
        element.attrib["codeSystemName"],
        element.attrib["originalText"],
    )


# ---- syslog -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyslogRecord:
    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: str  # the XML (after the BOM)


_HEADER = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) ")


def parse_syslog(record: bytes) -> SyslogRecord:
    match = _HEADER.match(record)
    assert match, f"not an RFC 5424 record: {record[:120]!r}"
    msg = record[match.end() :]
    assert msg.startswith(b"\xef\xbb\xbf"), "MSG is UTF-8 with a BOM (RFC 5424 6.4)"
    fields = [g.decode("ascii") for g in match.groups()]
    return SyslogRecord(int(fields[0]), *fields[1:], msg=msg[3:].decode("utf-8"))


def split_octet_counted(stream: bytes) -> tuple[list[bytes], bytes]:
    """The complete RFC 5425 frames (`MSG-LEN SP SYSLOG-MSG`) at the start of a byte stream,
    and what follows them (an incomplete frame still arriving, or b"")."""
    records = []
    while stream:
        length, space, rest = stream.partition(b" ")
        assert length.isdigit() and len(length) <= 10, f"not a frame length: {length[:20]!r}"
        if not space or len(rest) < int(length):
            break
        records.append(rest[: int(length)])
        stream = rest[int(length) :]
    return records, stream


class UdpSyslogReceiver:
    """A syslog server on a UDP port of 127.0.0.1 the OS chooses; keeps every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.datagrams: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, _ = self.sock.recvfrom(65535)
            except OSError:
                return
            self.datagrams.append(data)

    def records(self) -> list[SyslogRecord]:
        return [parse_syslog(d) for d in list(self.datagrams)]

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


class TlsSyslogReceiver:
    """A syslog-over-TLS server (RFC 5425) on 127.0.0.1; keeps the bytes of every connection."""

    def __init__(self, certificate: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certificate), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.streams: list[bytearray] = []
        self.connections: list[ssl.SSLSocket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
                conn = self.context.wrap_socket(raw, server_side=True)
            except ssl.SSLError:
                continue
            except OSError:
                return
            stream = bytearray()
            self.streams.append(stream)
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn, stream), daemon=True).start()

    @staticmethod
    def _read(conn: ssl.SSLSocket, stream: bytearray) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            stream.extend(data)

    def records(self) -> list[SyslogRecord]:
        return [
            parse_syslog(record)
            for stream in list(self.streams)
            for record in split_octet_counted(bytes(stream))[0]
        ]

    def drop_connections(self) -> None:
        """Close every accepted connection (a server restart, as the node sees it)."""
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the reader, sends the FIN
            conn.close()

    def close(self) -> None:
        self.listener.close()
        self.drop_connections()
        self._thread.join(5)
