"""The node's audit trail: what the node calls where its canonical events happen, and the writer
threads that deliver the messages.

Audited (PS3.15 A.5.3; `messages` has the codes):

- Application Activity: the node started (after `node.ready`; a start-up that failed is
  reported with a serious failure) and stopped (after its threads have stopped);
- DICOM Instances Transferred, received: one message per series, peer and patient when the
  scheduler completes the series (where it logs `series.routed`), counting the instances that
  peer sent since the series was last completed; the reception ledger (`reception`) keeps them
  until then. After a restart, the instances of a series still receiving are counted from the
  database, with the AE title of the series' first sender and no address (none is kept on
  disk);
- DICOM Instances Transferred, sent: one message per job and destination once none of its
  instances is pending (all confirmed or given up), with the outcome: all confirmed: 0; some
  given up: one message for the confirmed ones (0) and one for the others (4, minor failure),
  as A.5.2 wants successes and failures in separate messages; none confirmed: 8 (serious
  failure). `ltdiff-node retry` of dead letters makes a new export, reported again when it ends;
- Security Alert (Node Authentication): a connection or association refused for security: a
  source address not in `listener.allowed_addresses`, a failed TLS handshake, a calling AE title
  not in `listener.allowed_calling_ae_titles`, a called AE title not recognized. Refusals for
  capacity (pending connections, association limit, idle timeouts) are not security events:
  they are in the log and the metrics.

Delivery never blocks the caller: a message is rendered in the caller's thread and offered to a
bounded queue per output (`queue_size`); a full queue drops it, counts it
(`ltdiff_node_audit_messages_dropped_total`) and logs `audit.dropped` (how many, never what).
Each output has a writer thread that takes what is queued in one batch, writes it (the file is
fsync'd once per batch) and, on failure, keeps the batch and tries again with backoff
(0.5 s doubling to 30 s), so a batch may be written twice, never skipped. At stop, the writers
have `close_timeout_s` to deliver what is queued; what is left is counted as dropped
(`audit.undelivered`).
"""

from __future__ import annotations

import os
import pwd
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar, cast

from dicom_node.audit.messages import (
    Action,
    Application,
    ApplicationActivity,
    AuditEvent,
    AuditSource,
    InstancesTransferred,
    Outcome,
    Patient,
    Rendered,
    SecurityAlert,
    Study,
    render,
)
from dicom_node.audit.reception import (
    Peer,
    ReceptionLedger,
    Subject,
    Ticket,
    read_subject_file,
)
from dicom_node.audit.sinks import MessageTooLargeError, Sink, SinkError, make_sinks
from dicom_node.audit.syslog import APP_NAME
from dicom_node.config import AuditConfig, DestinationConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.metrics import RejectionReason
from dicom_node.store import ExportTotals, SeriesRow

log = get_logger("dicom_node.audit")

BATCH_MAX = 256  # messages written (and fsync'd) together at most
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
DROP_LOG_INTERVAL_S = 10.0  # at most one `audit.dropped` line per output in this time

#: Refusals that are security events (Security Alert), and what the alert says.
SECURITY_REFUSALS: dict[RejectionReason, str] = {
    RejectionReason.ADDRESS_NOT_ALLOWED: (
        "connection refused: the source address is not in listener.allowed_addresses"
    ),
    RejectionReason.TLS_FAILED: "connection refused: the TLS handshake failed",
    RejectionReason.CALLING_AE_NOT_ALLOWED: (
        "association rejected: the calling AE title is not in listener.allowed_calling_ae_titles"
    ),
    RejectionReason.CALLED_AE_NOT_RECOGNIZED: (
        "association rejected: the called AE title is not recognized"
    ),
}

P = ParamSpec("P")
R = TypeVar("R")


def _never_raises(default: object) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Audit hooks run inside reception, scheduling and export: a defect here is logged (with
    a redacted traceback) and never breaks the work it audits."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @wraps(func)
        def hook(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return func(*args, **kwargs)
            except Exception:
                log.exception("audit.error", hook=func.__name__)
                return cast(R, default)

        return hook

    return decorate


def utc_now() -> datetime:
    return datetime.now(UTC)


def os_user() -> str:
    """The account the node runs as: the Application Launcher of Application Start."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class SinkWriter(threading.Thread):
    """Delivers one output's queue (module doc). `offer` never blocks."""

    def __init__(
        self, sink: Sink, queue_size: int, on_dropped: Callable[[str, int], None] | None = None
    ) -> None:
        super().__init__(name=f"audit-{sink.name}", daemon=True)
        self.sink = sink
        self.queue: queue.Queue[Rendered] = queue.Queue(maxsize=queue_size)
        self.on_dropped = on_dropped
        self.delivered = 0
        self.dropped = 0
        self._closing = threading.Event()
        self._give_up = threading.Event()
        self._lock = threading.Lock()
        self._unlogged = 0
        self._last_drop_log = -DROP_LOG_INTERVAL_S

    def offer(self, message: Rendered) -> bool:
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            self._drop(1, "queue full: the output is slower than the events, or failing")
            return False
        return True

    def _drop(self, n: int, reason: str, *, force_log: bool = False) -> None:
        with self._lock:
            self.dropped += n
            self._unlogged += n
            now = time.monotonic()
            if not force_log and now - self._last_drop_log < DROP_LOG_INTERVAL_S:
                unlogged = 0
            else:
                unlogged, self._unlogged, self._last_drop_log = self._unlogged, 0, now
        if self.on_dropped is not None:
            self.on_dropped(self.sink.name, n)
        if unlogged:
            log.warning(
                "audit.dropped",
                output=self.sink.name,
                messages=unlogged,
                reason=reason,
                dropped_total=self.dropped,
            )

    def _batch(self) -> list[Rendered]:
        """What is queued, waiting a little for the first message; [] when there is none."""
        try:
            batch = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def run(self) -> None:
        pending: list[Rendered] = []
        delay, failing = RETRY_INITIAL_S, False
        while not self._give_up.is_set():
            if not pending:
                pending = self._batch()
                if not pending:
                    if self._closing.is_set():
                        break
                    continue
            try:
                self.sink.send(pending)
            except SinkError as exc:
                self.delivered += exc.delivered
                pending = pending[exc.delivered :]
                if isinstance(exc.cause, MessageTooLargeError):
                    pending = pending[1:]
                    self._drop(1, "a message too large for the output", force_log=True)
                    continue
                if not failing:
                    log.warning(
                        "audit.output_failed",
                        output=self.sink.name,
                        error=safe_error_text(exc.cause),
                        waiting=len(pending) + self.queue.qsize(),
                        retry_in_s=delay,
                    )
                failing = True
                self._give_up.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:  # a defect in a sink: keep the batch, log, try again later
                log.exception("audit.output_error", output=self.sink.name)
                self._give_up.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.delivered += len(pending)
            pending = []
            if failing:
                log.info("audit.output_recovered", output=self.sink.name)
                delay, failing = RETRY_INITIAL_S, False
        left = len(pending) + self.queue.qsize()
        if left:
            log.warning("audit.undelivered", output=self.sink.name, messages=left)
            self._drop(left, "the node stopped before they were delivered", force_log=True)
        elif self._unlogged:
            self._drop(0, "queue full", force_log=True)
        self.sink.close()

    def finish(self) -> None:
        """Stop once the queue is delivered (`close` waits for it)."""
        self._closing.set()

    def close(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (time.monotonic), then give up."""
        self.finish()
        self.join(max(0.0, deadline - time.monotonic()))
        if self.is_alive():
            self._give_up.set()
            self.join(5.0)


class AuditTrail:
    """The audit hooks of one node and its outputs (module doc)."""

    def __init__(
        self,
        cfg: AuditConfig,
        *,
        ae_title: str,
        hostname: str | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
        clock: Callable[[], datetime] = utc_now,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.cfg = cfg
        self.hostname = hostname or socket.gethostname()
        self.source = AuditSource(cfg.source_id or ae_title, cfg.enterprise_site_id)
        self.node = Application(ae_title, self.hostname, APP_NAME)
        self.ledger = ReceptionLedger()
        self.clock = clock
        self.close_timeout_s = close_timeout_s
        self.writers = [
            SinkWriter(sink, cfg.queue_size, on_dropped)
            for sink in make_sinks(cfg.path, cfg.syslog, self.hostname)
        ]
        self._started = False

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        for writer in self.writers:
            writer.start()
        self._started = True
        log.info(
            "audit.started",
            outputs=[w.sink.name for w in self.writers],
            path=None if self.cfg.path is None else str(self.cfg.path),
            syslog=None
            if self.cfg.syslog is None
            else f"{self.cfg.syslog.transport.value}://{self.cfg.syslog.host}:"
            f"{self.cfg.syslog.port}",
            source_id=self.source.source_id,
        )

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        deadline = time.monotonic() + self.close_timeout_s
        for writer in self.writers:
            writer.finish()  # all outputs drain at once, under one deadline
        for writer in self.writers:
            writer.close(deadline)
        log.info(
            "audit.stopped",
            delivered={w.sink.name: w.delivered for w in self.writers},
            dropped={w.sink.name: w.dropped for w in self.writers},
        )

    def emit(self, event: AuditEvent) -> None:
        """Render the message here, queue it for every output; never blocks."""
        message = render(event, self.source, self.clock())
        for writer in self.writers:
            writer.offer(message)

    # ---- Application Activity ------------------------------------------------------------

    @_never_raises(None)
    def application_started(self, failure: BaseException | None = None) -> None:
        self.emit(
            ApplicationActivity(
                when=self.clock(),
                started=True,
                application=self.node,
                launcher=os_user(),
                outcome=Outcome.SUCCESS if failure is None else Outcome.SERIOUS_FAILURE,
                description=None
                if failure is None
                else f"start-up failed: {safe_error_text(failure)}",
            )
        )

    @_never_raises(None)
    def application_stopped(self) -> None:
        self.emit(ApplicationActivity(when=self.clock(), started=False, application=self.node))

    # ---- DICOM Instances Transferred: reception ------------------------------------------

    @_never_raises(None)
    def instance_receiving(
        self,
        series_uid: str,
        calling_ae: str,
        address: str | None,
        subject: Subject,
        sop_class_uid: str,
    ) -> Ticket | None:
        """An instance is about to be recorded (C-STORE handler, before the database commit)."""
        return self.ledger.add(series_uid, Peer(calling_ae, address), subject, sop_class_uid)

    @_never_raises(None)
    def instance_not_stored(self, ticket: Ticket | None) -> None:
        """The instance `instance_receiving` counted was refused or was a duplicate."""
        if ticket is not None:
            self.ledger.retract(ticket)

    @_never_raises(None)
    def resume_series(self, series: SeriesRow, instances: Sequence[tuple[str, str, Path]]) -> None:
        """At start-up: a series still receiving, whose instances arrived before the restart."""
        if not instances:
            return
        subject = read_subject_file(instances[0][2]) or Subject("", "", series.study_uid)
        peer = Peer(series.calling_ae, None)
        for sop_class, n in Counter(cls for _, cls, _ in instances).items():
            self.ledger.add(series.series_uid, peer, subject, sop_class, n)

    @_never_raises(0)
    def series_complete(self, series_uid: str) -> int:
        """The scheduler completed the series: one message per peer and patient."""
        batches = self.ledger.take(series_uid)
        when = self.clock()
        for batch in batches:
            self.emit(
                InstancesTransferred(
                    when=when,
                    action=Action.CREATE,
                    source=Application(batch.peer.ae_title, batch.peer.address),
                    destination=self.node,
                    requestor="source",
                    patient=batch.patient,
                    studies=batch.studies,
                    description=None
                    if batch.peer.address is not None
                    else "received before the node restarted (the peer's address is not kept)",
                )
            )
        return len(batches)

    # ---- DICOM Instances Transferred: export ----------------------------------------------

    @_never_raises(0)
    def series_exported(self, dest: DestinationConfig, totals: ExportTotals) -> int:
        """A job's export to `dest` ended (nothing pending): its message(s)."""
        subject = read_subject_file(totals.sample_path)
        patient = Patient(subject.patient_id, subject.patient_name) if subject else Patient("")
        accession = (subject.accession,) if subject and subject.accession else ()
        description = subject.study_description if subject else ""
        peer = Application(dest.ae_title, dest.host, dest.name)
        when = self.clock()
        parts: list[tuple[dict[str, int], Outcome, str | None]] = []
        if totals.sent:
            parts.append((dict(totals.sent), Outcome.SUCCESS, None))
        if totals.dead:
            given_up = sum(totals.dead.values())
            parts.append(
                (
                    dict(totals.dead),
                    Outcome.MINOR_FAILURE if totals.sent else Outcome.SERIOUS_FAILURE,
                    f"{given_up} instance(s) not delivered after {dest.max_attempts} attempt(s) "
                    f"(dead letters; `ltdiff-node retry {totals.job_id}` sends them again): "
                    f"{totals.last_error or 'no error recorded'}",
                )
            )
        for counts, outcome, why in parts:
            self.emit(
                InstancesTransferred(
                    when=when,
                    action=Action.READ,
                    source=self.node,
                    destination=peer,
                    requestor="source",
                    patient=patient,
                    studies=(Study(totals.study_uid, counts, accession, description),),
                    outcome=outcome,
                    description=why,
                )
            )
        return len(parts)

    # ---- Security Alert ----------------------------------------------------------------------

    @_never_raises(False)
    def association_rejected(
        self,
        reason: RejectionReason,
        address: str | None,
        ae_title: str | None = None,
        detail: str | None = None,
    ) -> bool:
        """A connection or association was refused; audited when the reason is a security one
        (`SECURITY_REFUSALS`). Returns whether a message was made."""
        sentence = SECURITY_REFUSALS.get(reason)
        if sentence is None:
            return False
        text = f"{sentence} ({detail})" if detail else sentence
        self.emit(
            SecurityAlert(
                when=self.clock(),
                reporter=self.node,
                peer=Application(ae_title or None, address),
                description=text,
            )
        )
        return True
