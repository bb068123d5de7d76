"""Two engine workers on one device (`node.workers = ["cpu", "cpu"]`, issue 11 item 4): two series
are processed at the same time, each by its own worker thread and engine process, and both come
back standardized as one engine alone makes them.

The test does not rely on timing to see the overlap: each worker's dispatch to its engine process
is wrapped so that it records what ran where and waits at a barrier for the other worker to
dispatch too. The barrier opens only if both workers hold a job at once; a node that serialized
its workers would leave it closed (and the test would fail on the barrier's timeout)."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom import dcmread
from tests_support import node_config, wait_until, write_series

from dicom_node.config import DestinationConfig
from dicom_node.engine_host import EngineJob, EngineOutcome, derived_options
from dicom_node.export import send_paths
from dicom_node.worker import EngineWorker
from engine.pipeline import standardize_series
from engine.registry import load_engine

_BARRIER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Run:
    """One job's dispatch to an engine process, as the test recorded it."""

    worker: str
    engine_pid: int | None
    job: int
    started: float  # time.monotonic() when the worker dispatched the job
    finished: float  # when the engine process answered


def _jobs(db: Path) -> list[tuple[int, str, str, str]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(
            con.execute("SELECT id, state, worker, derived_series_uid FROM jobs ORDER BY id")
        )
    finally:
        con.close()


def test_two_cpu_workers_run_two_series_at_once_in_two_engine_processes(
    tmp_path, archive, start_node, monkeypatch
):
    config = replace(node_config(tmp_path / "state", archive.port), workers=("cpu", "cpu"))
    node = start_node(config)
    workers = [t for t in node.threads if isinstance(t, EngineWorker)]
    assert [w.name for w in workers] == ["engine-cpu-0", "engine-cpu-1"]
    both_dispatched = threading.Barrier(2, timeout=_BARRIER_TIMEOUT_S)
    runs: list[Run] = []
    for worker in workers:

        def run(
            job: EngineJob,
            stop: threading.Event,
            on_written: Any = None,
            worker: EngineWorker = worker,
            real_run=worker.engine.run,
        ) -> EngineOutcome:
            started = time.monotonic()
            both_dispatched.wait()  # opens only while the other worker holds a job too
            outcome = real_run(job, stop, on_written)
            runs.append(Run(worker.name, worker.engine.pid, job.job_id, started, time.monotonic()))
            return outcome

        monkeypatch.setattr(worker.engine, "run", run)

    series = [write_series(tmp_path / f"s{k}", uid_seed=f"two-workers-{k}") for k in range(2)]
    to_node = DestinationConfig("node", "LTDIFF", "127.0.0.1", node.port)
    for paths in series:
        assert not send_paths(to_node, "PACS", paths).failed

    db = config.state_dir / "ltdiff-node.sqlite3"
    wait_until(
        lambda: (
            [state for _, state, _, _ in _jobs(db)] == ["done", "done"] or both_dispatched.broken
        ),
        180,
        f"both jobs done: {_jobs(db)}",
    )
    assert not both_dispatched.broken, (
        f"the two workers never held a job at the same time: {runs}, jobs {_jobs(db)}"
    )

    # Recorded facts: two workers, two engine processes, overlapping in time.
    assert sorted(r.worker for r in runs) == ["engine-cpu-0", "engine-cpu-1"], runs
    assert len({r.engine_pid for r in runs}) == 2 and None not in {r.engine_pid for r in runs}
    first, second = sorted(runs, key=lambda r: r.started)
    assert second.started < first.finished, f"the jobs did not overlap: {runs}"
    jobs = _jobs(db)
    assert {worker for _, _, worker, _ in jobs} == {"engine-cpu-0", "engine-cpu-1"}, jobs

    # Nothing lost: each series derived as the engine alone derives it, and exported.
    engine = load_engine("linear-filter")
    for paths in series:
        expected = standardize_series(paths, engine, derived_options(config))
        assert expected.series_instance_uid in {uid for _, _, _, uid in jobs}
        got = {
            str(ds.SOPInstanceUID): ds
            for ds in map(dcmread, archive.series_files(expected.series_instance_uid))
        }
        assert sorted(got) == sorted(str(ds.SOPInstanceUID) for ds in expected.datasets)
        for ds in expected.datasets:
            assert got[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
