"""A receiver process (dicom_node/receivers.py): runs the associations the main process hands
over, with the same admission steps after accept (TLS handshake, A-ASSOCIATE-RQ wait) and the
same C-STORE handler as the in-process listener.

Started by the main process as `python -m dicom_node.receiver_process FD`, FD being its end of
a SOCK_SEQPACKET socket pair; the first message is its `ReceiverSpec`. Its metrics, audit calls
and log lines go back over the socket pair (the main process owns /metrics, the audit outputs
and the log stream). It dies with the main process: PR_SET_PDEATHSIG, and the end of file on
the socket pair.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import MutableMapping
from types import FrameType
from typing import Any, cast

import structlog
from pynetdicom import AE

from dicom_node.admission import AdmissionPolicy, AdmissionServer, _host, make_admission_server
from dicom_node.audit.reception import Peer, Subject, Ticket
from dicom_node.audit.trail import AuditTrail
from dicom_node.logs import (
    drop_phi,
    install_process_hooks,
    quiet_dicom_libraries,
    redact,
    render_exc_info,
    safe_traceback,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.receiver_protocol import (
    Admitted,
    Call,
    CallTarget,
    Closed,
    FromReceiver,
    HandOver,
    Ready,
    Stop,
    decode,
    encode,
    encode_log,
)
from dicom_node.receivers import ReceiverSpec, SharedCounts
from dicom_node.scp import build_ae, reception_handlers
from dicom_node.spool import Spool
from dicom_node.store import JobStore
from dicom_node.tls import make_ssl_context

_PR_SET_PDEATHSIG = 1


class Sender:
    """Messages to the main process, from any thread; a main process that is gone makes the
    receiver exit."""

    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self._lock = threading.Lock()

    def send(self, message: FromReceiver) -> None:
        self.send_bytes(encode(message))

    def send_bytes(self, data: bytes) -> None:
        try:
            with self._lock:
                self.chan.send(data)
        except OSError:
            os._exit(1)  # the main process is gone: so are we (its associations with it)


class Forward:
    """Calls on the main process's NodeMetrics or AuditTrail, sent as `Call` records; any
    public method (the C-STORE handler may call new ones), answered None."""

    def __init__(self, sender: Sender, target: CallTarget) -> None:
        self._sender = sender
        self._target = target

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> None:
            self._sender.send(Call(self._target, name, args, kwargs))

        return call


class ForwardAudit(Forward):
    """The audit trail's hooks; `instance_receiving` returns the ticket the main process's
    ledger made of the same values (`instance_not_stored` retracts by those values)."""

    def instance_receiving(
        self,
        series_uid: str,
        calling_ae: str,
        address: str | None,
        subject: Subject,
        sop_class_uid: str,
    ) -> Ticket:
        args = (series_uid, calling_ae, address, subject, sop_class_uid)
        self._sender.send(Call("audit", "instance_receiving", args))
        return Ticket(series_uid, Peer(calling_ae, address), subject, sop_class_uid)


class SharedLimitAE(AE):
    """An AE whose `maximum_associations`, as pynetdicom checks it (its own acceptors against
    the limit), leaves room only for what the other receiver processes do not use: the limit
    holds for the whole node."""

    shared: SharedCounts | None = None
    slot = 0
    _limit = 10

    @property
    def maximum_associations(self) -> int:
        others = 0 if self.shared is None else self.shared.others(self.slot)
        return self._limit - others

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._limit = max(1, value)


def _socket_of(assoc: Any) -> object:
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


class ReceiverServer(AdmissionServer):
    """AdmissionServer without a socket of its own: connections come from the main process
    (`serve_connection`), each in a thread that finishes admission and then runs the
    Association (created by the request handler, as in the main process) to its end."""

    sender: Sender
    counts: SharedCounts
    slot: int

    def server_bind(self) -> None:
        """Nothing to bind: `server_address` stays the main process's listening address."""

    def server_activate(self) -> None:
        """Nothing to listen on."""

    def serve_connection(self, sock: socket.socket, address: Any, conn_id: int) -> None:
        threading.Thread(
            target=self._serve,
            args=(sock, address, conn_id),
            name=f"Connection-{conn_id}",
            daemon=True,
        ).start()

    def _serve(self, sock: socket.socket, address: Any, conn_id: int) -> None:
        try:
            admitted = None
            try:
                admitted = self._admit(sock, _host(address))
            finally:
                self.sender.send(Admitted(conn_id, admitted is not None))
            if admitted is not None:
                self.counts.add(self.slot, 1)  # before pynetdicom checks max_associations
                try:
                    self._associate(admitted, address)
                finally:
                    self.counts.add(self.slot, -1)
        finally:
            self.sender.send(Closed(conn_id))

    def _associate(self, sock: socket.socket, address: Any) -> None:
        try:
            self.finish_request(sock, address)  # the Association, started in its own thread
        except Exception:  # noqa: BLE001 - as pynetdicom's process_request_thread
            self.handle_error(sock, address)
            self.shutdown_request(sock)
            return
        for assoc in self.active_associations:
            if _socket_of(assoc) is sock:
                assoc.join()
                return


class _TerminateError(Exception):
    """SIGTERM: stop as the main process's Stop would."""


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # not Linux: the end of file on the socket pair does
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _configure_logging(sender: Sender, level: str) -> None:
    """Every log line goes to the main process, after the PHI processors ran here."""

    def forward(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        fields = dict(event_dict)
        name = str(fields.pop("logger", "dicom_node"))
        levelname = str(fields.pop("level", "info")).upper()
        event = str(fields.pop("event", ""))
        levelno = logging.getLevelName(levelname)
        sender.send_bytes(
            encode_log(name, levelno if isinstance(levelno, int) else 20, event, fields)
        )
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            drop_phi,
            structlog.processors.StackInfoRenderer(),
            render_exc_info,
            forward,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    class _ToMain(logging.Handler):
        """Records of stdlib loggers (pynetdicom, pydicom): the message redacted."""

        def emit(self, record: logging.LogRecord) -> None:
            fields: dict[str, Any] = {}
            try:
                text = redact(record.getMessage())
                if record.exc_info and record.exc_info[1] is not None:
                    fields["exception"] = safe_traceback(record.exc_info[1])
            except Exception:  # noqa: BLE001 - as logs._SafeStreamHandler: never the message
                text = "log record dropped: it could not be formatted"
            sender.send_bytes(encode_log(record.name, record.levelno, text, fields))

    root = logging.getLogger()
    root.handlers[:] = [_ToMain()]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def serve(chan: socket.socket, spec: ReceiverSpec) -> int:
    sender = Sender(chan)
    _configure_logging(sender, spec.log_level)
    install_process_hooks()
    quiet_dicom_libraries()
    cfg = spec.listener
    store = JobStore(spec.database_path)
    spool = Spool(spec.spool_dir, spec.min_free_bytes)
    counts = SharedCounts(spec.counts_path, spec.slots)
    counts.set(spec.slot, 0)
    ae = cast(SharedLimitAE, build_ae(cfg, ae_class=SharedLimitAE))
    ae.shared, ae.slot = counts, spec.slot
    metrics = cast(NodeMetrics, Forward(sender, "metrics"))
    audit = cast(AuditTrail, ForwardAudit(sender, "audit")) if spec.audit else None
    handlers, refused = reception_handlers(
        cfg, spool, store, metrics, audit, lock_path=spec.lock_path
    )
    ssl_context = make_ssl_context(cfg.tls, server_side=True) if cfg.tls.enabled else None
    # The main process checked the source address and the pending cap already.
    policy = AdmissionPolicy.from_config(cfg)
    server = cast(
        ReceiverServer,
        make_admission_server(
            ae,
            cast(tuple[str, int], spec.served_address),
            AdmissionPolicy(
                request_timeout_s=policy.request_timeout_s,
                network_timeout_s=policy.network_timeout_s,
            ),
            handlers,
            ssl_context,
            on_rejected=refused,
            server_class=ReceiverServer,
        ),
    )
    server.sender, server.counts, server.slot = sender, counts, spec.slot
    sender.send(Ready(os.getpid()))
    try:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(chan, 1 << 16, 4)
            if not data:
                break  # the main process is gone
            message = decode(data)
            if isinstance(message, Stop):
                break
            if isinstance(message, HandOver) and fds:
                for extra in fds[1:]:
                    os.close(extra)
                server.serve_connection(
                    socket.socket(fileno=fds[0]), message.address, message.conn_id
                )
            else:
                for fd in fds:
                    os.close(fd)
                if isinstance(message, HandOver):  # its descriptor did not arrive: over
                    sender.send(Admitted(message.conn_id, ok=False))
                    sender.send(Closed(message.conn_id))
    except _TerminateError:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.server_close()  # pending admissions close at once
        for assoc in list(server.active_associations):
            with contextlib.suppress(Exception):
                assoc.abort()
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    chan = socket.socket(fileno=int(args[0]))
    spec = pickle.loads(chan.recv(1 << 20))  # noqa: S301 - from our parent, see receiver_protocol
    if not isinstance(spec, ReceiverSpec) or os.getppid() != spec.parent_pid:
        return 1  # the parent died before PR_SET_PDEATHSIG was set, or a stray start

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise _TerminateError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the main's to handle
    signal.signal(signal.SIGTERM, terminate)
    return serve(chan, spec)


if __name__ == "__main__":
    sys.exit(main())
