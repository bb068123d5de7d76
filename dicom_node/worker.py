"""Engine workers: one thread per entry of `node.workers` drains the persistent job queue.

Association threads only spool; decoding, inference and encoding happen in the worker's engine
process (dicom_node/engine_host.py), so a slow or runaway engine never stalls reception and cannot
take the node down. Each worker runs one job at a time; a device listed twice in `node.workers`
has two workers.

What a worker does with each outcome:
- while the derived series is written: each chunk the engine process reports written has its
  exports queued at once (store.queue_outputs), so the exporter sends while the rest is written;
- the derived series is written: its (remaining) exports are queued (or the job is done);
- the series cannot be standardized: the job fails with a reason an operator can read
  (`ltdiff-node retry JOB` queues it again);
- the series was outside the validated envelope of the route's engine (fallback engine ran,
  processed anyway, or failed: engine/envelope_policy.py): `engine.outside_envelope` is logged;
- the disk is full: the job waits `jobs.disk_full_retry_s` and retries by itself (`status` shows
  it waiting); while free space is below `listener.min_free_disk_mb` no job is started;
- the engine process died or was killed (memory, time): the job is queued again, and fails after
  `jobs.max_attempts` such crashes;
- the node stops: the engine process is stopped and the job released for the next start.
A database that cannot be written (disk full) is waited for, logged once when it starts and once
when it ends, not once per poll.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dicom_node.config import NodeConfig
from dicom_node.engine_host import (
    EngineCrash,
    EngineFailure,
    EngineInterrupted,
    EngineJob,
    EngineOutcome,
    EngineProcess,
    EngineResult,
    FailureKind,
    OutputFile,
    ReadAheadHint,
    outside_envelope_fields,
)
from dicom_node.logs import get_logger
from dicom_node.metrics import NodeMetrics
from dicom_node.store import JobKind, JobRow, JobState, JobStore
from engine.envelope_policy import OutsideEnvelope
from engine.interface import EngineError

log = get_logger("dicom_node.worker")

T = TypeVar("T")
_ENGINE_RESTART_BACKOFF_S = 30.0
_DB_RETRY_S = 5.0


class _Condition:
    """A condition that is logged once when it starts and once when it ends."""

    def __init__(self, worker: str, start_event: str, end_event: str) -> None:
        self.worker = worker
        self.start_event = start_event
        self.end_event = end_event
        self.active = False

    def set(self, **fields: object) -> None:
        if not self.active:
            self.active = True
            log.warning(self.start_event, worker=self.worker, **fields)

    def clear(self) -> None:
        if self.active:
            self.active = False
            log.info(self.end_event, worker=self.worker)


def forward_job(job: JobRow, store: JobStore) -> JobState:
    """Queue the received instances unchanged for export (unmatched action 'forward')."""
    outputs = [(sop, cls, path) for sop, cls, path in store.instances(job.series_uid)]
    return store.start_export(
        job.id,
        outputs,
        job.destinations,
        transfer_syntaxes=store.transfer_syntaxes(job.series_uid),
        derived_series_uid=None,
        summary={"slices_in": len(outputs), "slices_out": len(outputs), "forwarded": True},
    )


class EngineWorker(threading.Thread):
    def __init__(
        self,
        device: str,
        index: int,
        store: JobStore,
        *,
        config: NodeConfig,
        stop: threading.Event,
        wake: threading.Event,
        on_done: Callable[[], None],
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(name=f"engine-{device}-{index}", daemon=True)
        self.metrics = metrics or NodeMetrics()
        self.device = device
        self.store = store
        self.config = config
        self.stop_event = stop
        self.wake = wake
        self.on_done = on_done
        self.engine = EngineProcess(
            config, device, self.name, last_instance_at=lambda: self.metrics.last_instance_at
        )
        self._low_disk = _Condition(self.name, "worker.waiting_for_disk", "worker.disk_available")
        self._db_down = _Condition(
            self.name, "worker.database_unavailable", "worker.database_available"
        )
        # Read ahead (engine/read_ahead.py): the series the scheduler expects next, and what
        # this worker has already passed to its engine process of it.
        self._read_ahead_series: str | None = None
        self._hinted_series: str | None = None
        self._hinted_paths: set[str] = set()
        self._read_ahead_failed: str | None = None  # the series whose read-ahead hit a defect

    def start_engine(self) -> None:
        """Start the engine process and load its engines: EngineError stops the node's start."""
        self.engine.start(self.stop_event)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self._run_once()
                except Exception:  # a defect must not end the worker: log it, go on
                    log.exception("worker.error", worker=self.name)
                    self.stop_event.wait(_DB_RETRY_S)
        finally:
            self.engine.close()

    def _run_once(self) -> None:
        if not self._enough_disk():
            self._idle(self.config.assembly.poll_interval_s * 10)
            return
        job = self._db(lambda: self.store.claim_job(self.name, (JobKind.STANDARDIZE,)))
        if job is None:
            self._read_ahead_safely()
            self._idle(self.config.assembly.poll_interval_s)
            return
        log.info(
            "job.started",
            job=job.id,
            series_uid=job.series_uid,
            worker=self.name,
            engine=job.engine,
            attempt=job.process_attempts,
        )
        try:
            self._process(job)
        except Exception as exc:  # a defect: count it like a crash, so the job cannot loop
            log.exception("worker.error", worker=self.name, job=job.id)
            reason = f"internal error in the worker ({type(exc).__name__})"
            self._db(
                lambda: self.store.record_crash(
                    job.id, reason, max_attempts=self.config.jobs.max_attempts
                )
            )
        self.on_done()

    def read_ahead(self, series_uid: str | None) -> None:
        """Called by the scheduler: the series still receiving that will probably be the next
        job (None: none). The worker passes its files to the engine process while idle."""
        if series_uid != self._read_ahead_series:
            self._read_ahead_series = series_uid
            self.wake.set()

    def _read_ahead_safely(self) -> None:
        """Reading ahead is an optimisation: a defect in it is logged once per series and
        never delays a job."""
        target = self._read_ahead_series
        if target is not None and target == self._read_ahead_failed:
            return
        try:
            self._hint_read_ahead()
        except Exception:
            log.exception("worker.read_ahead_error", worker=self.name, series_uid=target)
            self._read_ahead_failed = target

    def _hint_read_ahead(self) -> None:
        """Pass the engine process the files of the expected series it has not been given yet
        (or tell it to forget them when there is none)."""
        target = self._read_ahead_series
        if target is None:
            if self._hinted_series is not None:
                self.engine.hint_read_ahead(ReadAheadHint(self._hinted_series, None))
                self._forget_hints()
            return
        if target != self._hinted_series:
            self._forget_hints()
        try:
            instances = self.store.instances(target)
        except sqlite3.Error:
            return  # reading ahead is an optimisation; the job will read the files
        paths = tuple(str(path) for _, _, path in instances if str(path) not in self._hinted_paths)
        if paths and self.engine.hint_read_ahead(ReadAheadHint(target, paths)):
            self._hinted_series = target
            self._hinted_paths.update(paths)

    def _forget_hints(self) -> None:
        self._hinted_series = None
        self._hinted_paths = set()

    def _idle(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    def _enough_disk(self) -> bool:
        minimum = self.config.listener.min_free_disk_mb << 20
        if not minimum:
            return True
        try:
            free = shutil.disk_usage(self.config.state_dir).free
        except OSError:
            return True  # the write itself will tell
        if free < minimum:
            self._low_disk.set(free_mb=free >> 20, min_free_disk_mb=minimum >> 20)
            return False
        self._low_disk.clear()
        return True

    def _db(self, action: Callable[[], T]) -> T | None:
        """Run a database action; while the database cannot be written (disk full, I/O error),
        wait and try again until it works or the node stops (then None)."""
        while True:
            try:
                value = action()
            except sqlite3.Error as exc:
                self._db_down.set(error=str(exc))
                if self.stop_event.wait(_DB_RETRY_S):
                    return None
                continue
            self._db_down.clear()
            return value

    def _process(self, job: JobRow) -> None:
        out_dir = self.config.outbox_dir / str(job.id)
        instances = self._db(lambda: self.store.instances(job.series_uid))
        if instances is None:  # stopping while the database could not be read
            return
        paths = tuple(str(path) for _, _, path in instances)
        # The route's envelope policy as configured now (the defaults if the route is gone).
        route = self.config.route(job.rule)
        request = EngineJob(
            job.id,
            job.engine or "",
            paths,
            str(out_dir),
            route=job.rule,
            outside_envelope=OutsideEnvelope.FALLBACK if route is None else route.outside_envelope,
            fallback_engine=None if route is None else route.fallback_engine,
            series_uid=job.series_uid,
        )
        self._forget_hints()  # the engine process drops what it read ahead after the job
        try:
            outcome: EngineOutcome = self.engine.run(
                request, self.stop_event, on_written=lambda chunk: self._queue_early(job, chunk)
            )
        except EngineError as exc:
            log.error("worker.engine_unavailable", worker=self.name, job=job.id, reason=str(exc))
            self._db(lambda: self.store.release_job(job.id))
            self.stop_event.wait(_ENGINE_RESTART_BACKOFF_S)
            return
        self._settle(job, outcome)

    def _queue_early(self, job: JobRow, chunk: tuple[OutputFile, ...]) -> None:
        """Queue the export of output already written while the engine process writes the
        rest. Best effort: whatever is not queued here is queued with the result."""
        if not job.destinations:
            return
        try:
            self.store.queue_outputs(
                job.id,
                [(sop, cls, Path(p)) for sop, cls, p, _ in chunk],
                job.destinations,
                transfer_syntaxes={sop: ts for sop, _, _, ts in chunk},
            )
        except sqlite3.Error as exc:
            log.warning("worker.early_export_not_queued", job=job.id, error=str(exc))

    def _settle(self, job: JobRow, outcome: EngineOutcome) -> None:
        context = {"job": job.id, "series_uid": job.series_uid, "worker": self.name}
        if isinstance(outcome, EngineResult | EngineFailure):
            envelope = outcome.summary if isinstance(outcome, EngineResult) else outcome.envelope
            outside = outside_envelope_fields(envelope)
            if outside is not None:
                log.warning("engine.outside_envelope", route=job.rule, **context, **outside)
                self.metrics.outside_envelope(job.rule, job.engine, str(outside["outcome"]))
        if isinstance(outcome, EngineResult):
            self.metrics.engine_processed(outcome.summary)
            outputs = [(sop, cls, Path(p)) for sop, cls, p, _ in outcome.outputs]
            state = self._db(
                lambda: self.store.start_export(
                    job.id,
                    outputs,
                    job.destinations,
                    transfer_syntaxes={sop: ts for sop, _, _, ts in outcome.outputs},
                    derived_series_uid=outcome.derived_series_uid,
                    summary=outcome.summary,
                )
            )
            log.info(
                "job.processed",
                derived_series_uid=outcome.derived_series_uid,
                state=None if state is None else state.value,
                peak_rss_mb=self.engine.peak_rss >> 20,
                **context,
                **outcome.summary,
            )
        elif isinstance(outcome, EngineFailure) and outcome.kind is FailureKind.DISK_FULL:
            retry_s = self.config.jobs.disk_full_retry_s
            self._db(lambda: self.store.defer_job(job.id, outcome.reason, time.time() + retry_s))
            log.warning("job.waiting_for_disk", reason=outcome.reason, retry_s=retry_s, **context)
        elif isinstance(outcome, EngineFailure):
            self._db(lambda: self.store.fail_job(job.id, outcome.reason, summary=outcome.envelope))
            log.error("job.failed", reason=outcome.reason, **context)
        elif isinstance(outcome, EngineCrash):
            state = self._db(
                lambda: self.store.record_crash(
                    job.id, outcome.reason, max_attempts=self.config.jobs.max_attempts
                )
            )
            log.error(
                "job.crashed",
                reason=outcome.reason,
                state=None if state is None else state.value,
                max_attempts=self.config.jobs.max_attempts,
                **context,
            )
        elif isinstance(outcome, EngineInterrupted):
            self._db(lambda: self.store.release_job(job.id))
            log.info("job.interrupted", reason="the node is stopping", **context)


def remove_outbox(outbox: Path, job_id: int) -> None:
    shutil.rmtree(outbox / str(job_id), ignore_errors=True)
