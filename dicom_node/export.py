"""Export: C-STORE SCU to the configured destinations, with retries that survive restarts.

One exporter thread per destination. It takes the due exports from the database (oldest job
first), splits them between up to the destination's `associations` (lanes, each with its kept
association: association reuse) and sends each file. Each instance the destination confirms is
recorded as it is confirmed, in small groups per lane (`ConfirmationGroup`: at most 16
instances, written at the latest 0.25 s after the first of them when the next outcome is
known), so a node stopped mid-export resends only the instances whose confirmation was not yet
recorded: at most 16 per lane, the one in flight included. An instance that fails
(association refused, peer down, failure status, no answer within the destination's
`dimse_timeout_s`) gets its attempt counted and a next attempt time with exponential backoff;
after the destination's max_attempts it becomes a dead letter, visible in `ltdiff-node status`
and retried with `ltdiff-node retry JOB`. An association that broke (no answer, abort) is never
used again: the instances not yet tried go out at once on a fresh association, with no attempt
counted. Only unsent instances are ever resent.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from dicom_node import part10
from dicom_node.config import DestinationConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.scp import set_tcp_nodelay
from dicom_node.store import ExportRow, ExportTotals, JobStore
from dicom_node.store_request import encode_store_request, frame_message, send_within
from dicom_node.tls import make_ssl_context

log = get_logger("dicom_node.export")

#: Statuses that mean the peer stored the instance (PS3.4 B.2.3: success and warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
MAX_CONTEXTS = 128
#: Confirmed instances are recorded in groups of at most this many (one SQLite commit, one
#: fsync, per group): the most a node killed mid-export sends twice.
CONFIRM_GROUP_MAX = 16
#: ... and a group is recorded once its first confirmation is this old (checked as each
#: instance's outcome is known, so before the next instance is sent).
CONFIRM_GROUP_AGE_S = 0.25
_MAX_MESSAGE_ID = 0xFFFF

#: A batch is split between associations only where each gets at least this many instances.
LANE_MIN_INSTANCES = 8
#: After a destination refused an extra association, the exporter uses fewer for this long.
LANES_REDUCED_S = 600.0

#: Called with each instance's outcome as soon as it is known: None when the destination
#: confirmed it, else why it failed.
ResultCallback = Callable[[ExportRow, str | None], None]


def backoff_seconds(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped at max_s."""
    return float(min(max_s, initial_s * (2 ** max(0, attempts - 1))))


class ConfirmationGroup:
    """Export ids confirmed by the destination and not yet recorded; says when to record them.

    Pure bookkeeping, no I/O. `add` and `due` return the ids to record now (possibly none):
    all of them once `max_count` are held, or once the oldest was added `max_age_s` ago. The
    caller records whatever `take` returns when it is done sending. Between calls at most
    `max_count - 1` ids are held.
    """

    def __init__(
        self, max_count: int = CONFIRM_GROUP_MAX, max_age_s: float = CONFIRM_GROUP_AGE_S
    ) -> None:
        if max_count < 1 or max_age_s < 0:
            raise ValueError(f"max_count {max_count} must be >= 1 and max_age_s {max_age_s} >= 0")
        self.max_count = max_count
        self.max_age_s = max_age_s
        self._ids: list[int] = []
        self._since: float | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, export_id: int, now: float) -> list[int]:
        if self._since is None:
            self._since = now
        self._ids.append(export_id)
        return self.due(now)

    def due(self, now: float) -> list[int]:
        if self._since is None:
            return []
        if len(self._ids) >= self.max_count or now - self._since >= self.max_age_s:
            return self.take()
        return []

    def take(self) -> list[int]:
        ids, self._ids, self._since = self._ids, [], None
        return ids


@dataclass(frozen=True)
class SendResult:
    sent: list[int]
    failed: list[tuple[ExportRow, str]]
    #: Rows never offered to the peer: the association broke before their turn, or the
    #: caller asked to stop. Not a failed attempt.
    not_attempted: list[ExportRow] = field(default_factory=list)
    #: Why no association could be opened, when the caller asked that this not count as an
    #: attempt (`send_files(..., refusal_counts=False)`); the rows are then all not_attempted.
    refused: str | None = None


def _is_request(msg: object) -> bool:
    return msg is not None and bool(getattr(msg, "is_valid_request", False))


class _AnswersForTheWaiter(queue.Queue[tuple[Any, Any]]):
    """The DIMSE message queue of an association we requested, safe from pynetdicom's pause race.

    In pynetdicom 3.0 two threads take from this queue: a `send_*` call (here `send_c_store`)
    blocks on it for the peer's answer, and the association's reactor polls it without blocking,
    for requests from the peer. `send_c_store` pauses the reactor first, but the pause is a
    handshake on two flags: the reactor sets `_is_paused`, passes `_reactor_checkpoint.wait()`
    while the checkpoint is still open, and only then clears `_is_paused`. If it loses the CPU
    (GIL) in between, `send_c_store` sees it "paused", closes the checkpoint and sends; when the
    reactor resumes, it polls the queue, takes the C-STORE response, logs "Received unexpected
    C-STORE service message" and drops it. `send_c_store` then waits out the whole DIMSE timeout
    for an answer that already came, and the instance the peer stored is sent again later.

    Here a non-blocking get (the reactor's poll) only ever gets a request. Responses, and the
    (None, None) pynetdicom queues when the peer aborts or the connection closes, stay for the
    blocking get of the call waiting for them.
    """

    def get(self, block: bool = True, timeout: float | None = None) -> tuple[Any, Any]:
        if block:
            return super().get(block, timeout)
        with self.not_empty:
            if not self._qsize() or not _is_request(self.queue[0][1]):
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


def _guard_answers(assoc: Association) -> None:
    """Give an established association the guarded queue (see `_AnswersForTheWaiter`).

    Done before anything is sent, so no answer can be waiting yet; an abort marker that is
    already queued moves over with its place kept."""
    guarded = _AnswersForTheWaiter()
    old, assoc.dimse.msg_queue = assoc.dimse.msg_queue, guarded
    while True:
        try:
            guarded.put(old.get_nowait())
        except queue.Empty:
            return


def _new_ae(dest: DestinationConfig, calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = dest.connect_timeout_s
    ae.acse_timeout = dest.acse_timeout_s
    ae.network_timeout = dest.network_timeout_s
    ae.dimse_timeout = dest.dimse_timeout_s
    return ae


@dataclass(frozen=True)
class OnTheWire:
    """How a file goes out: its transfer syntax and where its data set starts."""

    transfer_syntax: str
    offset: int


def on_the_wire(row: ExportRow) -> OnTheWire:
    """The transfer syntax recorded when the file was written (read from the file only for rows
    that have none) and the data set's offset, from the file's first 144 bytes."""
    with row.path.open("rb") as handle:
        offset = part10.dataset_offset(handle.read(part10.FILE_HEAD_BYTES))
    if offset is not None and row.transfer_syntax:
        return OnTheWire(row.transfer_syntax, offset)
    meta, offset = split_dataset(row.path)
    return OnTheWire(str(row.transfer_syntax or meta.TransferSyntaxUID), offset)


#: PS3.7 C.4.1.1: 0x0002 is LOW priority (pynetdicom's default for send_c_store).
_PRIORITY_LOW = 0x0002


class Link:
    """An established association to one destination and the presentation contexts it was
    opened with (SOP class -> transfer syntaxes offered)."""

    def __init__(self, assoc: Association, offered: dict[str, list[str]]) -> None:
        self.assoc = assoc
        self.offered = offered
        #: (SOP class, transfer syntax) -> the ID of an accepted context that carries exactly it
        self.exact: dict[tuple[str, str], int] = {}
        for cx in assoc.accepted_contexts:
            key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            self.exact.setdefault(key, int(cx.context_id or 0))
        self.next_message_id = 1
        #: The connection, when requests can be written to it directly (`store_request`).
        self.plain_socket = _plain_socket(assoc)
        #: The peer's Maximum Length Received for P-DATA-TF PDUs (0: no limit).
        self.max_pdu_length = int(assoc.acceptor.maximum_length or 0)

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def covers(self, needs: dict[str, list[str]]) -> bool:
        """Whether it was opened for every (SOP class, transfer syntax) in `needs`."""
        return all(
            ts in self.offered.get(sop_class, ()) for sop_class, tss in needs.items() for ts in tss
        )

    def message_id(self) -> int:
        """A distinct Message ID per request, so the two ends can tell answers apart."""
        mid = self.next_message_id
        self.next_message_id = mid % _MAX_MESSAGE_ID + 1
        return mid

    def close(self, *, abort: bool = False) -> None:
        if self.assoc.is_established:
            if abort:
                self.assoc.abort()
            else:
                self.assoc.release()


def _plain_socket(assoc: Association) -> socket.socket | None:
    """The association's TCP socket when it is plain TCP; None over TLS (an SSL socket cannot be
    written by one thread while the DUL thread reads it) or if pynetdicom's layout (3.0:
    `assoc.dul.socket.socket`) is not there: those keep pynetdicom's send path."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    return sock


def open_link(dest: DestinationConfig, calling_ae: str, needs: dict[str, list[str]]) -> Link | str:
    """An association with one presentation context per SOP class (at most 128) proposing the
    files' own transfer syntaxes first, then the little endian syntaxes pynetdicom can convert
    to (docs/CONFORMANCE.md, table 4.2-10). Returns why not, on failure."""
    ae = _new_ae(dest, calling_ae)
    offered: dict[str, list[str]] = {}
    for sop_class, tss in list(needs.items())[:MAX_CONTEXTS]:
        proposed = list(tss)
        for fallback in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if fallback not in proposed:
                proposed.append(fallback)
        ae.add_requested_context(sop_class, proposed)
        offered[sop_class] = list(tss)
    tls = (make_ssl_context(dest.tls, server_side=False), dest.host) if dest.tls.enabled else None
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=tls,
        )
    except (OSError, RuntimeError) as exc:
        return f"association failed: {exc}"
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "association aborted or no answer"
    _guard_answers(assoc)
    return Link(assoc, offered)


class HeldAssociation:
    """The exporter's association to its destination, kept open between batches (association
    reuse across jobs) until it has been idle `close_delay_s`, then released. 0 closes it after
    every batch. One that the peer closed meanwhile is noticed before it is used again."""

    def __init__(self, close_delay_s: float, destination: str = "") -> None:
        self.close_delay_s = close_delay_s
        self.destination = destination
        self.link: Link | None = None
        self.idle_since = 0.0

    def take(self, needs: dict[str, list[str]]) -> Link | None:
        """The held association when it is alive and was opened for `needs`; else None (a held
        one that does not fit is released)."""
        link, self.link = self.link, None
        if link is None:
            return None
        if link.alive and link.covers(needs):
            return link
        if link.alive:
            link.close()
        else:
            log.info(
                "export.association_closed_by_peer",
                destination=self.destination,
                idle_s=self._idle_s(),
            )
        return None

    def keep(self, link: Link) -> None:
        if self.close_delay_s <= 0 or not link.alive:
            link.close()
            return
        self.link, self.idle_since = link, time.monotonic()

    def _idle_s(self) -> float:
        return round(time.monotonic() - self.idle_since, 3)

    def seconds_left(self) -> float | None:
        """Until the held association is due to close; None when none is held."""
        if self.link is None:
            return None
        return max(0.0, self.idle_since + self.close_delay_s - time.monotonic())

    def close_if_idle(self) -> None:
        left = self.seconds_left()
        if left is not None and left <= 0:
            self.close()

    def close(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()


def _c_store(
    link: Link, context_id: int, row: ExportRow, offset: int, send_timeout_s: float
) -> int | None:
    """Send the file's data set as it is encoded (no decode, no re-encode) under an accepted
    context of exactly its transfer syntax; the answer's status, None when none came (DIMSE
    timeout: aborted; abort or closed connection).

    Over plain TCP the request is written to the socket directly (`dicom_node.store_request`:
    the same PDUs, without pynetdicom's hand-off per fragment); a peer that takes no data for
    `send_timeout_s` raises SendTimeoutError (an OSError: the association must be aborted).
    pynetdicom's send_c_store would pause the association's reactor around the exchange; with
    the guarded queue (`_AnswersForTheWaiter`) the reactor cannot take the answer, so the pause,
    and the wait for the reactor to reach it, are not needed."""
    assoc = link.assoc
    message_id = link.message_id()
    if link.plain_socket is not None:
        data = row.path.read_bytes()
        command = encode_store_request(message_id, row.sop_class_uid, row.sop_uid, _PRIORITY_LOW)
        pieces = frame_message(context_id, command, memoryview(data)[offset:], link.max_pdu_length)
        send_within(link.plain_socket, pieces, send_timeout_s)
    else:
        req = C_STORE()
        req.MessageID = message_id
        req.AffectedSOPClassUID = row.sop_class_uid
        req.AffectedSOPInstanceUID = row.sop_uid
        req.Priority = _PRIORITY_LOW
        req._dataset_path = (row.path, offset)  # pynetdicom 3.0: send these bytes
        assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()  # aborts after a DIMSE timeout
        return None
    status = assoc._check_received_status(rsp)  # aborts on an invalid answer
    code = getattr(status, "Status", None)
    return None if code is None else int(code)


def send_files(
    dest: DestinationConfig,
    calling_ae: str,
    rows: Sequence[ExportRow],
    *,
    on_result: ResultCallback | None = None,
    keep_going: Callable[[], bool] | None = None,
    held: HeldAssociation | None = None,
    refusal_counts: bool = True,
) -> SendResult:
    """Send the rows' files over one association; never raises for network trouble.

    Each file goes out as it is on disk (its data set's bytes, no decode or re-encode) wherever
    the peer accepted its transfer syntax, else decoded and converted by pynetdicom.
    `on_result(row, error)` hears each instance's outcome as soon as it is known, before the
    next instance is sent. Sending stops early, leaving the rest `not_attempted`, when
    `keep_going()` turns false or the association breaks: no answer within the destination's
    `dimse_timeout_s` (the association is then aborted), a peer abort or a closed connection.
    A broken association is never used again.

    `held`: an association kept from an earlier call is used again when it is alive and fits
    the rows, and the association is handed back to it afterwards instead of released. If the
    peer closed a reused association before answering its first instance here, that instance
    is not counted as an attempt: everything goes out at once on a fresh association.
    `refusal_counts=False`: an association that cannot be opened fails no row; they all come
    back not_attempted, with `refused` saying why (an exporter's extra association).
    """
    sent: list[int] = []
    failed: list[tuple[ExportRow, str]] = []

    def outcome(row: ExportRow, error: str | None) -> None:
        if error is None:
            sent.append(row.id)
        else:
            failed.append((row, error))
        if on_result is not None:
            on_result(row, error)

    needs: dict[str, list[str]] = {}
    sendable: list[tuple[ExportRow, OnTheWire]] = []
    for r in rows:
        try:
            wire = on_the_wire(r)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            outcome(r, f"cannot read outbox file: {safe_error_text(exc)}")
            continue
        tss = needs.setdefault(r.sop_class_uid, [])
        if wire.transfer_syntax not in tss:
            tss.append(wire.transfer_syntax)
        sendable.append((r, wire))
    if not sendable:
        return SendResult(sent, failed)
    link = held.take(needs) if held is not None else None
    reused = link is not None
    while True:
        if link is None:
            opened = open_link(dest, calling_ae, needs)
            if isinstance(opened, str) and not refusal_counts:
                return SendResult(sent, failed, [r for r, _ in sendable], refused=opened)
            if isinstance(opened, str):
                for r, _ in sendable:
                    outcome(r, opened)
                return SendResult(sent, failed)
            link = opened
        rest, broken, stale = _send_over(link, dest, sendable, outcome, keep_going, reused=reused)
        if stale:  # the peer had closed the association we kept: again on a fresh one
            log.info("export.association_reopened", destination=dest.name)
            link.close(abort=True)
            link, reused = None, False
            continue
        break
    if broken:
        link.close(abort=True)  # pynetdicom aborts on a DIMSE timeout; make sure of it
    elif held is not None:
        held.keep(link)
    else:
        link.close()
    return SendResult(sent, failed, [r for r, _ in rest])


def _send_over(
    link: Link,
    dest: DestinationConfig,
    items: Sequence[tuple[ExportRow, OnTheWire]],
    outcome: ResultCallback,
    keep_going: Callable[[], bool] | None,
    *,
    reused: bool,
) -> tuple[list[tuple[ExportRow, OnTheWire]], bool, bool]:
    """Send `items` in order over `link`: (the items not tried, whether the association broke,
    whether it was a reused association found closed before its first answer here)."""
    assoc = link.assoc
    for i, (r, wire) in enumerate(items):
        if keep_going is not None and not keep_going():
            return list(items[i:]), False, False
        if not assoc.is_established:
            if i == 0 and reused:
                return list(items), True, True
            if i == 0:  # nothing went out on this association: count it against them all
                for x, _ in items:
                    outcome(x, "association lost before the first instance")
                return [], True, False
            _log_broken(dest, "association lost between instances", 0.0, len(items) - i)
            return list(items[i:]), True, False
        t0 = time.monotonic()
        context_id = link.exact.get((r.sop_class_uid, wire.transfer_syntax))
        try:
            if context_id is not None:
                code = _c_store(link, context_id, r, wire.offset, dest.dimse_timeout_s)
            else:  # no context for its own syntax: pynetdicom decodes and converts it
                status = assoc.send_c_store(dcmread(r.path), msg_id=link.message_id())
                raw = getattr(status, "Status", None)
                code = None if raw is None else int(raw)
        except (ValueError, AttributeError, InvalidDicomError) as exc:
            outcome(r, f"send failed: {safe_error_text(exc)}")
            continue
        except (OSError, RuntimeError) as exc:  # the request may be half sent: end it here
            if i == 0 and reused:
                return list(items), True, True
            outcome(r, f"send failed: {safe_error_text(exc)}")
            return list(items[i + 1 :]), True, False
        if code in _STORED:
            outcome(r, None)
        elif code is not None:
            outcome(r, f"peer answered status 0x{code:04X}")
        else:
            waited = time.monotonic() - t0
            timed_out = waited >= dest.dimse_timeout_s * 0.98
            if i == 0 and reused and not timed_out:
                return list(items), True, True
            why = (
                f"no answer within dimse_timeout_s = {dest.dimse_timeout_s:g} s; "
                "association aborted"
                if timed_out
                else "association aborted or connection closed while waiting for the answer"
            )
            outcome(r, why)
            rest = list(items[i + 1 :])
            _log_broken(dest, why, waited, len(rest))
            return rest, True, False
    return [], False, False


def _log_broken(dest: DestinationConfig, why: str, waited_s: float, not_attempted: int) -> None:
    log.warning(
        "export.association_lost",
        destination=dest.name,
        error=why,
        waited_s=round(waited_s, 3),
        not_attempted=not_attempted,
    )


def send_paths(dest: DestinationConfig, calling_ae: str, paths: Sequence[Path]) -> SendResult:
    """Send DICOM files (e.g. a phantom series) to a peer: used by the demo and `echo`-style
    tools. Result ids are the indexes into `paths`."""
    rows = []
    for i, p in enumerate(paths):
        try:
            meta = read_file_meta_info(p)
            sop_class, sop = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
            ts: str | None = str(meta.TransferSyntaxUID)
        except (OSError, ValueError, AttributeError, InvalidDicomError):
            sop_class, sop, ts = "", "", None
        rows.append(ExportRow(i, 0, dest.name, sop, sop_class, p, 0, ts))
    result = send_files(dest, calling_ae, rows)
    why = "not sent: the association broke before its turn"
    not_sent = [(r, why) for r in result.not_attempted]
    return SendResult(result.sent, result.failed + not_sent)


def echo(dest: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO a destination; returns (ok, what happened) for the CLI and config checks."""
    ae = _new_ae(dest, calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    tls = (make_ssl_context(dest.tls, server_side=False), dest.host) if dest.tls.enabled else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    except (OSError, RuntimeError) as exc:
        return False, f"cannot connect: {exc}"
    if not assoc.is_established:
        return False, "association rejected" if assoc.is_rejected else "no association (peer down?)"
    _guard_answers(assoc)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code == 0:
        return True, "C-ECHO success"
    return False, "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}"


class Exporter(threading.Thread):
    """Drains one destination's export queue until stopped."""

    def __init__(
        self,
        dest: DestinationConfig,
        store: JobStore,
        *,
        calling_ae: str,
        stop: threading.Event,
        wake: threading.Event,
        on_progress: Callable[[], None],
        on_settled: Callable[[DestinationConfig, ExportTotals], object] | None = None,
        batch_size: int = 1000,
        idle_poll_s: float = 1.0,
    ) -> None:
        super().__init__(name=f"export-{dest.name}", daemon=True)
        self.dest = dest
        self.store = store
        self.calling_ae = calling_ae
        self.stop_event = stop
        self.wake = wake
        self.on_progress = on_progress
        self.on_settled = on_settled
        self.batch_size = batch_size
        self.idle_poll_s = idle_poll_s
        #: One kept association per lane (`destinations.associations`); lane 0 sends from this
        #: thread, the others from a pool of their own.
        self.lanes = [
            HeldAssociation(dest.association_close_delay_s, dest.name)
            for _ in range(dest.associations)
        ]
        self.held = self.lanes[0]
        self._lane_pool = (
            ThreadPoolExecutor(dest.associations - 1, thread_name_prefix=f"export-{dest.name}")
            if dest.associations > 1
            else None
        )
        self._lane_limit = dest.associations
        self._lanes_reduced_until = 0.0
        # A job's output queued for this destination wakes the exporter at once.
        store.on_exports_queued(self._on_exports_queued)

    def _on_exports_queued(self, destinations: Sequence[str]) -> None:
        if self.dest.name in destinations:
            self.wake.set()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.wake.clear()  # a wake from here on ends the wait below at once
                try:
                    worked = self.run_once(time.time())
                except Exception:
                    log.exception("export.loop_error", destination=self.dest.name)
                    worked = False
                if not worked:
                    for lane in self.lanes:
                        lane.close_if_idle()
                    self.wake.wait(self._idle_wait())
        finally:
            for lane in self.lanes:
                lane.close()
            if self._lane_pool is not None:
                self._lane_pool.shutdown(wait=True)

    def _idle_wait(self) -> float:
        """Until the next due export, the held association's close or the idle poll."""
        nxt = self.store.next_export_time(self.dest.name)
        wait = self.idle_poll_s if nxt is None else min(self.idle_poll_s, nxt - time.time())
        for lane in self.lanes:
            close_in = lane.seconds_left()
            if close_in is not None:
                wait = min(wait, close_in)
        return max(0.05, wait)

    def lanes_for(self, n_rows: int, now: float) -> int:
        """How many associations a batch of `n_rows` goes out on: up to the configured number,
        fewer after a refusal (for LANES_REDUCED_S), and none with fewer than
        LANE_MIN_INSTANCES instances."""
        if self._lane_limit < len(self.lanes) and now >= self._lanes_reduced_until:
            self._lane_limit = len(self.lanes)
        return max(1, min(self._lane_limit, n_rows // LANE_MIN_INSTANCES))

    def _send_lane(self, lane: int, rows: Sequence[ExportRow]) -> SendResult:
        """Send `rows` over lane `lane`'s association, recording confirmations as they come."""
        group = ConfirmationGroup()

        def record(row: ExportRow, error: str | None) -> None:
            t = time.monotonic()
            ids = group.add(row.id, t) if error is None else group.due(t)
            if ids:
                self.store.mark_sent(ids)

        try:
            return send_files(
                self.dest,
                self.calling_ae,
                rows,
                on_result=record,
                keep_going=lambda: not self.stop_event.is_set(),
                held=self.lanes[lane],
                refusal_counts=lane == 0,
            )
        finally:
            if len(group):
                self.store.mark_sent(group.take())

    def _send_in_lanes(self, rows: Sequence[ExportRow], now: float) -> tuple[SendResult, int]:
        """Split `rows` between the lanes and send them; the merged result and the lane count."""
        n = self.lanes_for(len(rows), now)
        if n == 1 or self._lane_pool is None:
            return self._send_lane(0, rows), 1
        parts = [rows[k::n] for k in range(n)]
        extra = [self._lane_pool.submit(self._send_lane, k, parts[k]) for k in range(1, n)]
        results = [self._send_lane(0, parts[0])] + [f.result() for f in extra]
        refused = [k for k, r in enumerate(results) if r.refused is not None]
        if refused:
            self._lane_limit = max(1, min(refused))
            self._lanes_reduced_until = now + LANES_REDUCED_S
            log.warning(
                "export.associations_reduced",
                destination=self.dest.name,
                associations=self._lane_limit,
                for_s=LANES_REDUCED_S,
                reason=results[refused[0]].refused,
            )
        merged = SendResult(
            [i for r in results for i in r.sent],
            [f for r in results for f in r.failed],
            [x for r in results for x in r.not_attempted],
        )
        return merged, n

    def run_once(self, now: float) -> bool:
        """Send the due exports (over up to `associations` associations); True if there is more
        to do at once."""
        rows = self.store.due_exports(self.dest.name, now, self.batch_size)
        if not rows:
            return False
        t0 = time.monotonic()
        result, associations = self._send_in_lanes(rows, now)
        by_error: dict[str, list[ExportRow]] = {}
        for row, err in result.failed:
            by_error.setdefault(err, []).append(row)
        dead = 0
        for err, failed_rows in by_error.items():
            dead += self.store.mark_export_failed(
                failed_rows,
                err,
                max_attempts=self.dest.max_attempts,
                backoff=lambda a: backoff_seconds(
                    a, self.dest.backoff_initial_s, self.dest.backoff_max_s
                ),
                now=time.time(),
            )
        elapsed = time.monotonic() - t0
        log.info(
            "export.batch",
            destination=self.dest.name,
            sent=len(result.sent),
            failed=len(result.failed),
            not_attempted=len(result.not_attempted),
            dead_letters=dead,
            associations=associations,
            seconds=round(elapsed, 3),
            instances_per_s=round(len(result.sent) / elapsed, 1) if elapsed > 0 else None,
            error=next(iter(by_error), None),
        )
        if self.on_settled is not None:  # the audit trail: jobs this batch finished sending
            for job_id in sorted({r.job_id for r in rows}):
                totals = self.store.export_totals(job_id, self.dest.name)
                if totals is not None:
                    self.on_settled(self.dest, totals)
        self.on_progress()
        return bool(result.sent) or bool(result.not_attempted)
