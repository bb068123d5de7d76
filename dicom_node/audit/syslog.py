"""Syslog records of audit messages (RFC 5424) and their framing on the wire. Pure functions.

A record is `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG` (RFC 5424 6), with

- PRI = facility 10 (security/authorization, "authpriv") * 8 + the severity of the message's
  outcome (PS3.15 A.6/A.7: facility 10, mostly severity 5, "<85>");
- TIMESTAMP the time the message was made, RFC 3339 with milliseconds and the UTC offset;
- APP-NAME `ltdiff-node`, PROCID the process id, MSGID `IHE+RFC-3881` (what IHE ATNA audit
  repositories expect; PS3.15 A.6 allows it);
- no STRUCTURED-DATA (`-`); MSG the XML of the audit message in UTF-8, after a byte order mark
  (RFC 5424 6.4: MSG-UTF8).

Framing: over TLS (RFC 5425 4.3) each record is preceded by its length in octets and a space
(octet counting); over UDP (RFC 5426 3.1) one record is one datagram, unframed.
"""

from __future__ import annotations

from datetime import datetime

FACILITY_AUTHPRIV = 10
APP_NAME = "ltdiff-node"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
#: Largest UDP payload over IPv4 (65535 - 8 byte UDP header - 20 byte IP header).
MAX_UDP_PAYLOAD = 65507

_NILVALUE = "-"


def header_field(value: object, max_length: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces (33-126), at most
    `max_length` characters; `-` (NILVALUE) when nothing is left."""
    text = "".join(c for c in str(value) if 33 <= ord(c) <= 126)[:max_length]
    return text or _NILVALUE


def pri(severity: int, facility: int = FACILITY_AUTHPRIV) -> int:
    if not 0 <= severity <= 7 or not 0 <= facility <= 23:
        raise ValueError(f"severity {severity} must be 0-7 and facility {facility} 0-23")
    return facility * 8 + severity


def syslog_timestamp(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("a syslog TIMESTAMP needs a time zone (RFC 5424 6.2.3)")
    return when.isoformat(timespec="milliseconds")


def syslog_record(
    xml: str,
    severity: int,
    *,
    when: datetime,
    hostname: str,
    procid: int | str,
    app_name: str = APP_NAME,
    msgid: str = MSGID,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying an audit message."""
    header = " ".join(
        (
            f"<{pri(severity)}>1",
            syslog_timestamp(when),
            header_field(hostname, 255),
            header_field(app_name, 48),
            header_field(procid, 128),
            header_field(msgid, 32),
            _NILVALUE,  # STRUCTURED-DATA
        )
    )
    return header.encode("ascii") + b" " + BOM + xml.encode("utf-8")


def octet_counted(record: bytes) -> bytes:
    """RFC 5425 4.3 framing: `MSG-LEN SP SYSLOG-MSG`, MSG-LEN the record's length in octets."""
    return b"%d " % len(record) + record
