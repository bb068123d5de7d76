"""Running an offline plan (dicom_node/offline.py) on Dask distributed: one task per series.

The client (this process) connects to a running scheduler (`--scheduler tcp://host:8786`) or
starts a `LocalCluster` of N worker processes with one thread each (`--local-cluster N`),
submits one task per series (`dicom_node.cluster.run_series`: the local run's per-series
function), and hands each outcome, as it completes, to the same callback as the local run, so the
lines, the summary and the exit code are the local run's. A series on a CUDA device asks for one
`GPU` worker resource. Paths are made absolute before they are sent: IN_DIR, OUT_DIR and the
engine weights must be at the same paths on every worker (a shared file system).

A series whose task raised, or whose worker died more often than the scheduler allows
(KilledWorker), is a FAILED outcome, reported like any other; an engine that cannot be loaded
stops the run (EngineError), as in the local run. On Ctrl-C (or that stop) the tasks not finished
are cancelled, a local cluster is shut down, and the partial folders are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from distributed import Client, Future, KilledWorker, LocalCluster, as_completed

from dicom_node.cluster import (
    GPU_RESOURCE,
    ClusterUnavailableError,
    SeriesResult,
    run_series,
    task_resources,
)
from dicom_node.config import NodeConfig
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.offline import JobOutcome, PlannedJob
from dicom_node.offline_runner import Recorder, lost, remove_partials

log = get_logger("dicom_node.cluster_runner")

CONNECT_TIMEOUT_S: Final = 30.0
WORKER_KILLED: Final = (
    "the Dask worker running it died each time it was tried (killed, out of memory?); "
    "the series was not finished"
)


@dataclass(frozen=True)
class ClusterTarget:
    """Where to run: a scheduler's address, or a local cluster of `local_workers` processes.

    device: every series' engine device (None: each engine's configured device).
    """

    scheduler: str | None = None
    local_workers: int = 0
    device: str | None = None


@dataclass(frozen=True)
class ClusterRun:
    outcomes: list[JobOutcome]
    workers: int  # worker processes that ran at least one series


@contextmanager
def connect(target: ClusterTarget, *, gpu: bool) -> Iterator[Client]:
    """A client of the target's cluster (a local one is shut down on exit). Raises
    ClusterUnavailableError when the scheduler cannot be reached."""
    if target.scheduler is not None:
        try:
            client = Client(target.scheduler, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise ClusterUnavailableError(
                f"cannot reach the Dask scheduler at {target.scheduler}: {exc}"
            ) from exc
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=target.local_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # its HTTP server (health, metrics) on a free loopback port, not 8787
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            resources={GPU_RESOURCE: 1.0} if gpu else None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _check_gpu_workers(client: Client) -> None:
    """Series that need a GPU wait for a worker offering one: refuse a cluster whose connected
    workers offer none (workers that join later are not known yet)."""
    workers: dict[str, Any] = client.scheduler_info().get("workers", {})
    if workers and not any(w.get("resources", {}).get(GPU_RESOURCE) for w in workers.values()):
        raise ClusterUnavailableError(
            f"the series run on a GPU, and no worker of the cluster offers the resource "
            f"{GPU_RESOURCE}: start the workers with --resources {GPU_RESOURCE}=1"
        )


def _absolute(job: PlannedJob) -> PlannedJob:
    paths = tuple(p.resolve() for p in job.series.paths)
    return replace(job, series=replace(job.series, paths=paths))


def run_plan_on_cluster(
    jobs: Sequence[PlannedJob],
    config: NodeConfig,
    output: Path,
    target: ClusterTarget,
    on_outcome: Callable[[PlannedJob, JobOutcome], None],
    *,
    log_format: str = "auto",
    log_level: str = "warning",
) -> ClusterRun:
    """Run `jobs` as tasks of the target cluster, calling `on_outcome` in this process as each
    series finishes (its out_dir under `output` as given). Raises ClusterUnavailableError,
    EngineError (an engine cannot be loaded: the run stops), KeyboardInterrupt after cancelling
    the rest."""
    # distributed sets its loggers to info when imported: the run's lines are the report
    logging.getLogger("distributed").setLevel(log_level.upper())
    record = Recorder(on_outcome)
    devices = {job.index: target.device or job.engine.device for job in jobs}
    gpu = any(task_resources(d) for d in devices.values())
    ran_on: set[str] = set()
    try:
        with connect(target, gpu=gpu) as client:
            if gpu:
                _check_gpu_workers(client)
            log.info(
                "standardize.cluster",
                scheduler=target.scheduler or "local",
                workers=len(client.nthreads()),
                series=len(jobs),
            )
            futures: dict[Future[SeriesResult], PlannedJob] = {
                client.submit(
                    run_series,
                    _absolute(job),
                    config,
                    str(output.resolve()),
                    device=target.device,
                    log_format=log_format,
                    log_level=log_level,
                    cpu_sharing=target.local_workers or None,
                    pure=False,
                    resources=task_resources(devices[job.index]),
                ): job
                for job in jobs
            }
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    outcome = _outcome(job, future)
                    if isinstance(outcome, SeriesResult):
                        ran_on.add(outcome.worker)
                        outcome = outcome.outcome
                    if outcome.out_dir is not None:
                        outcome = replace(outcome, out_dir=output / outcome.out_dir.name)
                    record(job, outcome)
            except BaseException:
                client.cancel(list(futures))
                raise
    except BaseException:
        remove_partials(output, jobs)
        raise
    return ClusterRun(record.outcomes, len(ran_on))


def _outcome(job: PlannedJob, future: Future[SeriesResult]) -> SeriesResult | JobOutcome:
    """The task's result, or a FAILED outcome for a task that raised or was lost."""
    try:
        result: SeriesResult = future.result()
    except KilledWorker:
        return lost(job, WORKER_KILLED)
    except CancelledError:
        return lost(job, "the task was cancelled on the cluster; the series was not finished")
    except Exception as exc:  # noqa: BLE001 - e.g. a worker without ltdiff-node: report, go on
        return lost(job, f"the task failed on its worker: {safe_error_text(exc)}")
    return result
