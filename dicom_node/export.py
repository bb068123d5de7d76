"""Export: C-STORE SCU to the configured destinations, with retries that survive restarts.

One exporter thread per destination. It takes the due exports from the database (oldest job
first), opens one association for the whole batch (association reuse), sends each file, and
records each result. An instance that fails (association refused, peer down, failure status) gets
its attempt counted and a next attempt time with exponential backoff; after the destination's
max_attempts it becomes a dead letter, visible in `ltdiff-node status` and retried with
`ltdiff-node retry JOB`. Only unsent instances are ever resent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_node.config import DestinationConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.scp import set_tcp_nodelay
from dicom_node.store import ExportRow, JobStore
from dicom_node.tls import make_ssl_context

log = get_logger("dicom_node.export")

#: Statuses that mean the peer stored the instance (PS3.4 B.2.3: success and warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
MAX_CONTEXTS = 128


def backoff_seconds(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped at max_s."""
    return float(min(max_s, initial_s * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True)
class SendResult:
    sent: list[int]
    failed: list[tuple[ExportRow, str]]


def _transfer_syntax(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)


def send_files(dest: DestinationConfig, calling_ae: str, rows: Sequence[ExportRow]) -> SendResult:
    """Send the rows' files over one association; never raises for network trouble."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    contexts: dict[str, list[str]] = {}
    syntaxes: dict[int, str] = {}
    failed: list[tuple[ExportRow, str]] = []
    sendable: list[ExportRow] = []
    for r in rows:
        try:
            ts = _transfer_syntax(r.path)
        except (OSError, ValueError) as exc:
            failed.append((r, f"cannot read outbox file: {safe_error_text(exc)}"))
            continue
        syntaxes[r.id] = ts
        lst = contexts.setdefault(r.sop_class_uid, [])
        if ts not in lst:
            lst.append(ts)
        sendable.append(r)
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
        return SendResult([], failed + [(r, f"association failed: {exc}") for r in sendable])
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted or no answer"
        return SendResult([], failed + [(r, why) for r in sendable])
    sent: list[int] = []
    try:
        for i, r in enumerate(sendable):
            if not assoc.is_established:
                failed += [(x, "association lost") for x in sendable[i:]]
                break
            try:
                status = assoc.send_c_store(r.path)
            except (OSError, ValueError, RuntimeError) as exc:
                failed.append((r, f"send failed: {safe_error_text(exc)}"))
                continue
            code = getattr(status, "Status", None)
            if code in _STORED:
                sent.append(r.id)
            elif code is None:
                failed.append((r, "no response from peer (timeout or abort)"))
            else:
                failed.append((r, f"peer answered status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(sent, failed)


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
    return send_files(dest, calling_ae, rows)


def echo(dest: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO a destination; returns (ok, what happened) for the CLI and config checks."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    tls = (make_ssl_context(dest.tls, server_side=False), dest.host) if dest.tls.enabled else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    except (OSError, RuntimeError) as exc:
        return False, f"cannot connect: {exc}"
    if not assoc.is_established:
        return False, "association rejected" if assoc.is_rejected else "no association (peer down?)"
    try:
        status = assoc.send_c_echo()
    finally:
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
        rows = self.store.due_exports(self.dest.name, now, self.batch_size)
        if not rows:
            return False
        t0 = time.monotonic()
        result = send_files(self.dest, self.calling_ae, rows)
        if result.sent:
            self.store.mark_sent(result.sent)
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
            dead_letters=dead,
            seconds=round(elapsed, 3),
            instances_per_s=round(len(result.sent) / elapsed, 1) if elapsed > 0 else None,
            error=next(iter(by_error), None),
        )
        self.on_progress()
        return bool(result.sent)
