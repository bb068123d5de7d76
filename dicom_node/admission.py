"""Admission of TCP connections to the listener, before pynetdicom sees them.

pynetdicom's server (`transport.AssociationServer`) does the TLS handshake in the thread that
accepts connections, with no deadline, and makes an Association of every accepted socket. An
Association counts against `max_associations` and waits up to the ACSE timeout for the peer's
request. So connections that send nothing lock senders out, and on a TLS listener a single one
stops the accept loop. `AdmissionServer` splits the work:

- the accept thread only accepts, checks the source address against `allowed_addresses` and
  caps the connections still pending (not yet handed to pynetdicom); it never blocks on a peer;
- the connection's own thread (socketserver's, one per connection) does the TLS handshake and
  waits until the first PDU (the A-ASSOCIATE-RQ) is buffered, both within one deadline, as the
  ARTIM timer of PS3.8 bounds an acceptor's wait for A-ASSOCIATE-RQ (state Sta2);
- only then does pynetdicom's request handler create the Association, made event-driven
  (dicom_node/reactor.py: its threads wait for work instead of polling every millisecond).

Every connection that does not make it is closed and logged (`connection.*`, address and reason,
never PHI). Stopping the server wakes the pending connections, so it never waits for a peer.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.config import ListenerConfig, parse_network
from dicom_node.logs import get_logger
from dicom_node.metrics import RejectionReason
from dicom_node.reactor import EventDrivenRequestHandler, check_pynetdicom_internals

log = get_logger("dicom_node.admission")

PDU_HEADER_BYTES = 6  # PDU type, reserved, 4-byte big-endian length (PS3.8 9.3.1)
#: Bytes of a first PDU's body that must have arrived before the connection is handed over. An
#: A-ASSOCIATE-RQ is a few kilobytes; pynetdicom reads the rest of a larger one itself, under
#: the network timeout.
FIRST_PDU_WINDOW = 64 * 1024
_PARTIAL_POLL_S = 0.05  # re-check interval while a first PDU arrives in pieces (plain TCP)
_REFUSED_LOG_INTERVAL_S = 10.0  # at most one `connection.refused` line per reason in this time

Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class AdmissionPolicy:
    networks: tuple[Network, ...] = ()  # empty: any source address
    request_timeout_s: float = 10.0  # TLS handshake + A-ASSOCIATE-RQ, from accept
    max_pending: int = 32
    network_timeout_s: float = 60.0  # socket timeout once pynetdicom has the connection

    @classmethod
    def from_config(cls, cfg: ListenerConfig) -> AdmissionPolicy:
        return cls(
            networks=tuple(parse_network(entry) for entry in cfg.allowed_addresses),
            request_timeout_s=cfg.association_request_timeout_s,
            max_pending=cfg.max_pending_connections,
            network_timeout_s=cfg.network_timeout_s,
        )


def peer_ip(host: str) -> IPv4Address | IPv6Address | None:
    """The peer's address; an IPv4-mapped IPv6 address (dual-stack socket) as IPv4."""
    try:
        ip = ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_allowed(host: str, networks: Sequence[Network]) -> bool:
    """Whether a peer at `host` may connect (any address when no network is listed)."""
    if not networks:
        return True
    ip = peer_ip(host)
    return ip is not None and any(ip in network for network in networks)


def first_pdu_bytes(header: bytes) -> int:
    """How many bytes of a first PDU, header included, to buffer before handing it over."""
    (length,) = struct.unpack(">L", header[2:PDU_HEADER_BYTES])
    return PDU_HEADER_BYTES + min(int(length), FIRST_PDU_WINDOW)


class _ReplayingSSLSocket(ssl.SSLSocket):
    """A TLS socket that first returns the bytes admission read from it, so pynetdicom reads
    the A-ASSOCIATE-RQ as if it were unread. pynetdicom reads with recv(), the event-driven DUL
    (dicom_node/reactor.py) with recv_into(); both ask pending() for data that select() cannot
    see."""

    replay = b""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self.replay and not flags:
            chunk, self.replay = self.replay[:buflen], self.replay[buflen:]
            return chunk
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if self.replay and not flags:
            view = memoryview(buffer).cast("B")
            n = min(len(self.replay), nbytes or len(view), len(view))
            view[:n] = self.replay[:n]
            self.replay = self.replay[n:]
            return n
        return super().recv_into(buffer, nbytes, flags)

    def pending(self) -> int:
        return len(self.replay) + super().pending()


class _NotAdmittedError(Exception):
    """The connection is closed without an association; `event` and `fields` are logged."""

    def __init__(self, event: str, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.event = event
        self.fields = {"reason": reason, **fields}


#: The connections turned away that count as rejections (a peer that closes is not one).
_REJECTIONS = {
    "connection.idle_timeout": RejectionReason.IDLE_TIMEOUT,
    "connection.tls_failed": RejectionReason.TLS_FAILED,
}


class _StoppingError(Exception):
    """The server is shutting down."""


class _Throttle:
    """At most one log line per key and interval; counts the lines left out."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        """None: leave this line out; else log it, with this many left out since the last."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.interval_s) < self.interval_s:
                self._left_out[key] = self._left_out.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._left_out.pop(key, 0)


def _host(client_address: Any) -> str:
    return str(client_address[0] if isinstance(client_address, tuple) else client_address)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _tls_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the peer closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return exc.strerror or type(exc).__name__


class AdmissionServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission in front of the Association (module doc)."""

    daemon_threads = True  # a pending connection never holds up the process

    def __init__(  # noqa: PLR0917 - pynetdicom's make_server passes these positionally
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        policy: AdmissionPolicy,
        on_rejected: Callable[[RejectionReason, str, str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.on_rejected = on_rejected
        self.serving_thread: threading.Thread | None = None  # set by start_admission_server
        self._pending = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._refused_throttle = _Throttle(_REFUSED_LOG_INTERVAL_S)
        if ssl_context is not None:
            ssl_context.sslsocket_class = _ReplayingSSLSocket
        check_pynetdicom_internals(ae)  # before the port opens: fail at start-up, not per peer
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=EventDrivenRequestHandler,  # accepted associations do not poll
        )

    @property
    def pending_connections(self) -> int:
        return self._pending

    @property
    def serving(self) -> bool:
        """Whether the accept loop runs on an open socket."""
        thread = self.serving_thread
        sock = self.socket
        return thread is not None and thread.is_alive() and sock is not None and sock.fileno() >= 0

    def _count_rejection(self, reason: RejectionReason, host: str, detail: str) -> None:
        if self.on_rejected is not None:
            self.on_rejected(reason, host, detail)

    # ---- accept thread: nothing here may wait for a peer ----------------------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: the TLS handshake runs in the connection's own thread."""
        listener = cast(socket.socket, self.socket)
        sock, address = listener.accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = _host(client_address)
        if not address_allowed(host, self.policy.networks):
            self._count_rejection(
                RejectionReason.ADDRESS_NOT_ALLOWED, host, "source address not allowed"
            )
            self._log_refused(host, "source address not allowed")
            return False
        with self._lock:
            if self._pending >= self.policy.max_pending:
                full = True
            else:
                self._pending += 1
                full = False
        if full:
            why = f"{self.policy.max_pending} connections are already waiting to associate"
            self._count_rejection(RejectionReason.PENDING_LIMIT, host, why)
            self._log_refused(host, why)
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the pending slot is free again
            self._release()
            raise

    def _log_refused(self, host: str, reason: str) -> None:
        left_out = self._refused_throttle(reason)
        if left_out is not None:
            extra = {"left_out": left_out} if left_out else {}  # lines withheld since the last
            log.warning("connection.refused", address=host, reason=reason, **extra)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    # ---- connection thread ---------------------------------------------------------------

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            admitted = self._admit(request, _host(client_address))
        finally:
            self._release()
        if admitted is not None:  # pynetdicom: Association, counted in max_associations
            super().process_request_thread(admitted, client_address)

    def _admit(self, sock: socket.socket, host: str) -> socket.socket | None:
        """The connection once it is ready for pynetdicom, or None (closed and logged)."""
        deadline = time.monotonic() + self.policy.request_timeout_s
        try:
            sock.setblocking(False)
            if self.ssl_context is not None:
                self._await_client_hello(sock, deadline)
                sock = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                self._handshake(sock, deadline)
                self._await_first_pdu_tls(cast(_ReplayingSSLSocket, sock), deadline)
            else:
                self._await_first_pdu_plain(sock, deadline)
            sock.settimeout(self.policy.network_timeout_s)
        except _NotAdmittedError as exc:
            if exc.event in _REJECTIONS:
                self._count_rejection(_REJECTIONS[exc.event], host, str(exc))
            level = log.info if exc.event == "connection.closed" else log.warning
            level(exc.event, address=host, **exc.fields)
            _close(sock)
            return None
        except _StoppingError:
            _close(sock)
            return None
        except Exception:  # unexpected: logged with its traceback, the connection closed
            log.exception("connection.error", address=host)
            _close(sock)
            return None
        return sock

    def _wait(
        self, sock: socket.socket, deadline: float, waiting_for: str, *, write: bool, **fields: Any
    ) -> None:
        """Until `sock` is readable (or writable); raises at the deadline (the log line gets
        `fields`) or on shutdown."""
        remaining = deadline - time.monotonic()
        if remaining > 0 and not self._stopping.is_set():
            readers = [self._wake_r] if write else [self._wake_r, sock]
            ready_r, ready_w, _ = select.select(readers, [sock] if write else [], [], remaining)
            if self._wake_r in ready_r or self._stopping.is_set():
                raise _StoppingError
            if ready_r or ready_w:
                return
        if self._stopping.is_set():
            raise _StoppingError
        raise _NotAdmittedError(
            "connection.idle_timeout",
            f"no {waiting_for} within {self.policy.request_timeout_s:g} s",
            **fields,
        )

    def _await_client_hello(self, sock: socket.socket, deadline: float) -> None:
        """Until the peer has sent something, so a connection closed without a word (a port
        check) is not logged as a failed handshake."""
        while True:
            self._wait(sock, deadline, "TLS handshake", write=False)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    return
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _NotAdmittedError(
                    "connection.closed", f"connection error before a TLS handshake: {exc}"
                ) from exc
            raise _NotAdmittedError(
                "connection.closed", "closed by the peer before a TLS handshake"
            )

    def _handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        while True:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._wait(sock, deadline, "TLS handshake", write=False)
            except ssl.SSLWantWriteError:
                self._wait(sock, deadline, "TLS handshake", write=True)
            except OSError as exc:  # ssl.SSLError is an OSError
                raise _NotAdmittedError("connection.tls_failed", _tls_reason(exc)) from exc
            else:
                return

    def _await_first_pdu_plain(self, sock: socket.socket, deadline: float) -> None:
        """Peek (nothing is consumed) until the first PDU is buffered in the kernel."""
        seen = 0
        while True:
            self._wait(sock, deadline, "A-ASSOCIATE-RQ", write=False, received_bytes=seen)
            try:
                data = sock.recv(PDU_HEADER_BYTES + FIRST_PDU_WINDOW, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _NotAdmittedError(
                    "connection.closed", f"connection error before an A-ASSOCIATE-RQ: {exc}"
                ) from exc
            if not data:
                raise _NotAdmittedError(
                    "connection.closed", "closed by the peer before an A-ASSOCIATE-RQ"
                )
            seen = len(data)
            if seen >= PDU_HEADER_BYTES and seen >= first_pdu_bytes(data):
                return
            # part of it: the socket stays readable, so look again a little later
            if self._stopping.wait(min(_PARTIAL_POLL_S, max(deadline - time.monotonic(), 0))):
                raise _StoppingError

    def _await_first_pdu_tls(self, sock: _ReplayingSSLSocket, deadline: float) -> None:
        """Read the first PDU from TLS and keep it for pynetdicom (TLS cannot peek)."""
        buffered = bytearray()
        need = PDU_HEADER_BYTES
        while len(buffered) < need:
            try:
                chunk = sock.recv(need - len(buffered))
            except ssl.SSLWantReadError:
                self._wait(
                    sock, deadline, "A-ASSOCIATE-RQ", write=False, received_bytes=len(buffered)
                )
                continue
            except ssl.SSLWantWriteError:
                self._wait(
                    sock, deadline, "A-ASSOCIATE-RQ", write=True, received_bytes=len(buffered)
                )
                continue
            except OSError as exc:
                raise _NotAdmittedError(
                    "connection.closed", f"connection error before an A-ASSOCIATE-RQ: {exc}"
                ) from exc
            if not chunk:
                raise _NotAdmittedError(
                    "connection.closed", "closed by the peer before an A-ASSOCIATE-RQ"
                )
            buffered += chunk
            if len(buffered) >= PDU_HEADER_BYTES:
                need = first_pdu_bytes(bytes(buffered))
        sock.replay = bytes(buffered)

    # ---- shutdown ---------------------------------------------------------------------------

    def server_close(self) -> None:
        """Wake the pending connections (they close at once), then close as pynetdicom does
        (which joins the connection threads)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        try:
            super().server_close()
        finally:
            self._wake_r.close()
            self._wake_w.close()


def start_admission_server(
    ae: AE,
    address: tuple[str, int],
    policy: AdmissionPolicy,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None,
    *,
    on_rejected: Callable[[RejectionReason, str, str], None] | None = None,
) -> AdmissionServer:
    """What `AE.start_server(block=False)` does, with an AdmissionServer: serve in a daemon
    thread and register the server with the AE (so `server.shutdown()` works). `on_rejected`
    hears every connection turned away before it is an association, with the peer's address and
    why (the metrics and the audit trail)."""
    server = make_admission_server(
        ae, address, policy, evt_handlers, ssl_context, on_rejected=on_rejected
    )
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}", daemon=True
    )
    server.serving_thread = thread
    thread.start()
    ae._servers.append(server)  # pynetdicom's own bookkeeping, as in start_server
    return server


def make_admission_server(
    ae: AE,
    address: tuple[str, int],
    policy: AdmissionPolicy,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None,
    *,
    on_rejected: Callable[[RejectionReason, str, str], None] | None = None,
    server_class: type[AdmissionServer] = AdmissionServer,
    **kwargs: Any,
) -> AdmissionServer:
    """The server of `start_admission_server`, not yet serving; `server_class` may be a
    subclass (dicom_node/receivers.py: the main process's dispatcher and the receiver
    processes' servers, which create the Association from a handed-over connection)."""
    return cast(
        AdmissionServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=server_class,
            policy=policy,
            on_rejected=on_rejected,
            **kwargs,
        ),
    )
