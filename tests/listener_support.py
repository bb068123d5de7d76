"""Helpers for the listener tests: certificates made with openssl, idle and raw connections,
and a recorder of the listener's `connection.*` log events."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _openssl(openssl: str, *args: str) -> None:
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def self_signed(openssl: str, directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    """(key, certificate): a self-signed certificate valid for 127.0.0.1 and localhost."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-subj",
        f"/CN={cn}",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    )
    return key, cert


def issue(
    openssl: str, directory: Path, name: str, cn: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    """(key, certificate) signed by the CA `ca` = (ca key, ca certificate)."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _openssl(
        openssl,
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={cn}",
    )
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        openssl,
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return key, cert


def encrypt_key(openssl: str, key: Path, out: Path) -> Path:
    _openssl(
        openssl, "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(out)
    )
    return out


@contextmanager
def idle_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """`n` TCP connections to the port that never send anything."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Block (up to the socket's timeout) until the peer closes; True if it did."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def first_pdu_of_an_association_request(ae_title: str = "LTDIFF") -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends for a Verification association (captured)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 5
        ae.connection_timeout = 5
        t = threading.Thread(
            target=ae.associate, args=("127.0.0.1", port), kwargs={"ae_title": ae_title}
        )
        t.start()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
                chunk = conn.recv(65536)
                assert chunk, "pynetdicom closed before sending its request"
                data += chunk
        t.join(timeout=30)
    return data


class EventRecorder(logging.Handler):
    """Collects the structlog event dicts of one logger (through the stdlib pipeline)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict):
            with self._lock2:
                self.events.append(dict(record.msg))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock2:
            return [e for e in self.events if e.get("event") == event]


@contextmanager
def recording(logger_name: str = "dicom_node.admission") -> Iterator[EventRecorder]:
    recorder = EventRecorder()
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)
