"""Event-driven reactors for the listener's accepted associations (no 1 ms polling).

pynetdicom 3.0.4 runs two threads per association, and both poll. The association thread
(`Association._run_reactor`) sleeps 1 ms between looks for a complete DIMSE message; the DUL
thread (`DULServiceProvider.run_reactor`) sleeps `_run_loop_delay` (1 ms) whenever a pass found
nothing to do, for instance while the C-STORE handler runs and the response is not queued yet.
With one association an instance is strictly sequential (the sender waits for each response),
so up to 2 ms of every instance is spent asleep (docs/PERFORMANCE.md, lever 2).

Here the same loops wait for what they are waiting for:

- the association thread blocks on a `threading.Event` that is set when the DIMSE provider
  queues a complete message, when the DUL queues a primitive for the user (A-RELEASE, A-ABORT,
  A-P-ABORT), when the DUL thread ends and when the association is killed;
- the DUL thread blocks in `select()` on the peer's socket and the reading end of a socketpair,
  written (only while the DUL waits) when a primitive is queued for sending or an event is
  queued for the state machine from another thread. A TLS socket's decrypted but unread bytes
  (`SSLSocket.pending()`, invisible to select) end the wait at once, as pynetdicom's
  `AssociationSocket.ready` does.

Both waits are bounded (`WAIT_BOUND_S`), so everything the original loops check on every pass
still gets checked: the ARTIM timer (Evt18), the network idle timer (`network_timeout`), a
killed or dead DUL, the `_reactor_checkpoint` pause. Every pass does exactly what a pass of the
original does, in the same order; only the sleeps are replaced by waits.

The DUL also reads the socket with `recv_into` in large pieces (several PDUs a call) instead of
pynetdicom's 4 KB `recv` calls appended to a growing bytearray, and hands the DIMSE layer a
P-DATA-TF's values as views of that buffer instead of copies (docs/PERFORMANCE.md, lever 4).
When pynetdicom's logger drops INFO and DEBUG, its logging handlers (which format lines per
PDU and copy each received dataset) are unbound from the association. A C-STORE response that
carries only a status is encoded by dicom_node/dimse_response.py instead of pydicom (lever 4).

Only associations the listener accepts are adapted (`EventDrivenRequestHandler`, used by
dicom_node.admission.AdmissionServer); the exporter's SCU associations keep pynetdicom's loops.
The adaptation switches the class of the new Association and of its DUL to the subclasses
below (they add no state pynetdicom would have to know about) and, before their threads
start, replaces four of their queues by queues that signal a put (with what they held).

pynetdicom 3.0.4 internals relied on (checked at start-up by `check_pynetdicom_internals`,
which names what is missing; the version is pinned `>=3.0.4,<3.1` in pyproject.toml):

- `transport.RequestHandler._create_association` creates the acceptor Association before
  EVT_CONN_OPEN (where dimse_guard replaces `assoc.dimse`) and `assoc.start()`;
- `Association`: `run_reactor` (starts the DUL, negotiates, then calls `_run_reactor` while
  established), `_run_reactor`, `_kill`, `_is_paused`, `_reactor_checkpoint`, `kill`,
  `network_timeout_response`, `dimse.get_msg`, `dimse.msg_queue`, `dimse.send_msg`
  (replaced on the instance), `dimse.maximum_pdu_size`, `dimse.dul`, `_serve_request`,
  `acse.is_release_requested`, `acse.is_aborted`, `acse.send_release`, `_dul_ready`;
- `DULServiceProvider`: `run_reactor`, `_kill_thread`, `kill_dul`, `stop_dul`,
  `artim_timer`, `_idle_timer`, `state_machine` (`current_state`, `do_action`),
  `_process_recv_primitive`, `_is_transport_event`, `_read_pdu_data`, `_decode_pdu`,
  `_recv_pdu`, `event_queue`, `to_provider_queue`, `to_user_queue`, `socket`;
- `AssociationSocket.socket` (the connected socket object); `pdu.A_ABORT_RQ`, `pdu.P_DATA_TF`
  (`presentation_data_value_items`), `pdu_items.PresentationDataValueItem`
  (`presentation_context_id`, `presentation_data_value`);
- the logging handlers in `pynetdicom._handlers` (`standard_pdu_recv_handler`, ...), unbound
  when pynetdicom's logger would drop what they log;
- both threads run the target given to `threading.Thread.__init__` (`utils.make_target` of
  the bound reactor), which the adaptation replaces through CPython's `Thread._target`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

from dicom_node.dimse_response import COMMAND_LAST_FRAGMENT, encode_store_response
from dicom_node.logs import get_logger

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity

log = get_logger("dicom_node.reactor")

#: Longest a reactor waits without looking at its timers and flags. The ARTIM and network idle
#: timers fire at most this late; nothing on the receive path waits for it.
WAIT_BOUND_S = 0.05
#: Size of a read-ahead buffer (16 P-DATA-TF PDUs of 16 KB), and the most it grows per read.
_READ_CHUNK = 256 * 1024
#: Start a new read-ahead buffer when less room than this is left at the end of the current one.
_MIN_ROOM = 16 * 1024 + 6
_PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ .. A-ABORT (PS3.8 9.3.1)
_PDU_HEADER = struct.Struct(">BBL")

T = TypeVar("T")


class SignallingQueue(queue.Queue[T]):
    """A FIFO queue that calls `on_put` after every put (from the putting thread)."""

    def __init__(self, on_put: Callable[[], object]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


def _signalling(old: queue.Queue[T], on_put: Callable[[], object]) -> SignallingQueue[T]:
    """A SignallingQueue holding what `old` holds (the socket queues Evt5 on creation); only
    while no thread uses `old`."""
    new: SignallingQueue[T] = SignallingQueue(on_put)
    while True:
        try:
            item = old.get_nowait()
        except queue.Empty:
            return new
        queue.Queue.put(new, item)


def _retarget(thread: threading.Thread, run: Callable[[], None]) -> None:
    """Point a not yet started thread at `run`. pynetdicom gives its threads their reactor as
    the Thread target, bound when the object was made, so switching the class alone would
    leave the original loop running."""
    thread._target = make_target(run)  # type: ignore[attr-defined]


class _Wakeup:
    """A socketpair the DUL thread can select() on; `notify` makes it readable."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def notify(self) -> None:
        # full (the reader is behind) or closed (the DUL has ended): nothing to wake
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider whose reactor waits in select() instead of sleeping."""

    _wakeup: _Wakeup
    _waiting: bool
    _inbox: _Inbox

    def _adapt(self) -> None:
        """Install the wake-up (before the thread starts, while the queues are empty)."""
        self._wakeup = _Wakeup()
        self._waiting = False
        self._inbox = _Inbox()
        _retarget(self, self.run_reactor)
        self.to_provider_queue = _signalling(self.to_provider_queue, self._poke)
        self.event_queue = _signalling(self.event_queue, self._poke)

    def _poke(self) -> None:
        # Only a waiting DUL needs the byte. Both sides run under the GIL: the DUL sets
        # `_waiting` before it looks at its queues, so a put it did not see finds the flag set.
        if self._waiting:
            self._wakeup.notify()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wakeup.notify()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wakeup.notify()
        if threading.current_thread() is not self:  # from its own thread: it ends on return
            while self.is_alive():
                self.join(WAIT_BOUND_S)
        return True

    def run_reactor(self) -> None:
        try:
            self._event_driven_reactor()
        finally:
            self._wakeup.close()
            self.assoc._wake_reactor()  # type: ignore[attr-defined]

    def _event_driven_reactor(self) -> None:
        """One pass as pynetdicom's: ARTIM, then one primitive to send or one PDU to read,
        then one state machine event; a pass that found no event waits before the next."""
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()  # the association thread may go on
                idle = True
            if idle:
                self._wait_for_work()
            if self._kill_thread:
                return
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("association.dul_error")
                self._abort_hard()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def _abort_hard(self) -> None:
        """An exception in the reactor leaves the state machine unusable: send an A-ABORT
        (source: service provider) past it and stop both threads, as pynetdicom does."""
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _wait_for_work(self) -> None:
        """Until the peer's socket is readable, something is queued, or WAIT_BOUND_S passed."""
        self._waiting = True
        try:
            if (
                self._kill_thread
                or self.to_provider_queue.qsize()
                or self.event_queue.qsize()
                or self._inbox.available()
            ):
                return
            readers: list[Any] = [self._wakeup.reader]
            peer = self.socket.socket if self.socket is not None else None
            if peer is not None:
                if isinstance(peer, ssl.SSLSocket) and peer.pending():
                    return  # decrypted bytes select() cannot see
                readers.append(peer)
            try:
                ready, _, _ = select.select(readers, [], [], WAIT_BOUND_S)
            except (OSError, ValueError):  # the socket was closed under us: wait on the rest
                ready, _, _ = select.select([self._wakeup.reader], [], [], WAIT_BOUND_S)
            if self._wakeup.reader in ready:
                self._wakeup.drain()
        finally:
            self._waiting = False

    def _is_transport_event(self) -> bool:
        """pynetdicom's check, with the bytes already read ahead counting as incoming data:
        read a PDU if any is there; in Sta13 close the connection once nothing more comes."""
        sock = self.socket
        if sock is None or sock.socket is None:
            self._inbox.discard()  # closed: what was read ahead will never be decoded
        incoming = self._inbox.available() > 0 or (sock is not None and sock.ready)
        if incoming:
            self._read_pdu_data()
            return True
        if self.state_machine.current_state == "Sta13":
            cast(AssociationSocket, sock).close()
            return True
        return False

    def _read_pdu_data(self) -> None:
        """Read one PDU and decode it, with pynetdicom's events (Evt17: closed or short,
        Evt19: unknown type or undecodable; else the PDU's event, the PDU queued).

        The socket is read in large pieces into a read-ahead buffer (`_Inbox`); a P-DATA-TF's
        presentation data values are views of that buffer, not copies (the DIMSE layer copies
        them into the message as it assembles it)."""
        inbox = self._inbox
        raw = cast(AssociationSocket, self.socket).socket
        try:
            complete = inbox.fill(raw, 6)
            if complete:
                pdu_type, _, length = _PDU_HEADER.unpack(inbox.peek(6))
                if pdu_type not in _PDU_TYPES:
                    log.warning("association.unknown_pdu", pdu_type=f"0x{pdu_type:02X}")
                    self.event_queue.put("Evt19")
                    return
                complete = inbox.fill(raw, 6 + length)
        except OSError as exc:  # TimeoutError and ssl.SSLError included
            log.info("association.pdu_read_failed", error=type(exc).__name__)
            self.event_queue.put("Evt17")
            return
        if not complete:
            if inbox.available():
                log.warning("association.pdu_truncated", received=inbox.available())
            self.event_queue.put("Evt17")
            return
        pdu = inbox.take(6 + length)
        try:
            if pdu_type == _P_DATA_TF and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
                decoded: Any = _p_data_tf(pdu)
                if self.state_machine.current_state == "Sta6":
                    self._merge_buffered_p_data(decoded)
                evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": decoded})
                event = "Evt10"
            else:  # pynetdicom's decode, which hands EVT_DATA_RECV the PDU's bytes
                decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception as exc:  # noqa: BLE001 - any decode failure is an invalid PDU
            log.warning("association.pdu_undecodable", error=type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _merge_buffered_p_data(self, decoded: P_DATA_TF) -> None:
        """Append to `decoded` the values of the P-DATA-TF PDUs that follow it complete in the
        read-ahead buffer, up to the end of the message fragment stream (a value marked last:
        pynetdicom's DIMSE layer stops reading a P-DATA at the end of a message).

        One state machine event (Evt10 in Sta6: DT-2, back to Sta6) and one pass through the
        DIMSE layer then carry several PDUs, as if the peer had sent one larger PDU. Not done
        while anyone listens to EVT_PDU_RECV (they would see fewer, larger PDUs). A PDU that
        does not decode is left in the buffer, to be refused on its own (Evt19)."""
        if self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return
        items = decoded.presentation_data_value_items
        inbox = self._inbox
        while items and not _ends_a_message(items[-1]) and inbox.available() >= 6:
            pdu_type, _, length = _PDU_HEADER.unpack(inbox.peek(6))
            if pdu_type != _P_DATA_TF or inbox.available() < 6 + length:
                return
            try:
                following = _p_data_tf(inbox.peek(6 + length))
            except ValueError:
                return
            inbox.take(6 + length)
            items.extend(following.presentation_data_value_items)


_P_DATA_TF = 0x04


def _ends_a_message(item: PresentationDataValueItem) -> bool:
    """Whether a value is the last fragment of a command or data set (PS3.8 E.2)."""
    return bool(cast(memoryview, item.presentation_data_value)[0] & 0x02)


_PDV_LENGTH = struct.Struct(">L")


def _p_data_tf(pdu: memoryview) -> P_DATA_TF:
    """A P-DATA-TF PDU (PS3.8 9.3.5) whose values are views of `pdu`; raises ValueError for an
    item that runs past the PDU or has no message control header."""
    decoded = P_DATA_TF()
    items = decoded.presentation_data_value_items
    pos, end = 6, len(pdu)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated presentation data value item")
        (item_length,) = _PDV_LENGTH.unpack_from(pdu, pos)
        if item_length < 2 or pos + 4 + item_length > end:
            raise ValueError("presentation data value item length out of range")
        item = PresentationDataValueItem()
        item.presentation_context_id = pdu[pos + 4]
        item.presentation_data_value = pdu[pos + 5 : pos + 4 + item_length]  # type: ignore[assignment]
        items.append(item)
        pos += 4 + item_length
    return decoded


class _Inbox:
    """Bytes read from the socket and not yet decoded.

    Reads ask for as much as the buffer has room for, so one recv brings in every PDU the peer
    has sent so far. A buffer is never rewritten where it was handed out (`take` returns views
    of it): when the room at its end runs short, a new one is started with the unread rest.
    A PDU's declared length never sizes an allocation beyond what has arrived: a buffer grows
    by at most _READ_CHUNK per read.
    """

    def __init__(self) -> None:
        self._buf = bytearray(_READ_CHUNK)
        self._start = self._end = 0

    def available(self) -> int:
        return self._end - self._start

    def discard(self) -> None:
        self._start = self._end = 0

    def peek(self, n: int) -> memoryview:
        return memoryview(self._buf)[self._start : self._start + n]

    def take(self, n: int) -> memoryview:
        view = memoryview(self._buf)[self._start : self._start + n]
        self._start += n
        return view

    def fill(self, raw: Any, need: int) -> bool:
        """Read until `need` bytes are available; False if the peer closed first."""
        while self._end - self._start < need:
            room = len(self._buf) - self._end
            if room < min(need - (self._end - self._start), _MIN_ROOM):
                size = min(max(need, _READ_CHUNK), self._end - self._start + _READ_CHUNK)
                fresh = bytearray(size)
                fresh[: self._end - self._start] = memoryview(self._buf)[self._start : self._end]
                self._buf, self._start, self._end = fresh, 0, self._end - self._start
            n = raw.recv_into(memoryview(self._buf)[self._end :])
            if n == 0:
                return False
            self._end += n
        return True


class EventDrivenAssociation(Association):
    """pynetdicom's acceptor Association whose reactor waits on an event instead of sleeping."""

    _reactor_wake: threading.Event

    def _adapt(self) -> None:
        self._reactor_wake = threading.Event()
        _retarget(self, self.run_reactor)
        self.dul.__class__ = EventDrivenDUL
        dul = cast(EventDrivenDUL, self.dul)
        dul._adapt()
        dul.to_user_queue = _signalling(dul.to_user_queue, self._reactor_wake.set)

    def _wake_reactor(self) -> None:
        self._reactor_wake.set()

    def run_reactor(self) -> None:
        # EVT_CONN_OPEN handlers (dimse_guard) have replaced the DIMSE provider by now, and the
        # DUL, which fills its queue, has not started.
        self.dimse.msg_queue = _signalling(self.dimse.msg_queue, self._reactor_wake.set)
        self._encode_store_responses_directly()
        super().run_reactor()

    def _encode_store_responses_directly(self) -> None:
        """C-STORE responses that carry only a status go out encoded by dimse_response
        (pynetdicom's bytes without its two pydicom encodes); anything else, or any response
        while an EVT_DIMSE_SENT handler wants pynetdicom's message object, takes pynetdicom's
        `send_msg`. Set on the provider instance, whatever its class (dimse_guard's)."""
        provider = self.dimse
        provider.send_msg = functools.partial(  # type: ignore[method-assign]
            self._send_msg, provider.send_msg
        )

    def _send_msg(
        self, pynetdicom_send: Callable[[Any, int], None], primitive: Any, context_id: int
    ) -> None:
        encoded = encode_store_response(primitive) if type(primitive) is C_STORE else None
        max_pdu = self.dimse.maximum_pdu_size
        if (
            encoded is None
            or self.get_handlers(evt.EVT_DIMSE_SENT)
            or (max_pdu and len(encoded) > max_pdu - 6)
        ):
            pynetdicom_send(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, COMMAND_LAST_FRAGMENT + encoded))
        self.dul.send_pdu(pdata)

    def kill(self) -> None:
        self._reactor_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """One pass as pynetdicom's: the checkpoint pause, one DIMSE message, then release,
        abort, a dead DUL and the network timeout; a pass that served nothing waits first."""
        self._is_paused = False
        served = False
        while not self._kill:
            self._is_paused = True  # waiting touches no queue: a release() may go ahead
            if not served:
                self._reactor_wake.wait(WAIT_BOUND_S)
            self._reactor_wake.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg is not None:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association.released_by_peer")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV handlers hear the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("association.network_timeout")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


#: pynetdicom's logging handlers, bound to every association (`_config.LOG_HANDLER_LEVEL`
#: "standard"): they format log lines per PDU and per DIMSE message (the C-STORE one copies
#: the whole received dataset to see whether it is empty) at DEBUG and INFO.
_LOGGING_HANDLERS = (
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
)


def adapt(assoc: Association) -> None:
    """Make a new acceptor Association (not started) event-driven. When pynetdicom's logger
    drops INFO and DEBUG (the node's default, dicom_node/logs.py), its logging handlers, whose
    lines would be dropped, are unbound from the association."""
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._adapt()
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in _LOGGING_HANDLERS:
            assoc.unbind(event, handler)


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler whose Associations are event-driven."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        adapt(assoc)
        return assoc


class PynetdicomInternalsError(RuntimeError):
    """The installed pynetdicom lacks an internal the event-driven reactors rely on."""


_ASSOCIATION_METHODS = (
    "run_reactor",
    "_run_reactor",
    "kill",
    "_serve_request",
    "release",
    "abort",
)
_ASSOCIATION_ATTRIBUTES = (
    "_kill",
    "_is_paused",
    "_reactor_checkpoint",
    "_dul_ready",
    "network_timeout_response",
    "dimse",
    "acse",
    "dul",
)
_DUL_METHODS = (
    "run_reactor",
    "kill_dul",
    "stop_dul",
    "_process_recv_primitive",
    "_is_transport_event",
    "_read_pdu_data",
    "_decode_pdu",
    "idle_timer_expired",
    "receive_pdu",
)
_DUL_ATTRIBUTES = (
    "_kill_thread",
    "artim_timer",
    "_idle_timer",
    "state_machine",
    "_recv_pdu",
    "event_queue",
    "to_provider_queue",
    "to_user_queue",
    "socket",
)


def check_pynetdicom_internals(ae: ApplicationEntity) -> None:
    """Raise PynetdicomInternalsError naming every internal that is missing (start-up check).

    Builds one acceptor Association (never started) to look at its instance attributes.
    """
    missing: list[str] = []
    if not callable(getattr(RequestHandler, "_create_association", None)):
        missing.append("transport.RequestHandler._create_association")
    assoc = Association(ae, "acceptor")
    for name in _ASSOCIATION_METHODS:
        if not callable(getattr(Association, name, None)):
            missing.append(f"Association.{name}()")
    missing += [f"Association.{n}" for n in _ASSOCIATION_ATTRIBUTES if not hasattr(assoc, n)]
    dul = getattr(assoc, "dul", None)
    for name in _DUL_METHODS:
        if not callable(getattr(DULServiceProvider, name, None)):
            missing.append(f"DULServiceProvider.{name}()")
    missing += [f"DULServiceProvider.{n}" for n in _DUL_ATTRIBUTES if not hasattr(dul, n)]
    dimse = getattr(assoc, "dimse", None)
    if not isinstance(getattr(dimse, "msg_queue", None), queue.Queue):
        missing.append("DIMSEServiceProvider.msg_queue")
    acse = getattr(assoc, "acse", None)
    for name in ("is_release_requested", "is_aborted", "send_release"):
        if not callable(getattr(acse, name, None)):
            missing.append(f"ACSE.{name}()")
    if not callable(getattr(assoc, "_target", None)) or not callable(getattr(dul, "_target", None)):
        missing.append("threading.Thread._target of the association and DUL threads")
    if missing:
        raise PynetdicomInternalsError(
            f"pynetdicom {pynetdicom.__version__} lacks internals the listener's event-driven "
            f"reactors need (dicom_node/reactor.py, written for 3.0.4): {', '.join(missing)}"
        )
