"""Export: C-STORE SCU to the configured destinations, with retries that survive restarts.

One exporter thread per destination. It takes the due exports from the database (oldest job
first), opens one association for them (association reuse) and sends each file. Each instance
the destination confirms is recorded as it is confirmed, in small groups (`ConfirmationGroup`:
at most 16 instances, written at the latest 0.25 s after the first of them when the next
outcome is known), so a node stopped mid-export resends only the instances whose confirmation
was not yet recorded: at most 16, the one in flight included. An instance that fails
(association refused, peer down, failure status, no answer within the destination's
`dimse_timeout_s`) gets its attempt counted and a next attempt time with exponential backoff;
after the destination's max_attempts it becomes a dead letter, visible in `ltdiff-node status`
and retried with `ltdiff-node retry JOB`. An association that broke (no answer, abort) is never
used again: the instances not yet tried go out at once on a fresh association, with no attempt
counted. Only unsent instances are ever resent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_node.config import DestinationConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.scp import set_tcp_nodelay
from dicom_node.store import ExportRow, ExportTotals, JobStore
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
    ae.acse_timeout = dest.acse_timeout_s
    ae.network_timeout = dest.network_timeout_s
    ae.dimse_timeout = dest.dimse_timeout_s
    return ae


def _transfer_syntax(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)


def send_files(
    dest: DestinationConfig,
    calling_ae: str,
    rows: Sequence[ExportRow],
    *,
    on_result: ResultCallback | None = None,
    keep_going: Callable[[], bool] | None = None,
) -> SendResult:
    """Send the rows' files over one association; never raises for network trouble.

    `on_result(row, error)` hears each instance's outcome as soon as it is known, before the
    next instance is sent. Sending stops early, leaving the rest `not_attempted`, when
    `keep_going()` turns false or the association breaks: no answer within the destination's
    `dimse_timeout_s` (the association is then aborted), a peer abort or a closed connection.
    A broken association is never used again.
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

    ae = _new_ae(dest, calling_ae)
    contexts: dict[str, list[str]] = {}
    sendable: list[ExportRow] = []
    for r in rows:
        try:
            ts = _transfer_syntax(r.path)
        except (OSError, ValueError, InvalidDicomError) as exc:
            outcome(r, f"cannot read outbox file: {safe_error_text(exc)}")
            continue
        lst = contexts.setdefault(r.sop_class_uid, [])
        if ts not in lst:
            lst.append(ts)
        sendable.append(r)
    if not sendable:
        return SendResult(sent, failed)
    for sop_class, tss in list(contexts.items())[:MAX_CONTEXTS]:
        for fallback in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if fallback not in tss:
                tss.append(fallback)
        ae.add_requested_context(sop_class, tss)
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
        for r in sendable:
            outcome(r, f"association failed: {exc}")
        return SendResult(sent, failed)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted or no answer"
        for r in sendable:
            outcome(r, why)
        return SendResult(sent, failed)
    _guard_answers(assoc)
    rest: list[ExportRow] = []
    broken = False
    try:
        for i, r in enumerate(sendable):
            if keep_going is not None and not keep_going():
                rest = list(sendable[i:])
                break
            if not assoc.is_established:
                if i == 0:  # nothing went out on this association: count it against them all
                    for x in sendable:
                        outcome(x, "association lost before the first instance")
                else:
                    rest = list(sendable[i:])
                    _log_broken(dest, "association lost between instances", 0.0, len(rest))
                broken = True
                break
            t0 = time.monotonic()
            try:
                # A distinct Message ID per request, so the two ends can tell answers apart.
                status = assoc.send_c_store(r.path, msg_id=i % _MAX_MESSAGE_ID + 1)
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                outcome(r, f"send failed: {safe_error_text(exc)}")
                continue
            except RuntimeError as exc:  # the association ended before the request went out
                outcome(r, f"send failed: {safe_error_text(exc)}")
                rest, broken = list(sendable[i + 1 :]), True
                break
            code = getattr(status, "Status", None)
            if code in _STORED:
                outcome(r, None)
            elif code is not None:
                outcome(r, f"peer answered status 0x{code:04X}")
            else:
                waited = time.monotonic() - t0
                why = (
                    f"no answer within dimse_timeout_s = {dest.dimse_timeout_s:g} s; "
                    "association aborted"
                    if waited >= dest.dimse_timeout_s * 0.98
                    else "association aborted or connection closed while waiting for the answer"
                )
                outcome(r, why)
                rest, broken = list(sendable[i + 1 :]), True
                _log_broken(dest, why, waited, len(rest))
                break
    finally:
        if assoc.is_established:
            if broken:  # pynetdicom aborts on a DIMSE timeout; make sure of it on any break
                assoc.abort()
            else:
                assoc.release()
    return SendResult(sent, failed, rest)


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
            sop_class = str(read_file_meta_info(p).MediaStorageSOPClassUID)
        except (OSError, ValueError, AttributeError):
            sop_class = ""
        rows.append(ExportRow(i, 0, dest.name, "", sop_class, p, 0))
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

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                worked = self.run_once(time.time())
            except Exception:
                log.exception("export.loop_error", destination=self.dest.name)
                worked = False
            if not worked:
                nxt = self.store.next_export_time(self.dest.name)
                wait = (
                    self.idle_poll_s
                    if nxt is None
                    else max(0.05, min(self.idle_poll_s, nxt - time.time()))
                )
                self.wake.wait(wait)
                self.wake.clear()

    def run_once(self, now: float) -> bool:
        """Send the due exports over one association; True if there is more to do at once."""
        rows = self.store.due_exports(self.dest.name, now, self.batch_size)
        if not rows:
            return False
        t0 = time.monotonic()
        group = ConfirmationGroup()

        def record(row: ExportRow, error: str | None) -> None:
            t = time.monotonic()
            ids = group.add(row.id, t) if error is None else group.due(t)
            if ids:
                self.store.mark_sent(ids)

        try:
            result = send_files(
                self.dest,
                self.calling_ae,
                rows,
                on_result=record,
                keep_going=lambda: not self.stop_event.is_set(),
            )
        finally:
            if len(group):
                self.store.mark_sent(group.take())
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
