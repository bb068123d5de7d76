"""Reception first (dicom_node/reception_first.py) with a real engine process: a running job is
stopped while instances arrive, continues once reception is quiet or its budget
(jobs.reception_first_s) is spent, and a stopped engine process still stops with the node."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from pydicom import dcmread
from tests_support import node_config, wait_until, write_series

from dicom_node import statuses
from dicom_node.config import NodeConfig
from dicom_node.engine_host import (
    EngineInterrupted,
    EngineJob,
    EngineOutcome,
    EngineProcess,
    EngineResult,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.store import JobStore
from dicom_node.worker import EngineWorker


class _Reception:
    """What the node's metrics say about reception: active (an instance just now) or quiet."""

    def __init__(self) -> None:
        self.active = True

    def last_instance_at(self) -> float | None:
        return time.monotonic() if self.active else None


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _config(tmp_path: Path, budget_s: float) -> NodeConfig:
    config = node_config(tmp_path / "state", None)
    return dataclasses.replace(
        config, jobs=dataclasses.replace(config.jobs, reception_first_s=budget_s)
    )


class _Running:
    """A job run by `engine` in a thread of its own."""

    def __init__(self, engine: EngineProcess, job: EngineJob, stop: threading.Event) -> None:
        self.outcome: EngineOutcome | None = None
        self._thread = threading.Thread(target=self._run, args=(engine, job, stop), daemon=True)
        self._thread.start()

    def _run(self, engine: EngineProcess, job: EngineJob, stop: threading.Event) -> None:
        self.outcome = engine.run(job, stop)

    def result(self, timeout: float = 120.0) -> EngineOutcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the job never finished"
        assert self.outcome is not None
        return self.outcome


def _job(tmp_path: Path, config: NodeConfig, n: int = 1) -> EngineJob:
    files = write_series(tmp_path / f"in{n}", n_slices=6, uid_seed=f"reception-first-{n}")
    return EngineJob(
        n,
        config.routes[0].engine,
        tuple(str(p) for p in files),
        str(tmp_path / f"out{n}"),
        series_uid=str(dcmread(files[0]).SeriesInstanceUID),
    )


def test_a_job_is_stopped_while_reception_is_active_and_finishes_once_it_is_quiet(tmp_path):
    config = _config(tmp_path, budget_s=600.0)
    reception = _Reception()
    engine = EngineProcess(config, "cpu", "reception-first", reception.last_instance_at)
    engine.start()
    try:
        assert engine.pid is not None
        pid = engine.pid
        running = _Running(engine, _job(tmp_path, config), threading.Event())
        wait_until(lambda: _state(pid) == "T", 60, "the engine process to be stopped")
        reception.active = False
        outcome = running.result()
        assert isinstance(outcome, EngineResult), outcome
        assert outcome.summary["slices_out"] == 6
        assert outcome.summary["paused_for_reception_s"] > 0
        assert _state(pid) != "T", "continued after its job"
    finally:
        engine.close()


def test_a_sender_that_never_stops_delays_a_job_by_the_budget_only(tmp_path):
    config = _config(tmp_path, budget_s=0.5)
    engine = EngineProcess(config, "cpu", "reception-budget", _Reception().last_instance_at)
    engine.start()
    try:
        outcome = _Running(engine, _job(tmp_path, config), threading.Event()).result()
        assert isinstance(outcome, EngineResult), outcome
        assert 0.5 <= outcome.summary["paused_for_reception_s"] < 5.0
    finally:
        engine.close()


def test_a_budget_of_zero_never_stops_the_engine_process(tmp_path):
    config = _config(tmp_path, budget_s=0.0)
    engine = EngineProcess(config, "cpu", "reception-off", _Reception().last_instance_at)
    engine.start()
    try:
        outcome = _Running(engine, _job(tmp_path, config), threading.Event()).result()
        assert isinstance(outcome, EngineResult), outcome
        assert "paused_for_reception_s" not in outcome.summary
    finally:
        engine.close()


def test_a_stopped_engine_process_is_killed_when_the_node_stops(tmp_path):
    config = _config(tmp_path, budget_s=600.0)
    engine = EngineProcess(config, "cpu", "reception-stop", _Reception().last_instance_at)
    engine.start()
    stop = threading.Event()
    try:
        assert engine.pid is not None
        pid = engine.pid
        running = _Running(engine, _job(tmp_path, config), stop)
        wait_until(lambda: _state(pid) == "T", 60, "the engine process to be stopped")
        stop.set()
        assert isinstance(running.result(), EngineInterrupted)
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or _state(pid) == "Z", 30, "exit")
        assert engine.pid is None
    finally:
        engine.close()


def test_the_worker_pauses_its_jobs_on_what_the_nodes_metrics_received(tmp_path):
    config = node_config(tmp_path / "state", None)
    store = JobStore(tmp_path / "db.sqlite3")
    metrics = NodeMetrics()
    worker = EngineWorker(
        "cpu",
        0,
        store,
        config=config,
        stop=threading.Event(),
        wake=threading.Event(),
        on_done=lambda: None,
        metrics=metrics,
    )
    try:
        assert worker.engine.last_instance_at is not None
        assert worker.engine.last_instance_at() is None
        metrics.instance_received(statuses.SUCCESS)
        assert worker.engine.last_instance_at() == metrics.last_instance_at
    finally:
        store.close()
