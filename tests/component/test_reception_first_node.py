"""Reception first (dicom_node/reception_first.py) with a real engine process: a running job is
stopped while instances arrive, continues once reception is quiet or its budget
(jobs.reception_first_s) is spent, and a stopped engine process still stops with the node."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection
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
    EngineProgress,
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


def _run_while_always_receiving(tmp_path: Path, budget_s: float) -> EngineResult:
    config = _config(tmp_path, budget_s=budget_s)
    engine = EngineProcess(config, "cpu", "reception-budget", _Reception().last_instance_at)
    engine.start()
    try:
        outcome = _Running(engine, _job(tmp_path, config), threading.Event()).result()
    finally:
        engine.close()
    assert isinstance(outcome, EngineResult), outcome
    return outcome


def test_a_sender_that_never_stops_delays_a_job_by_the_budget_only(tmp_path):
    outcome = _run_while_always_receiving(tmp_path, budget_s=0.5)
    assert 0.5 <= outcome.summary["paused_for_reception_s"] < 5.0


def test_a_budget_of_zero_never_stops_the_engine_process(tmp_path):
    outcome = _run_while_always_receiving(tmp_path, budget_s=0.0)
    assert "paused_for_reception_s" not in outcome.summary


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


def _answers_with_a_long_result(conn: Connection) -> None:
    """A stand-in engine process: one chunk written, then a result larger than a pipe holds
    (a 300-slice series' result is some 60 KB), so it is still writing when the node looks."""
    conn.recv()
    conn.send(EngineProgress(()))
    conn.send(EngineResult((), "1.2.3", {"padding": "x" * 400_000}))
    conn.recv()  # until the node closes it


def test_a_result_being_written_when_reception_starts_is_read_whole(tmp_path):
    """Stopping the engine process halfway through a message and then reading it would wait
    for ever: the rest can only come once the same thread continues the process. (If the
    node stopped it anyway, the job would end after the 2 s budget at best.)"""
    config = _config(tmp_path, budget_s=2.0)
    reception = _Reception()
    reception.active = False
    engine = EngineProcess(config, "cpu", "reception-half", reception.last_instance_at)
    parent_conn, child_conn = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_answers_with_a_long_result, args=(child_conn,), daemon=True
    )
    child.start()
    child_conn.close()
    engine._proc, engine._conn = child, parent_conn

    def reception_starts(_outputs: object) -> None:
        # Once the result's first bytes are in, its writer is blocked halfway (400 KB is more
        # than the socket holds) until the node reads: that is when reception starts.
        wait_until(lambda: parent_conn.poll(0), 60, "the result to start")
        reception.active = True

    job = EngineJob(1, "linear", ("unused",), str(tmp_path / "out"))
    done: list[EngineOutcome] = []
    thread = threading.Thread(
        target=lambda: done.append(engine.run(job, threading.Event(), reception_starts)),
        daemon=True,
    )
    thread.start()
    try:
        thread.join(60)
        assert done, "the node waited for the rest of a message from a stopped process"
        (outcome,) = done
        assert isinstance(outcome, EngineResult)
        assert len(outcome.summary["padding"]) == 400_000
        assert "paused_for_reception_s" not in outcome.summary, "not stopped while it wrote"
    finally:
        engine.close()
        child.join(10)
