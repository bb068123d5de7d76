"""`ltdiff-node standardize --scheduler ADDRESS | --local-cluster N`: the `cluster` extra, and
what runs on each Dask worker.

An archive (thousands of series) is standardized on an existing Dask distributed cluster, one
task per series (docs/CLUSTER.md says why Dask rather than Ray). The client side, which needs
the `distributed` package, is `dicom_node.cluster_runner`; this module imports nothing of Dask,
so the CLI can check for the extra first and name it (`missing_package`, `install_hint`).

On a worker, a task calls `run_series`: the local run's own per-series function
(`dicom_node.offline_runner.run_job`: written to a partial folder, renamed when complete), with
the engines loaded once per worker thread and reused by its later tasks (`worker_engines`;
workers started with one thread each, as docs/CLUSTER.md asks, load them once per process).
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicom_node.config import NodeConfig
from dicom_node.logs import configure_process
from dicom_node.offline import JobOutcome, PlannedJob
from dicom_node.offline_runner import WorkerEngines, run_job
from engine.cpu_threads import share_cpus

EXTRA: Final = "cluster"
DISTRIBUTION: Final = "distributed"
"""The package of the extra (pyproject.toml's `cluster` extra; the `distributed` module)."""
GPU_RESOURCE: Final = "GPU"
"""The Dask worker resource a series on a GPU asks one of (`dask worker --resources GPU=1`)."""


class ClusterUnavailableError(Exception):
    """The cluster cannot be used (the scheduler cannot be reached, no worker offers a GPU)."""


def missing_package() -> str | None:
    """None when `distributed` imports here; else what is missing, with the reason where the
    package is present but its import fails."""
    try:
        importlib.import_module(DISTRIBUTION)
    except ModuleNotFoundError as error:
        if error.name == DISTRIBUTION:
            return DISTRIBUTION
        return f"{DISTRIBUTION} ({error})"
    except ImportError as error:
        return f"{DISTRIBUTION} ({error})"
    return None


def install_hint(missing: str, python: str = "python") -> str:
    """What to tell the user when `missing_package()` is not None; `python` is the interpreter
    of the install (sys.executable), so the command installs into the right one."""
    return "\n".join(
        [
            f"--scheduler and --local-cluster need the '{EXTRA}' extra, which this install "
            "leaves out (the node and a local standardize run do not need it).",
            f"Missing: {missing}.",
            f"Install it into this environment:  {python} -m pip install 'ltdiff-node[{EXTRA}]'",
            f"From a source checkout, `make install EXTRAS={EXTRA}` does the same.",
        ]
    )


def task_resources(device: str) -> dict[str, float] | None:
    """The worker resources one series asks for: one GPU on a CUDA device, none on the CPU."""
    return {GPU_RESOURCE: 1.0} if device.startswith("cuda") else None


# ---- on a worker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesResult:
    """What a task sends back: the outcome of its series and which process ran it."""

    outcome: JobOutcome
    worker: str  # "host:pid" of the worker process


_configured = threading.Lock()
_logging: list[tuple[str, str]] = []  # the (format, level) this worker process was configured with
_thread = threading.local()


def worker_engines(config: NodeConfig, device: str | None) -> WorkerEngines:
    """This worker thread's engines for `config` on `device`: made at its first series, reused
    by the next ones (a task for another configuration or device replaces them)."""
    cached: tuple[NodeConfig, str | None, WorkerEngines] | None = getattr(_thread, "engines", None)
    if cached is None or cached[0] != config or cached[1] != device:
        cached = (config, device, WorkerEngines(config, device))
        _thread.engines = cached
    return cached[2]


def _configure_logging(log_format: str, log_level: str) -> None:
    """Our log pipeline (no PHI, quiet DICOM libraries) in this worker process, once."""
    with _configured:
        if (log_format, log_level) not in _logging:
            configure_process(log_format, log_level)
            _logging.append((log_format, log_level))


def run_series(
    job: PlannedJob,
    config: NodeConfig,
    output: str,
    *,
    device: str | None,
    log_format: str,
    log_level: str,
    cpu_sharing: int | None = None,
) -> SeriesResult:
    """One Dask task: standardize `job`'s series into `output` (a folder every worker sees at the
    same path) exactly as a local run does. Never raises for the series' own problems.

    cpu_sharing: how many worker processes share this machine's cores (a local cluster knows;
    on a real cluster, start CPU workers with one process per machine or set OMP_NUM_THREADS)."""
    _configure_logging(log_format, log_level)
    if cpu_sharing is not None and device in (None, "cpu"):
        worker_engines(config, device)  # loads torch where a learned engine is configured
        share_cpus(cpu_sharing)
    outcome = run_job(job, worker_engines(config, device), config, Path(output))
    return SeriesResult(outcome, f"{socket.gethostname()}:{os.getpid()}")
