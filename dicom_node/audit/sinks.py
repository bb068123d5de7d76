"""Where audit messages go: a file (one message per line) and syslog over UDP or TLS.

Each sink is used by one writer thread only (`trail.SinkWriter`), gets messages in batches and
raises `SinkError` saying how many of the batch it delivered; the writer keeps the rest and
tries again later. Nothing here logs (the writer logs, without the messages).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from dicom_node.audit.messages import Rendered
from dicom_node.audit.syslog import MAX_UDP_PAYLOAD, octet_counted, syslog_record
from dicom_node.config import SyslogConfig
from dicom_node.tls import make_ssl_context

_CONNECT_TIMEOUT_S = 10.0


class SinkError(Exception):
    """Delivery stopped after `delivered` messages of the batch; `cause` says why."""

    def __init__(self, delivered: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__} after {delivered} message(s)")
        self.delivered = delivered
        self.cause = cause


class MessageTooLargeError(ValueError):
    """A message that this sink can never carry (it is skipped, and counted as dropped)."""


class Sink(Protocol):
    name: str

    def send(self, batch: Sequence[Rendered]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends one message per line to a file created 0600 (the messages carry patient
    identifiers), fsync'd once per batch: a message the writer has taken is on disk before the
    next batch starts. A file moved or removed (log rotation) is reopened at its path."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None

    def _open(self) -> int:
        if self._fd is not None:
            try:
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self._ino:
                    return self._fd
            except FileNotFoundError:
                pass
            self.close()  # rotated away: write to a new file at the path
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        return fd

    def send(self, batch: Sequence[Rendered]) -> None:
        try:
            fd = self._open()
            data = b"".join(m.xml.encode("utf-8") + b"\n" for m in batch)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            self.close()
            raise SinkError(0, exc) from exc  # the batch is written again: at least once

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._ino = self._fd, None, None
            with contextlib.suppress(OSError):
                os.close(fd)


class UdpSyslogSink:
    """RFC 5426: one datagram per record, no framing. The server's address is looked up for
    every batch, so a DNS change is followed."""

    name = "syslog"

    def __init__(self, cfg: SyslogConfig, hostname: str) -> None:
        self.cfg = cfg
        self.hostname = hostname

    def send(self, batch: Sequence[Rendered]) -> None:
        delivered = 0
        try:
            family, _, _, _, address = socket.getaddrinfo(
                self.cfg.host, self.cfg.port, type=socket.SOCK_DGRAM
            )[0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                for message in batch:
                    record = _record(message, self.hostname)
                    if len(record) > MAX_UDP_PAYLOAD:
                        raise MessageTooLargeError(f"{len(record)} bytes do not fit a datagram")
                    try:
                        sock.sendto(record, address)
                    except OSError as exc:
                        if exc.errno == errno.EMSGSIZE:
                            raise MessageTooLargeError(str(exc)) from exc
                        raise
                    delivered += 1
        except (OSError, MessageTooLargeError) as exc:
            raise SinkError(delivered, exc) from exc

    def close(self) -> None:
        pass


class TlsSyslogSink:
    """RFC 5425: octet-counted records over one TLS connection, verified like a destination's
    (`[audit.syslog.tls]`: the server's certificate against ca_certificates or the system's
    store, and its host name; a client certificate when configured). The connection is opened
    when needed and opened again after a failure; a connection the server closed (a syslog
    server never sends) is noticed before the next batch is written to it."""

    name = "syslog"

    def __init__(self, cfg: SyslogConfig, hostname: str) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self._context = make_ssl_context(cfg.tls, server_side=False)
        self._sock: ssl.SSLSocket | None = None

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and not _closed_by_peer(self._sock):
            return self._sock
        self.close()
        raw = socket.create_connection((self.cfg.host, self.cfg.port), _CONNECT_TIMEOUT_S)
        try:
            self._sock = self._context.wrap_socket(raw, server_hostname=self.cfg.host)
        except BaseException:
            raw.close()
            raise
        return self._sock

    def send(self, batch: Sequence[Rendered]) -> None:
        delivered = 0
        try:
            sock = self._connection()
            for message in batch:
                sock.sendall(octet_counted(_record(message, self.hostname)))
                delivered += 1
        except OSError as exc:  # ssl.SSLError is an OSError
            self.close()
            raise SinkError(delivered, exc) from exc

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            with contextlib.suppress(OSError):
                sock.close()


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    """A syslog server sends nothing: a readable connection has been closed (or broken)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.setblocking(False)
        try:
            return not sock.recv(1)
        finally:
            sock.settimeout(_CONNECT_TIMEOUT_S)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True


def _record(message: Rendered, hostname: str) -> bytes:
    return syslog_record(
        message.xml, message.severity, when=message.created, hostname=hostname, procid=os.getpid()
    )


def make_sinks(path: Path | None, syslog: SyslogConfig | None, hostname: str) -> list[Sink]:
    sinks: list[Sink] = []
    if path is not None:
        sinks.append(FileSink(path))
    if syslog is not None:
        if syslog.tls.enabled:
            sinks.append(TlsSyslogSink(syslog, hostname))
        else:
            sinks.append(UdpSyslogSink(syslog, hostname))
    return sinks
