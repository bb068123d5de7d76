"""Engine workers: one thread per configured device drains the persistent job queue.

Association threads only spool; decoding, inference and encoding happen here, so a slow engine
never stalls reception. Work on one device is serialized (one worker per device). A job that
fails on bad input is marked failed with a reason an operator can read; `ltdiff-node retry JOB`
queues it again.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.store import JobKind, JobRow, JobState, JobStore
from engine.derived import DerivedSeriesOptions
from engine.interface import Engine
from engine.pipeline import standardize_series, write_series
from engine.registry import load_engine

log = get_logger("dicom_node.worker")


def derived_options(config: NodeConfig) -> DerivedSeriesOptions:
    return DerivedSeriesOptions(
        series_description_prefix=config.derived.series_description_prefix,
        series_number_offset=config.derived.series_number_offset,
    )


class EngineCache:
    """Engines are loaded once per (engine name, device) and reused across jobs."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._engines: dict[tuple[str, str], Engine] = {}
        self._lock = threading.Lock()

    def preload(self) -> None:
        """Load every engine a route uses on every worker device, so that a missing or
        incompatible weights file stops start-up (EngineError) instead of failing the first
        series."""
        used = {route.engine for route in self.config.routes}
        for name in sorted(used):
            for device in self.config.workers:
                self.get(name, device)

    def get(self, name: str, device: str) -> Engine:
        with self._lock:
            key = (name, device)
            if key not in self._engines:
                ec = self.config.engine(name)
                self._engines[key] = load_engine(ec.kind, ec.weights, device, ec.options)
                log.info(
                    "engine.loaded",
                    engine=name,
                    kind=ec.kind,
                    device=device,
                    identity=self._engines[key].identity.short,
                )
            return self._engines[key]


def process_job(
    job: JobRow, store: JobStore, config: NodeConfig, engines: EngineCache, device: str
) -> JobState:
    """Run one standardize job end to end (up to queuing its exports). Never raises."""
    t0 = time.monotonic()
    out_dir = config.outbox_dir / str(job.id)
    try:
        paths = [path for _, _, path in store.instances(job.series_uid)]
        if not paths:
            raise ValueError("the series has no stored instances")
        engine = engines.get(job.engine or "", device)
        result = standardize_series(paths, engine, derived_options(config))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        written = write_series(result.datasets, out_dir)
        outputs = [
            (str(ds.SOPInstanceUID), str(ds.SOPClassUID), p)
            for ds, p in zip(result.datasets, written, strict=True)
        ]
        summary: dict[str, Any] = {
            "slices_in": len(paths),
            "slices_out": len(outputs),
            "engine": engine.identity.short,
            "kernel_in": engine.identity.source_kernel,
            "kernel_out": engine.identity.target_kernel,
            "clipped_pixels": int(result.clipped_pixels),
            "decode_ms": round(result.timings.decode_ms, 1),
            "engine_ms": round(result.timings.engine_ms, 1),
            "encode_ms": round(result.timings.encode_ms, 1),
            "processing_ms": round((time.monotonic() - t0) * 1000, 1),
            "device": device,
            "notes": list(result.notes),
        }
        state = store.start_export(
            job.id,
            outputs,
            job.destinations,
            derived_series_uid=result.series_instance_uid,
            summary=summary,
        )
        log.info(
            "job.processed",
            job=job.id,
            series_uid=job.series_uid,
            derived_series_uid=result.series_instance_uid,
            state=state.value,
            **summary,
        )
        return state
    except Exception as exc:
        reason = safe_error_text(exc)
        store.fail_job(job.id, reason)
        log.error(
            "job.failed",
            job=job.id,
            series_uid=job.series_uid,
            reason=reason,
            exc_info=not isinstance(exc, ValueError | RuntimeError),
        )
        return JobState.FAILED


def forward_job(job: JobRow, store: JobStore) -> JobState:
    """Queue the received instances unchanged for export (unmatched action 'forward')."""
    outputs = [(sop, cls, path) for sop, cls, path in store.instances(job.series_uid)]
    return store.start_export(
        job.id,
        outputs,
        job.destinations,
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
        engines: EngineCache,
        stop: threading.Event,
        wake: threading.Event,
        on_done: Callable[[], None],
    ) -> None:
        super().__init__(name=f"engine-{device}-{index}", daemon=True)
        self.device = device
        self.store = store
        self.config = config
        self.engines = engines
        self.stop_event = stop
        self.wake = wake
        self.on_done = on_done

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                job = self.store.claim_job(self.name, (JobKind.STANDARDIZE,))
            except Exception:
                log.exception("worker.claim_failed", worker=self.name)
                job = None
            if job is None:
                self.wake.wait(self.config.assembly.poll_interval_s)
                self.wake.clear()
                continue
            log.info(
                "job.started",
                job=job.id,
                series_uid=job.series_uid,
                worker=self.name,
                engine=job.engine,
                attempt=job.process_attempts,
            )
            process_job(job, self.store, self.config, self.engines, self.device)
            self.on_done()


def remove_outbox(outbox: Path, job_id: int) -> None:
    shutil.rmtree(outbox / str(job_id), ignore_errors=True)
