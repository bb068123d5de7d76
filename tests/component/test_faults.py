"""The fault suite of issue 8, part one: the node with real pynetdicom peers on loopback, one test
per defect the independent fault campaign found (hostile datasets: tests/component/test_hostile.py;
processes killed and disks filled for real: tests/interop/test_crashes.py).

Each test names the behaviour it protects; the defect number of the campaign is in its docstring.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from tests_support import node_config, wait_until, write_series

from dicom_node import statuses
from dicom_node.config import DestinationConfig, JobsConfig, NodeConfig
from dicom_node.export import echo, send_paths
from dicom_node.logs import configure_logging
from dicom_node.service import Node


def _to(node: Node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


def _jobs(node: Node) -> list[dict[str, object]]:
    return list(node.store.status_report(limit=50)["recent_jobs"])


def _job_in(node: Node, *states: str) -> dict[str, object] | None:
    jobs = [j for j in _jobs(node) if j["state"] in states]
    return jobs[0] if jobs else None


@pytest.fixture(scope="module")
def large_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """100 slices of 512 x 512: the engine process holds several hundred MB while it runs."""
    return write_series(
        tmp_path_factory.mktemp("large") / "src", n_slices=100, size=512, uid_seed="large"
    )


def _with_jobs(cfg: NodeConfig, **jobs: object) -> NodeConfig:
    return dataclasses.replace(cfg, jobs=dataclasses.replace(JobsConfig(), **jobs))


@pytest.mark.slow
def test_a_job_that_exhausts_engine_memory_fails_after_max_attempts_and_the_node_keeps_serving(
    tmp_path, archive, large_series
):
    """Defect 1 (poison pill): a job that grows the engine without bound is killed at
    jobs.memory_max_mb, retried, and ends failed after jobs.max_attempts, with the reason;
    the node keeps receiving and processing other series."""
    cfg = _with_jobs(
        node_config(tmp_path / "state", archive.port), memory_max_mb=256, max_attempts=2
    )
    node = Node(cfg)
    node.start()
    try:
        assert not send_paths(_to(node), "PACS", large_series).failed
        wait_until(lambda: _job_in(node, "failed"), 180, f"the job to fail: {_jobs(node)}")
        job = node.store.job(int(_job_in(node, "failed")["id"]))  # type: ignore[arg-type]
        assert job.crashes == 2 and job.process_attempts == 2
        assert "resident memory" in job.error and "jobs.memory_max_mb = 256" in job.error
        assert "given up after 2 attempt(s)" in job.error
        ok, what = echo(_to(node), "PACS")
        assert ok, what
        small = write_series(tmp_path / "small", n_slices=4, size=64, uid_seed="after-poison")
        assert not send_paths(_to(node), "PACS", small).failed
        wait_until(lambda: _job_in(node, "done"), 60, f"a later series is done: {_jobs(node)}")
    finally:
        node.stop()


@pytest.mark.slow
def test_an_engine_process_killed_mid_job_is_restarted_and_the_job_retried(
    tmp_path, archive, large_series
):
    """Defect 1: the engine process dying (as under the kernel's OOM killer) costs one attempt;
    the next attempt runs in a new engine process and the series is delivered."""
    node = Node(_with_jobs(node_config(tmp_path / "state", archive.port), max_attempts=3))
    node.start()
    try:
        worker = next(t for t in node.threads if hasattr(t, "engine"))
        first_pid = worker.engine.pid
        assert not send_paths(_to(node), "PACS", large_series).failed
        wait_until(lambda: _job_in(node, "processing"), 60, "the job to start")
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: _job_in(node, "done"), 180, f"the job to finish: {_jobs(node)}")
        (job_row,) = _jobs(node)
        assert job_row["crashes"] == 1 and job_row["process_attempts"] == 2
        assert worker.engine.pid not in (None, first_pid)
        assert len(archive.series_files(str(job_row["derived_series_uid"]))) == len(large_series)
    finally:
        node.stop()


@pytest.mark.slow
def test_stopping_the_node_mid_job_is_prompt_and_releases_the_job_uncounted(
    tmp_path, archive, large_series
):
    """Defect 1: SIGTERM no longer stopped a node whose job ran away; now the engine process is
    stopped, the job goes back to the queue without counting an attempt and runs after the
    restart."""
    cfg = node_config(tmp_path / "state", archive.port)
    node = Node(cfg)
    node.start()
    assert not send_paths(_to(node), "PACS", large_series).failed
    wait_until(lambda: _job_in(node, "processing"), 60, "the job to start")
    started = time.monotonic()
    node.stop()
    assert time.monotonic() - started < 20, "stop does not wait for the job"
    node = Node(cfg)
    node.start()
    try:
        (queued,) = _jobs(node)
        assert queued["state"] in ("queued", "processing", "exporting", "done")
        assert queued["crashes"] == 0
        wait_until(lambda: _job_in(node, "done"), 180, f"the job to finish: {_jobs(node)}")
    finally:
        node.stop()


def test_copies_of_one_instance_on_concurrent_associations_all_get_success(start_node, tmp_path):
    """Defect 6: the same SOP Instance over 4 associations at once got one false 0xA700
    (a shared temporary file name)."""
    node = start_node()
    paths = write_series(tmp_path / "dup", n_slices=5, size=64, uid_seed="concurrent-dup")
    datasets = [dcmread(p) for p in paths]
    associations = []
    for _ in range(4):
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
        assert assoc.is_established
        associations.append(assoc)
    statuses_seen: list[int] = []
    lock = threading.Lock()
    for ds in datasets:
        barrier = threading.Barrier(len(associations))

        def send(assoc, ds=ds, barrier=barrier) -> None:
            barrier.wait()
            status = int(assoc.send_c_store(ds).Status)
            with lock:
                statuses_seen.append(status)

        threads = [threading.Thread(target=send, args=(a,)) for a in associations]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for assoc in associations:
        assoc.release()
    assert statuses_seen == [statuses.SUCCESS] * (4 * len(datasets))
    series_uid = str(datasets[0].SeriesInstanceUID)
    files = sorted(p.name for p in (node.config.spool_dir / series_uid).iterdir())
    assert files == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets), "one file each"
    assert node.store.series(series_uid).n_instances == len(datasets)


def test_a_failure_after_the_spool_write_removes_the_file_and_answers_out_of_resources(
    start_node, tmp_path
):
    """Defect 9: an exception after the spool write returned a generic failure and left a file
    no record pointed to."""
    node = start_node(receiver_processes=0)  # the fault is injected into this process's store
    (path,) = write_series(tmp_path / "one", n_slices=1, size=32, uid_seed="orphan")
    ds = dcmread(path)

    def broken(_record):
        raise sqlite3.OperationalError("disk I/O error")

    node.store.record_instance = broken  # type: ignore[method-assign]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
    try:
        assert int(assoc.send_c_store(ds).Status) == statuses.OUT_OF_RESOURCES
    finally:
        assoc.release()
    series_dir = node.config.spool_dir / str(ds.SeriesInstanceUID)
    assert not series_dir.exists() or list(series_dir.iterdir()) == []


def test_orphans_and_partial_files_are_swept_at_start_up(tmp_path):
    """Defect 9: start-up sweeps files that no record points to."""
    cfg = node_config(tmp_path / "state", None)
    node = Node(cfg)
    node.start()
    try:
        series = write_series(tmp_path / "kept", n_slices=2, size=32, uid_seed="kept")
        assert not send_paths(_to(node), "PACS", series).failed
    finally:
        node.stop()
    orphan_dir = cfg.spool_dir / "1.2.826.0.1.3680043.99.1"
    orphan_dir.mkdir(parents=True)
    (orphan_dir / "1.2.826.0.1.3680043.99.1.1.dcm").write_bytes(b"never acknowledged")
    kept_uid = str(dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    partial = cfg.spool_dir / kept_uid / ".1.2.3.dcm.1.2.abc.tmp"
    partial.write_bytes(b"half written")
    node = Node(cfg)
    node.start()
    try:
        assert not orphan_dir.exists() and not partial.exists()
        assert len(list((cfg.spool_dir / kept_uid).iterdir())) == 2, "recorded files are kept"
    finally:
        node.stop()


def test_a_series_interrupted_by_a_long_stop_gets_a_fresh_window_after_the_restart(tmp_path):
    """Defect 7: the idle clock ran from before the stop, so after a stop longer than
    stable_age_s the half-received series was processed at start-up."""
    cfg = dataclasses.replace(
        node_config(tmp_path / "state", None),
        assembly=dataclasses.replace(node_config(tmp_path, None).assembly, stable_age_s=2.0),
    )
    series = write_series(tmp_path / "src", n_slices=8, size=32, uid_seed="interrupted")
    node = Node(cfg)
    node.start()
    assert not send_paths(_to(node), "PACS", series[:4]).failed
    node.stop()
    # the node was down for an hour: the recorded last instance is an hour old
    con = sqlite3.connect(cfg.database_path)
    con.execute("UPDATE series SET last_received = last_received - 3600")
    con.commit()
    con.close()
    node = Node(cfg)
    node.start()
    try:
        assert not send_paths(_to(node), "PACS", series[4:]).failed
        wait_until(lambda: _job_in(node, "done", "failed"), 60, "the series to be processed")
        (job,) = _jobs(node)
        assert job["n_instances"] == 8, "one job with the whole series"
        (row,) = sqlite3.connect(cfg.database_path).execute("SELECT completed_at FROM series")
        assert row[0] - node.started_at >= 2.0
    finally:
        node.stop()


def _canonical_lines(text: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") in ("series.done", "series.failed")]


def test_every_finished_job_logs_exactly_one_canonical_line(tmp_path, archive, capsys):
    """Defect 14: a job that failed in the engine logged job.failed but never series.failed."""
    configure_logging("json", "info")
    captured: list[str] = []

    def lines() -> list[dict[str, object]]:
        captured.append(capsys.readouterr().out)
        return _canonical_lines("".join(captured))

    node = Node(node_config(tmp_path / "state", archive.port))
    node.start()
    try:
        good = write_series(tmp_path / "good", n_slices=3, size=32, uid_seed="canon-good")
        assert not send_paths(_to(node), "PACS", good).failed
        wait_until(lambda: _job_in(node, "done"), 60, "the good series")
        bad = write_series(tmp_path / "bad", n_slices=3, size=32, uid_seed="canon-bad")
        for p in bad:  # pixel data too short for its rows and columns: fails in the engine
            ds = dcmread(p)
            ds.PixelData = ds.PixelData[:100]
            ds.save_as(p)
        assert not send_paths(_to(node), "PACS", bad).failed
        wait_until(lambda: _job_in(node, "failed"), 60, "the bad series")
        wait_until(lambda: len(lines()) >= 2, 10, "two canonical lines")
    finally:
        node.stop()
    found = lines()
    assert sorted(str(line["event"]) for line in found) == ["series.done", "series.failed"], found
    failed = next(line for line in found if line["event"] == "series.failed")
    assert failed["status"] == "failed" and failed["error"]


def test_a_start_that_fails_leaves_no_engine_process_running(tmp_path):
    """A node that cannot open its port stops its engine processes and database again."""
    first = Node(node_config(tmp_path / "a", None))
    first.start()
    try:
        base = node_config(tmp_path / "b", None)
        clash = dataclasses.replace(
            base, listener=dataclasses.replace(base.listener, port=first.port)
        )
        second = Node(clash)
        with pytest.raises(OSError, match="in use"):
            second.start()
        assert not [
            p for p in multiprocessing.active_children() if p.name.startswith("ltdiff-engine")
        ][1:], "the second node's engine process is gone"
    finally:
        first.stop()


def test_a_defect_in_the_worker_counts_as_a_crash_and_the_worker_goes_on(tmp_path, archive):
    # Reading ahead off: it lists the series' instances too, before the job does.
    node = Node(
        _with_jobs(node_config(tmp_path / "state", archive.port), max_attempts=1, read_ahead_mb=0)
    )
    real = node.store.instances
    calls = {"n": 0}

    def broken_once(series_uid):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real(series_uid)

    node.store.instances = broken_once  # type: ignore[method-assign]
    node.start()
    try:
        first = write_series(tmp_path / "one", n_slices=3, size=32, uid_seed="defect-1")
        assert not send_paths(_to(node), "PACS", first).failed
        wait_until(lambda: _job_in(node, "failed"), 60, "the first job to fail")
        failed = node.store.job(int(_job_in(node, "failed")["id"]))  # type: ignore[arg-type]
        assert "internal error in the worker (RuntimeError)" in failed.error
        second = write_series(tmp_path / "two", n_slices=3, size=32, uid_seed="defect-2")
        assert not send_paths(_to(node), "PACS", second).failed
        wait_until(lambda: _job_in(node, "done"), 60, "the worker still runs jobs")
    finally:
        node.stop()
