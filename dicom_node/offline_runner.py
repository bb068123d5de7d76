"""Running an offline plan (dicom_node/offline.py): engines, worker processes, Ctrl-C.

One worker runs in this process; several run as a `ProcessPoolExecutor` whose processes come
from multiprocessing's fork server (torch and fork do not mix; the node's engine processes start
the same way). Each worker process is given one device when it starts (devices dealt
round-robin) and loads each engine it needs once (`dicom_node.engine_host.EngineCache`). Series
are independent and the output does not depend on where a series ran: the derived UIDs are
name-based and the engine's seed comes from the source Series Instance UID
(`engine.pipeline.seed_for_series`), so any number of workers writes the same files.

A series is written to `OUT_DIR/.partial-<source series UID>/`, then renamed to
`OUT_DIR/<derived series UID>/` (replacing an earlier run's), so an interrupted run leaves no
half-written series under a final name. Ctrl-C: workers ignore SIGINT; the parent cancels the
series not started, terminates the workers, removes the partial folders and re-raises
KeyboardInterrupt.
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Final

from dicom_node.config import EngineConfig, NodeConfig
from dicom_node.engine_host import EngineCache, derived_options, engine_process_environment
from dicom_node.logs import configure_process, safe_error_text
from dicom_node.offline import JobOutcome, JobStatus, PlannedJob
from engine.cpu_threads import share_cpus
from engine.envelope_policy import EnvelopePolicy, OutsideEnvelopeError
from engine.interface import Engine, EngineError
from engine.pipeline import standardize_series, write_series
from engine.registry import LINEAR_FILTER_KIND

PARTIAL_PREFIX: Final = ".partial-"
_TERMINATE_GRACE_S: Final = 5.0


class WorkerEngines:
    """A worker's engines: loaded once each, on the worker's device (None: the device each
    engine is configured with)."""

    def __init__(self, config: NodeConfig, device: str | None) -> None:
        self.cache = EngineCache(config)
        self.device = device

    def load(self, ec: EngineConfig) -> Engine:
        return self.cache.load(ec, self.device or ec.device)

    def device_of(self, ec: EngineConfig) -> str:
        return self.device or ec.device


def partial_dir(output: Path, job: PlannedJob) -> Path:
    return output / f"{PARTIAL_PREFIX}{job.series.series_uid}"


def run_job(
    job: PlannedJob, engines: WorkerEngines, config: NodeConfig, output: Path
) -> JobOutcome:
    """Standardize one series into `output`. Never raises for the series' own problems (bad
    input, outside the envelope with action fail, a full disk): they are a FAILED outcome."""
    started = time.monotonic()
    device = engines.device_of(job.engine)

    def failed(error: str, *, unavailable: bool = False) -> JobOutcome:
        return JobOutcome(
            job.index,
            JobStatus.FAILED,
            time.monotonic() - started,
            device,
            error=error,
            engine_unavailable=unavailable,
        )

    try:
        engine = engines.load(job.engine)
    except EngineError as exc:
        return failed(f"engine {job.engine.name!r} cannot be loaded: {exc}", unavailable=True)
    policy = EnvelopePolicy(job.outside_envelope, lambda: engines.load(job.fallback))
    partial = partial_dir(output, job)
    try:
        result = standardize_series(
            job.series.paths, engine, derived_options(config), envelope=policy
        )
        shutil.rmtree(partial, ignore_errors=True)
        write_series(result.datasets, partial)
        final = output / result.series_instance_uid
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    except OutsideEnvelopeError as exc:
        return failed(str(exc))  # our own sentence: the engine and the measurements
    except Exception as exc:  # noqa: BLE001 - any failure of one series is reported, the run goes on
        shutil.rmtree(partial, ignore_errors=True)
        return failed(safe_error_text(exc))
    return JobOutcome(
        job.index,
        JobStatus.DONE,
        time.monotonic() - started,
        # the linear filter runs on the CPU whatever the device (engine/registry.py)
        "cpu" if result.identity.name == LINEAR_FILTER_KIND else device,
        out_dir=final,
        n_slices=result.n_slices,
        engine=result.identity.short,
        envelope=result.envelope,
    )


# ---- worker processes ----------------------------------------------------------------------------

_WORKER: dict[str, tuple[WorkerEngines, NodeConfig]] = {}


def _init_worker(
    config: NodeConfig,
    devices: multiprocessing.SimpleQueue[str | None],
    fmt: str,
    level: str,
    cpu_sharing: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    configure_process(fmt, level)
    device = devices.get()
    _WORKER["state"] = (WorkerEngines(config, device), config)
    if device in (None, "cpu"):
        share_cpus(cpu_sharing)  # the CPU workers split the cores (engine/cpu_threads.py)


def _work(job: PlannedJob, output: Path) -> JobOutcome:
    engines, config = _WORKER["state"]
    return run_job(job, engines, config, output)


def _context(jobs: Sequence[PlannedJob]) -> multiprocessing.context.ForkServerContext:
    engine_process_environment()  # inherited by the fork server when this starts it
    ctx = multiprocessing.get_context("forkserver")
    modules = ["dicom_node.offline_runner"]
    if any(k != LINEAR_FILTER_KIND for j in jobs for k in (j.engine.kind, j.fallback.kind)):
        modules += ["torch", "engine.ltdiff.engine"]
    ctx.set_forkserver_preload(modules)  # ignored when the fork server already runs
    return ctx


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers (their series are abandoned)."""
    processes = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(_TERMINATE_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


def remove_partials(output: Path, jobs: Sequence[PlannedJob]) -> None:
    for job in jobs:
        shutil.rmtree(partial_dir(output, job), ignore_errors=True)


WORKER_DIED: Final = "a worker process died (killed, out of memory?); the series was not finished"


def lost(job: PlannedJob, error: str = WORKER_DIED) -> JobOutcome:
    """The outcome of a series whose worker went away before it answered: FAILED, reported."""
    return JobOutcome(job.index, JobStatus.FAILED, 0.0, "-", error=error)


class Recorder:
    """Collects the outcomes in completion order and hands each to `on_outcome` (in the calling
    process); raises EngineError for an outcome whose engine could not be loaded (the run stops:
    a configuration error). Shared by the local run and the cluster run."""

    def __init__(self, on_outcome: Callable[[PlannedJob, JobOutcome], None]) -> None:
        self.outcomes: list[JobOutcome] = []
        self.on_outcome = on_outcome

    def __call__(self, job: PlannedJob, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)
        self.on_outcome(job, outcome)
        if outcome.engine_unavailable:
            raise EngineError(outcome.error)


def run_plan(
    jobs: Sequence[PlannedJob],
    config: NodeConfig,
    output: Path,
    devices: Sequence[str | None],
    on_outcome: Callable[[PlannedJob, JobOutcome], None],
    *,
    log_format: str = "auto",
    log_level: str = "warning",
) -> list[JobOutcome]:
    """Run `jobs` on one worker per entry of `devices` (one: in this process), calling
    `on_outcome` in this process as each series finishes. Returns the outcomes in completion
    order. Raises EngineError when a job's engine cannot be loaded (the run stops: a
    configuration error), KeyboardInterrupt after stopping cleanly on Ctrl-C."""
    record = Recorder(on_outcome)
    if len(devices) <= 1:
        engines = WorkerEngines(config, devices[0] if devices else None)
        try:
            for job in jobs:
                record(job, run_job(job, engines, config, output))
        except BaseException:
            remove_partials(output, jobs)
            raise
        return record.outcomes

    ctx = _context(jobs)
    slots: multiprocessing.SimpleQueue[str | None] = ctx.SimpleQueue()
    for device in devices:
        slots.put(device)
    pool = ProcessPoolExecutor(
        max_workers=len(devices),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(config, slots, log_format, log_level, sum(d in (None, "cpu") for d in devices)),
    )
    try:
        pending: dict[Future[JobOutcome], PlannedJob] = {
            pool.submit(_work, job, output): job for job in jobs
        }
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    outcome = lost(job)
                record(job, outcome)
    except BaseException:
        _stop(pool)
        remove_partials(output, jobs)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return record.outcomes
