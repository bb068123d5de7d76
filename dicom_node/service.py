"""The running node: listener, scheduler (assembly + routing + settling + retention), engine
workers and exporters, started and stopped together.

Threads:
- pynetdicom association threads: C-STORE into the spool (scp.StoreHandler);
- scheduler: every poll interval, closes stable series, routes them (creating jobs), queues
  forward jobs, settles exporting jobs (one canonical log line per series) and purges files past
  retention;
- one engine worker per configured device, each with its engine process (engine_host.py);
- one exporter per destination;
- with `[metrics] enabled`, the HTTP server of /metrics, /healthz and /readyz
  (dicom_node/metrics.py), started first so that /readyz says "starting" while engines load;
- with `[audit] enabled`, one writer thread per audit output (dicom_node/audit/): the node
  reports its start and stop, each series received and sent, and security refusals there.

Start-up order: sweep the spool of files no record points to, count the jobs a crash
interrupted (failing those that reached `jobs.max_attempts`), start the engine processes (a bad
weights file stops start-up here), then open the listener. Every series still receiving gets a
fresh stable-age window from the start, so a series interrupted by a stop is not closed half
received before its sender has had time to resume.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from dicom_node.assembly import next_stable_at, ready_series
from dicom_node.audit.trail import AuditTrail
from dicom_node.config import NodeConfig, UnmatchedAction, receiver_process_count, usable_cpus
from dicom_node.engine_host import ENVELOPE_LOG_KEYS
from dicom_node.export import Exporter
from dicom_node.logs import get_logger
from dicom_node.metrics import (
    MetricsServer,
    NodeMetrics,
    Phase,
    Probe,
    StateCollector,
    probe_health,
    probe_readiness,
)
from dicom_node.receivers import DispatchingServer, start_receiver_listener
from dicom_node.routing import decide
from dicom_node.scp import start_listener
from dicom_node.spool import Spool
from dicom_node.store import JobFinished, JobKind, JobState, JobStore, SeriesRow
from dicom_node.worker import EngineWorker, forward_job, remove_outbox

log = get_logger("dicom_node.service")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness/stopping; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        log.warning("systemd.notify_failed")


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = JobStore(config.database_path, on_job_finished=self._canonical_line)
        self.spool = Spool(config.spool_dir, config.listener.min_free_disk_mb * 1024 * 1024)
        self.stop_event = threading.Event()
        self.scheduler_wake = threading.Event()
        self.worker_wake = threading.Event()
        self.export_wakes: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []
        self.server: Any = None
        self._last_purge = 0.0
        self._read_ahead_worker: EngineWorker | None = None  # set when the workers start
        self.started_at = time.time()
        self.phase = Phase.STARTING
        self.metrics = NodeMetrics(config.routes)
        self.metrics.registry.register(
            StateCollector(
                database_path=config.database_path,
                state_dir=config.state_dir,
                destinations=[d.name for d in config.destinations],
                min_free_bytes=config.listener.min_free_disk_mb << 20,
                health=self.health,
                readiness=self.readiness,
            )
        )
        self.metrics_server: MetricsServer | None = None
        self.audit = (
            AuditTrail(
                config.audit,
                ae_title=config.listener.ae_title,
                on_dropped=self.metrics.audit_messages_dropped,
            )
            if config.audit.enabled
            else None
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        log.info("node.starting", config=self.config.as_dict())
        try:
            if self.audit is not None:
                self.audit.start()
            if self.config.metrics.enabled:  # a port in use stops start-up here (ConfigError)
                self.metrics_server = MetricsServer(
                    self.config.metrics, self.metrics, health=self.health, readiness=self.readiness
                )
            self._start()
        except BaseException as exc:  # leave nothing running
            self._close_metrics()
            self.store.close()
            if self.audit is not None:
                self.audit.application_started(failure=exc)
                self.audit.close()
            raise
        if self.audit is not None:
            self.audit.application_started()

    def _start(self) -> None:
        swept = self.spool.sweep(self.store.instance_paths())
        if swept.orphans or swept.temporaries:
            log.warning(
                "spool.swept",
                orphans=swept.orphans,
                temporaries=swept.temporaries,
                mb_freed=round(swept.bytes_freed / 2**20, 1),
                reason="files of instances never acknowledged (the node stopped mid-write)",
            )
        interrupted = self.store.requeue_interrupted(self.config.jobs.max_attempts)
        for job_id, state in interrupted.items():
            log.warning(
                "job.interrupted",
                job=job_id,
                state=state.value,
                reason="the node stopped abnormally while processing",
                max_attempts=self.config.jobs.max_attempts,
            )
        if self.audit is not None:  # instances of unfinished series received before this start
            for series in self.store.receiving_series():
                self.audit.resume_series(series, self.store.instances(series.series_uid))
        workers = [
            EngineWorker(
                device,
                i,
                self.store,
                config=self.config,
                stop=self.stop_event,
                wake=self.worker_wake,
                on_done=self.scheduler_wake.set,
                metrics=self.metrics,
            )
            for i, device in enumerate(self.config.workers)
        ]
        # The first worker's engine process reads ahead the series that will be its next job.
        self._read_ahead_worker = workers[0] if workers else None
        try:
            for worker in workers:
                worker.start_engine()
            receivers = receiver_process_count(
                self.config.listener.receiver_processes, usable_cpus()
            )
            if receivers:  # the associations run in receiver processes (receivers.py)
                self.server = start_receiver_listener(
                    self.config, receivers, self.metrics, self.audit
                )
                self.metrics.refresh = self.server.drain
            else:
                self.server = start_listener(
                    self.config.listener, self.spool, self.store, self.metrics, self.audit
                )
        except BaseException:  # bad weights, port in use, ...: leave nothing running
            for worker in workers:
                worker.engine.close()
            self.store.close()
            raise
        # A series still receiving gets its fresh stable-age window from when senders can
        # reach the node again, not from when start-up began (receivers take a while to start).
        self.started_at = time.time()
        self.threads.append(
            threading.Thread(target=self._scheduler_loop, name="scheduler", daemon=True)
        )
        self.threads.extend(workers)
        for dest in self.config.destinations:
            wake = self.export_wakes.setdefault(dest.name, threading.Event())
            self.threads.append(
                Exporter(
                    dest,
                    self.store,
                    calling_ae=self.config.listener.ae_title,
                    stop=self.stop_event,
                    wake=wake,
                    on_progress=self.scheduler_wake.set,
                    on_settled=None if self.audit is None else self.audit.series_exported,
                )
            )
        for t in self.threads:
            t.start()
        log.info(
            "node.ready",
            ae_title=self.config.listener.ae_title,
            port=self.port,
            workers=list(self.config.workers),
            destinations=[d.name for d in self.config.destinations],
            metrics=None if self.metrics_server is None else self.metrics_server.url,
        )
        self.phase = Phase.READY
        sd_notify("READY=1")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.config.listener.port

    def stop(self) -> None:
        self.phase = Phase.STOPPING
        sd_notify("STOPPING=1")
        log.info("node.stopping")
        if self.server is not None:
            self.server.shutdown()
        self.stop_event.set()
        self.scheduler_wake.set()
        self.worker_wake.set()
        for w in self.export_wakes.values():
            w.set()
        # An exporter finishes the C-STORE in flight (at most its DIMSE timeout plus the
        # association teardown) and records it; the threads stop concurrently, so the deadline
        # is shared.
        deadline = time.monotonic() + max(
            [30.0] + [d.dimse_timeout_s + d.acse_timeout_s + 5.0 for d in self.config.destinations]
        )
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        still_running = [t.name for t in self.threads if t.is_alive()]
        if still_running:
            log.warning("node.stop_timeout", threads=still_running)
        if self.audit is not None:
            self.audit.application_stopped()
            self.audit.close()
        self.store.close()
        self.phase = Phase.STOPPED
        self._close_metrics()
        log.info("node.stopped")

    # ---- health ------------------------------------------------------------------------------

    def _listener_serving(self) -> bool:
        return self.server is not None and bool(self.server.serving)

    def health(self) -> Probe:
        """/healthz: the listener, the database and every thread of the node are alive."""
        return probe_health(
            listener_serving=self._listener_serving(),
            threads=list(self.threads),
            database_path=self.config.database_path,
            receivers=self.server.pool.health
            if isinstance(self.server, DispatchingServer)
            else None,
        )

    def readiness(self) -> Probe:
        """/readyz: start-up is complete and the listener accepts associations."""
        return probe_readiness(self.phase, listener_serving=self._listener_serving())

    def _close_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def run_forever(self) -> None:
        stopped = threading.Event()

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("node.signal", signal=signal.Signals(signum).name)
            stopped.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        try:
            stopped.wait()
        finally:
            self.stop()

    # ---- scheduler -------------------------------------------------------------------------

    def _scheduler_loop(self) -> None:
        while not self.stop_event.is_set():
            wait = self.config.assembly.poll_interval_s
            try:
                stable_at = self.schedule_once(time.time())
            except Exception:
                log.exception("scheduler.error")
            else:  # wake when the next series becomes stable, not up to a poll later
                if stable_at is not None:
                    wait = max(0.01, min(wait, stable_at - time.time()))
            self.scheduler_wake.wait(wait)
            self.scheduler_wake.clear()

    def schedule_once(self, now: float) -> float | None:
        """One pass; returns when the next series still receiving becomes stable (or None)."""
        # Stopping closes no series: one interrupted by the stop gets its fresh window after the
        # restart (stopping the listener and its receiver processes takes a moment).
        receiving = [] if self.phase is Phase.STOPPING else self.store.receiving_series()
        ready = ready_series(receiving, now, self.config.assembly, self.started_at)
        for r in ready:
            self._route(r.series, r.why, now)
        self._run_forward_jobs()
        self.store.settle_exporting_jobs()
        if now - self._last_purge > 60:
            self._last_purge = now
            self._purge(now)
        closed = {r.series.series_uid for r in ready}
        self._choose_read_ahead([s for s in receiving if s.series_uid not in closed])
        return next_stable_at(
            [s for s in receiving if s.series_uid not in closed],
            self.config.assembly,
            self.started_at,
        )

    def _choose_read_ahead(self, receiving: list[SeriesRow]) -> None:
        """Point the read-ahead worker at the series still receiving that a rule will send to
        an engine and that becomes stable first (its last instance is the oldest); None when
        there is none."""
        worker = self._read_ahead_worker
        if worker is None or not self.config.jobs.read_ahead_bytes:
            return
        routed = [
            s
            for s in receiving
            if decide(s.header, self.config.routes, own_output=s.own_output).rule is not None
        ]
        first = min(routed, key=lambda s: s.last_received, default=None)
        worker.read_ahead(None if first is None else first.series_uid)

    def _route(self, series: SeriesRow, why: str, now: float) -> None:
        """Close the series revision read by the scheduler; if a late instance changed the
        revision meanwhile, complete_series does nothing and the next poll routes it again."""
        series_uid, revision = series.series_uid, series.revision
        decision = decide(series.header, self.config.routes, own_output=series.own_output)
        common = {
            "series_uid": series_uid,
            "revision": revision,
            "instances": series.n_instances,
            "complete_because": why,
            "modality": series.header.get("Modality", ""),
            "kernel": series.header.get("ConvolutionKernel", ""),
            "reason": decision.reason,
        }
        if decision.rule is not None:
            job_id = self.store.complete_series(
                series_uid,
                revision,
                job_kind=JobKind.STANDARDIZE,
                rule=decision.rule.name,
                engine=decision.rule.engine,
                destinations=decision.rule.destinations,
                now=now,
            )
            log.info(
                "series.routed",
                job=job_id,
                rule=decision.rule.name,
                engine=decision.rule.engine,
                **common,
            )
            self.worker_wake.set()
        elif self.config.unmatched.action is UnmatchedAction.FORWARD and not series.own_output:
            job_id = self.store.complete_series(
                series_uid,
                revision,
                job_kind=JobKind.FORWARD,
                rule=None,
                engine=None,
                destinations=self.config.unmatched.destinations,
                now=now,
            )
            log.info("series.routed", job=job_id, action="forward", **common)
        else:
            self.store.complete_series(
                series_uid,
                revision,
                job_kind=None,
                rule=None,
                engine=None,
                destinations=(),
                now=now,
            )
            log.info(
                "series.routed",
                action="discard",
                retention_hours=self.config.retention_hours,
                **common,
            )
        if self.audit is not None:  # where the node decided the series is complete
            if isinstance(self.server, DispatchingServer):
                self.server.drain()  # the receivers' audit records of what the database holds
            self.audit.series_complete(series_uid)

    def _run_forward_jobs(self) -> None:
        while (job := self.store.claim_job("scheduler", (JobKind.FORWARD,))) is not None:
            state = forward_job(job, self.store)
            log.info("job.forwarding", job=job.id, series_uid=job.series_uid, state=state.value)
            for w in self.export_wakes.values():
                w.set()

    def _canonical_line(self, event: JobFinished) -> None:
        """One line per series at the end (the store calls this once for every job that becomes
        done or failed): slices, kernels, the engine that ran, the envelope check (status,
        violations, measurement; absent for forwarded series and for jobs that failed before the
        check), timings, status."""
        job, state = event.job, event.state
        self.metrics.series_finished(job.kind.value, state.value)
        outcome = self.store.job_outcome(job.id)
        summary = outcome["summary"]
        series = self.store.series(job.series_uid)
        received = series.last_received if series else outcome["created_at"]
        finished = outcome["finished_at"] or time.time()
        log.info(
            "series.done" if state is JobState.DONE else "series.failed",
            job=job.id,
            kind=job.kind.value,
            series_uid=job.series_uid,
            derived_series_uid=outcome["derived_series_uid"],
            slices=summary.get("slices_out"),
            kernel_in=series.header.get("ConvolutionKernel") if series else None,
            kernel_out=summary.get("kernel_out"),
            engine=summary.get("engine"),
            **{key: summary[key] for key in ENVELOPE_LOG_KEYS if key in summary},
            processing_ms=summary.get("processing_ms"),
            turnaround_ms=round((finished - received) * 1000, 1),
            destinations=list(job.destinations),
            status=state.value,
            error=outcome["error"],
        )

    def _purge(self, now: float) -> None:
        series_uids, job_ids = self.store.purgeable(now - self.config.retention_hours * 3600)
        for uid in series_uids:
            self.spool.remove_series(uid)
            self.store.forget_series(uid)
            log.info("retention.purged_series", series_uid=uid)
        for job_id in job_ids:
            remove_outbox(self.config.outbox_dir, job_id)
            series_uid = self.store.mark_purged(job_id)
            if series_uid is not None:  # no other job of the series is still open
                self.spool.remove_series(series_uid)
            log.info(
                "retention.purged_job_files", job=job_id, source_removed=series_uid is not None
            )
