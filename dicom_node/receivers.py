"""Receiver processes: the associations of the listener run in N child processes, so that
concurrent associations use several cores (one Python process receives at most about 180
instances/s, whatever the number of associations: docs/PERFORMANCE.md).

The main process keeps the listening socket, admission's accept-side checks (source address,
the cap on pending connections) and the global `max_associations`; it hands every admitted
connection (its file descriptor, over a Unix socket pair) to the least busy receiver process.
The receiver does the rest of admission (TLS handshake, the wait for the A-ASSOCIATE-RQ) and runs
the pynetdicom Association with the same C-STORE handler as the main process would, on its own
spool and database connections (SQLite WAL: `BEGIN IMMEDIATE` serializes writers across
processes). What the handler tells the node's metrics and audit trail, and every log line,
comes back over the socket pair as small records (dicom_node/receiver_protocol.py), applied
here by the receiver's supervisor thread.

Supervision: a receiver that dies is logged (`receiver.died`) and replaced; its connections
are closed by the OS (the peers see a reset: nothing they were not answered Success for is
considered stored, so they send it again). One that dies 3 times within a minute makes /healthz
unhealthy. The receivers die with the main process (PR_SET_PDEATHSIG, and they exit when their
socket pair reports the main process gone), and stop when it stops.

`SharedCounts` is the one piece of shared memory: each receiver's number of associations, so a
receiver can apply `max_associations` to the whole node when pynetdicom checks it.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.utils import make_target

from dicom_node.admission import AdmissionPolicy, AdmissionServer, _close, make_admission_server
from dicom_node.audit.trail import AuditTrail
from dicom_node.config import ListenerConfig, NodeConfig
from dicom_node.logs import get_logger
from dicom_node.metrics import NodeMetrics
from dicom_node.receiver_protocol import (
    Admitted,
    Call,
    Closed,
    HandOver,
    Log,
    Ready,
    Stop,
    choose_receiver,
    decode,
    encode,
)
from dicom_node.scp import build_ae, rejection_hook

log = get_logger("dicom_node.receivers")

#: How long start-up waits for a receiver process to serve.
START_TIMEOUT_S = 120.0
#: How long stop waits for a receiver process to exit before it is killed.
STOP_TIMEOUT_S = 10.0
#: A receiver that dies this often within FAILING_WINDOW_S makes the node unhealthy.
FAILING_DEATHS = 3
FAILING_WINDOW_S = 60.0
#: Restart delays after a death: doubled per death within the window, at most the last.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 10.0
#: Hand-overs remembered (conn id, receiver pid) for diagnostics and tests.
HISTORY = 256

_COUNT = struct.Struct("=q")


class SharedCounts:
    """One signed 64-bit counter per receiver slot in a small file mapped by every process.
    Each receiver writes only its own slot (under its own lock); anyone reads all. The main
    process zeroes the slot of a receiver that died."""

    def __init__(self, path: Path, slots: int, *, create: bool = False) -> None:
        self.path = path
        self.slots = slots
        size = _COUNT.size * slots
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock = threading.Lock()

    def get(self, slot: int) -> int:
        return int(_COUNT.unpack_from(self._map, slot * _COUNT.size)[0])

    def set(self, slot: int, value: int) -> None:
        _COUNT.pack_into(self._map, slot * _COUNT.size, value)

    def add(self, slot: int, delta: int) -> None:
        with self._lock:
            self.set(slot, self.get(slot) + delta)

    def total(self) -> int:
        return sum(self.get(i) for i in range(self.slots))

    def others(self, slot: int) -> int:
        return self.total() - self.get(slot)

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver process needs; the first message on its socket pair."""

    slot: int
    slots: int
    listener: ListenerConfig
    served_address: tuple[Any, ...]  # the main process's listening address (the acceptor's)
    spool_dir: Path
    min_free_bytes: int
    database_path: Path
    lock_path: Path
    counts_path: Path
    audit: bool
    log_level: str
    parent_pid: int


class _Slot:
    """One receiver process and what the main process knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: socket.socket | None = None
        self.pid: int | None = None
        self.ready = threading.Event()
        self.exited = threading.Event()  # set when a process of this slot exited
        self.conns: dict[int, bool] = {}  # conn id -> admission over
        self.send_lock = threading.Lock()
        self.deaths: deque[float] = deque(maxlen=FAILING_DEATHS)
        self.start_error: str | None = None

    @property
    def serving(self) -> bool:
        return self.ready.is_set() and self.chan is not None

    def failing(self, now: float) -> bool:
        return self.start_error is not None or (
            len(self.deaths) == FAILING_DEATHS and now - self.deaths[0] < FAILING_WINDOW_S
        )


class ReceiverPool:
    """N receiver processes, each supervised by a thread of this process (module doc)."""

    def __init__(
        self,
        config: NodeConfig,
        n: int,
        metrics: NodeMetrics,
        audit: AuditTrail | None,
        *,
        on_released: Callable[[], None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.audit = audit
        self.on_released = on_released  # a connection's pending slot in admission is free
        self.slots = [_Slot(i) for i in range(n)]
        self.history: deque[tuple[int, int | None]] = deque(maxlen=HISTORY)
        self.lock_path = config.state_dir / "receive.lock"
        self.counts = SharedCounts(config.state_dir / "receivers.counts", n, create=True)
        self._lock = threading.Lock()  # slots' connections and loads
        self._apply_lock = threading.Lock()  # messages are read and applied under it
        self._ids = itertools.count(1)
        self._next = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._served_address: tuple[Any, ...] = ()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, served_address: tuple[Any, ...]) -> None:
        """Start every receiver and wait until all serve; raises (all stopped) if one cannot."""
        self._served_address = tuple(served_address)
        for slot in self.slots:
            thread = threading.Thread(
                target=self._supervise, args=(slot,), name=f"receiver-{slot.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for slot in self.slots:
                while not slot.ready.wait(0.05):
                    if slot.exited.is_set() or slot.start_error or time.monotonic() > deadline:
                        why = slot.start_error or (
                            "it exited during start-up"
                            if slot.exited.is_set()
                            else f"it did not serve within {START_TIMEOUT_S:g} s"
                        )
                        raise RuntimeError(f"receiver process {slot.index}: {why}")
        except BaseException:
            self.stop()
            raise
        log.info(
            "receivers.started",
            processes=len(self.slots),
            pids=[slot.pid for slot in self.slots],
        )

    def stop(self) -> None:
        """Stop every receiver (their associations end with them) and wait for them."""
        self._stopping.set()
        for slot in self.slots:
            self._send(slot, encode(Stop()))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiver.stop_timeout", slot=slot.index, pid=proc.pid)
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            self.drain()
        self.counts.close()

    # ---- state -------------------------------------------------------------------------------

    @property
    def health(self) -> str:
        """`ok`, or what is wrong with the receivers (for /healthz)."""
        now = time.monotonic()
        failing = [s.index for s in self.slots if s.failing(now)]
        if failing:
            return f"receiver process(es) {failing} keep dying or cannot start"
        if not any(s.serving for s in self.slots):
            return "no receiver process is running"
        return "ok"

    def pids(self) -> list[int | None]:
        return [slot.pid if slot.serving else None for slot in self.slots]

    # ---- hand-over ---------------------------------------------------------------------------

    def hand_over(self, sock: socket.socket, address: tuple[Any, ...]) -> bool:
        """Pass an accepted connection to the least busy receiver. False: no receiver took it
        (the caller still holds its pending slot and closes it); True: the receiver owns it
        (its pending slot is released when admission is over there). The caller closes its
        own descriptor either way."""
        while True:
            with self._lock:
                loads = [len(s.conns) if s.serving else None for s in self.slots]
                i = choose_receiver(loads, self._next)
                if i is None:
                    return False
                self._next = (i + 1) % len(self.slots)
                slot = self.slots[i]
                conn_id = next(self._ids)
                slot.conns[conn_id] = False
            data = encode(HandOver(conn_id, tuple(address)))
            if self._send(slot, data, fd=sock.fileno()):
                self.history.append((conn_id, slot.pid))
                return True
            with self._lock:  # the receiver is gone; try another
                if slot.conns.pop(conn_id, None) is None:
                    return True  # its death released the pending slot already
                slot.ready.clear()

    def _send(self, slot: _Slot, data: bytes, fd: int | None = None) -> bool:
        chan = slot.chan
        if chan is None:
            return False
        try:
            with slot.send_lock:
                # a receiver that stops reading must not block the accept thread for long
                if not select.select([], [chan], [], STOP_TIMEOUT_S)[1]:
                    return False
                if fd is None:
                    chan.send(data)
                else:
                    socket.send_fds(chan, [data], [fd])
        except (OSError, ValueError):  # ValueError: closed meanwhile (the receiver exited)
            return False
        return True

    # ---- events from the receivers -----------------------------------------------------------

    def drain(self) -> None:
        """Apply every message the receivers have sent so far (the scheduler calls this before
        it completes a series, so the audit trail has counted every instance the database
        holds; /metrics before it answers)."""
        with self._apply_lock:
            for slot in self.slots:
                chan = slot.chan
                if chan is not None:
                    self._read_available(slot, chan)

    def _read_available(self, slot: _Slot, chan: socket.socket) -> bool:
        """Read and apply what is buffered; False at end of file (the receiver is gone)."""
        while True:
            try:
                data = chan.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            try:
                self._apply(slot, data)
            except Exception:  # one bad record must not stop the supervisor
                log.exception("receiver.bad_message", slot=slot.index)

    def _apply(self, slot: _Slot, data: bytes) -> None:
        message = decode(data)
        if isinstance(message, Call):
            target: Any = self.metrics if message.target == "metrics" else self.audit
            method = None if message.method.startswith("_") else getattr(target, message.method)
            if callable(method):
                method(*message.args, **message.kwargs)
        elif isinstance(message, Log):
            fields = {"receiver": slot.index, **message.fields}
            get_logger(message.logger).log(message.level, message.event, **fields)
        elif isinstance(message, Admitted):
            with self._lock:
                release = slot.conns.get(message.conn_id) is False
                if release:
                    slot.conns[message.conn_id] = True
            if release:
                self.on_released()
        elif isinstance(message, Closed):
            with self._lock:
                was = slot.conns.pop(message.conn_id, None)
            if was is False:
                self.on_released()
        elif isinstance(message, Ready):
            slot.pid = message.pid
            slot.ready.set()

    # ---- supervision -------------------------------------------------------------------------

    def _spec(self, slot: _Slot) -> ReceiverSpec:
        cfg = self.config
        return ReceiverSpec(
            slot=slot.index,
            slots=len(self.slots),
            listener=cfg.listener,
            served_address=self._served_address,
            spool_dir=cfg.spool_dir,
            min_free_bytes=cfg.listener.min_free_disk_mb * 1024 * 1024,
            database_path=cfg.database_path,
            lock_path=self.lock_path,
            counts_path=self.counts.path,
            audit=self.audit is not None,
            log_level=cfg.log_level,
            parent_pid=os.getpid(),
        )

    def _spawn(self, slot: _Slot) -> None:
        """Start the slot's process. Called on the slot's own thread: PR_SET_PDEATHSIG fires
        when the thread that started the child ends, and this thread lives as long as the pool."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                [sys.executable, "-m", "dicom_node.receiver_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.send(pickle.dumps(self._spec(slot)))
        slot.proc, slot.chan, slot.pid = proc, ours, proc.pid
        slot.exited.clear()

    def _supervise(self, slot: _Slot) -> None:
        restarts = 0
        while not self._stopping.is_set():
            try:
                self._spawn(slot)
                slot.start_error = None
            except Exception as exc:  # logged; retried after a delay
                slot.start_error = f"cannot start: {type(exc).__name__}"
                log.exception("receiver.start_failed", slot=slot.index)
                restarts += 1
            else:
                self._pump(slot)
                self._exited(slot)
                if self._stopping.is_set():
                    break
                restarts = restarts + 1 if slot.failing(time.monotonic()) else 1
            delay = min(RESTART_DELAY_S * 2 ** max(restarts - 1, 0), RESTART_DELAY_MAX_S)
            if self._stopping.wait(delay):
                break

    def _pump(self, slot: _Slot) -> None:
        """Apply the receiver's messages until its socket pair closes (it exited)."""
        chan = cast(socket.socket, slot.chan)
        while True:
            with contextlib.suppress(InterruptedError):
                select.select([chan], [], [])
            with self._apply_lock:
                if not self._read_available(slot, chan):
                    return

    def _exited(self, slot: _Slot) -> None:
        proc = cast(subprocess.Popen[bytes], slot.proc)
        with self._lock:
            slot.ready.clear()
            chan, slot.chan = slot.chan, None
            lost = list(slot.conns.items())
            slot.conns.clear()
        if chan is not None:
            chan.close()
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.counts.set(slot.index, 0)
        for _, admitted in lost:
            if not admitted:
                self.on_released()
        slot.exited.set()
        if self._stopping.is_set():
            log.info("receiver.stopped", slot=slot.index, pid=proc.pid, exit_code=code)
            return
        slot.deaths.append(time.monotonic())
        log.error(
            "receiver.died",
            slot=slot.index,
            pid=proc.pid,
            exit_code=code,
            connections_lost=len(lost),
            reason="the peers of its associations see them fail and send again",
        )
        if slot.failing(time.monotonic()):
            log.error(
                "receiver.failing",
                slot=slot.index,
                deaths=len(slot.deaths),
                window_s=FAILING_WINDOW_S,
            )


class DispatchingServer(AdmissionServer):
    """The main process's listener: accepts, checks the address and the pending cap
    (AdmissionServer.verify_request), then hands the connection to a receiver process."""

    pool: ReceiverPool

    def process_request(self, request: Any, client_address: Any) -> None:
        sock = cast(socket.socket, request)
        handed = False
        try:
            handed = self.pool.hand_over(sock, tuple(client_address))
        finally:
            if handed:
                sock.close()  # ours only: the receiver's copy stays open
            else:
                self._release()
                self._log_refused(str(client_address[0]), "no receiver process is running")
                _close(sock)

    @property
    def serving(self) -> bool:
        return super().serving and any(slot.serving for slot in self.pool.slots)

    def drain(self) -> None:
        self.pool.drain()

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.pool.stop()


def start_receiver_listener(
    config: NodeConfig,
    n: int,
    metrics: NodeMetrics,
    audit: AuditTrail | None,
) -> DispatchingServer:
    """The listener with `n` receiver processes: bound at once, accepting only once every
    receiver serves (connections that arrive meanwhile wait in the listen backlog). The main
    process's AE only accepts (TLS and negotiation happen in the receivers)."""
    cfg = config.listener
    ae: AE = build_ae(cfg)
    server = cast(
        DispatchingServer,
        make_admission_server(
            ae,
            (cfg.bind_address, cfg.port),
            AdmissionPolicy.from_config(cfg),
            [],
            None,
            on_rejected=rejection_hook(metrics, audit),
            server_class=DispatchingServer,
        ),
    )
    server.pool = ReceiverPool(config, n, metrics, audit, on_released=server._release)
    try:
        server.pool.start(tuple(server.server_address))
    except BaseException:
        server.server_close()
        raise
    thread = threading.Thread(
        target=make_target(server.serve_forever), name="AcceptorServer", daemon=True
    )
    server.serving_thread = thread
    thread.start()
    ae._servers.append(server)  # pynetdicom's own bookkeeping, as in start_server
    return server
