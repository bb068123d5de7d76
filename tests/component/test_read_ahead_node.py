"""Reading ahead in the node: the scheduler points the first worker at the series that will be
its next job, the worker passes the engine process each file once, and the engine process
reads them while idle and hands them to that series' job only (engine/read_ahead.py)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom import dcmread
from tests_support import node_config, wait_until, write_series

from dicom_node.engine_host import (
    EngineCache,
    EngineJob,
    EngineProcess,
    EngineResult,
    ReadAheadHint,
    run_job,
)
from dicom_node.service import Node
from dicom_node.store import InstanceRecord, JobStore
from dicom_node.worker import EngineWorker
from engine.read_ahead import ReadAhead

CT = "1.2.840.10008.5.1.4.1.1.2"


def _bytes_read(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def _pixels(outputs: tuple[tuple[str, str, str, str], ...]) -> dict[str, bytes]:
    return {sop: dcmread(path).PixelData for sop, _, path, _ in outputs}


def test_a_job_uses_the_files_read_ahead_and_writes_the_same_series(tmp_path):
    config = node_config(tmp_path / "state", None)
    files = write_series(tmp_path / "in", n_slices=5, uid_seed="ahead-job")
    paths = tuple(str(p) for p in files)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    engines = EngineCache(config)

    def job(n: int) -> EngineJob:
        return EngineJob(
            n, config.routes[0].engine, paths, str(tmp_path / f"out{n}"), series_uid=series_uid
        )

    plain = run_job(job(1), engines, config, "cpu")
    cache = ReadAhead(config.jobs.read_ahead_bytes)
    cache.read(series_uid, paths)
    ahead = run_job(job(2), engines, config, "cpu", read_ahead=cache)
    assert isinstance(plain, EngineResult) and isinstance(ahead, EngineResult)
    assert (plain.summary["read_ahead_files"], ahead.summary["read_ahead_files"]) == (0, 5)
    assert plain.derived_series_uid == ahead.derived_series_uid
    assert _pixels(plain.outputs) == _pixels(ahead.outputs)


def test_the_engine_process_reads_ahead_while_idle_for_that_series_only(tmp_path):
    config = node_config(tmp_path / "state", None)
    files = write_series(tmp_path / "in", n_slices=6, uid_seed="ahead-process")
    paths = tuple(str(p) for p in files)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    size = sum(p.stat().st_size for p in files)
    engine = EngineProcess(config, "cpu", "read-ahead-test")
    engine.start()
    try:
        assert engine.pid is not None

        def read_ahead_all(series: str) -> None:
            before = _bytes_read(engine.pid)
            assert engine.hint_read_ahead(ReadAheadHint(series, paths))
            # Each file is read whole; once the last one's bytes are in, it is kept.
            wait_until(lambda: _bytes_read(engine.pid) - before >= size, 120, "the read-ahead")

        def run(n: int, series: str) -> EngineResult:
            request = EngineJob(
                n, config.routes[0].engine, paths, str(tmp_path / f"out{n}"), series_uid=series
            )
            result = engine.run(request, threading.Event())
            assert isinstance(result, EngineResult), result
            return result

        read_ahead_all(series_uid)
        assert run(1, series_uid).summary["read_ahead_files"] == 6
        assert run(2, series_uid).summary["read_ahead_files"] == 0, "dropped after the job"

        read_ahead_all("another series")
        assert run(3, series_uid).summary["read_ahead_files"] == 0, "not another series' files"

        read_ahead_all(series_uid)
        assert engine.hint_read_ahead(ReadAheadHint(series_uid, None))  # forget them
        assert run(4, series_uid).summary["read_ahead_files"] == 0
    finally:
        engine.close()


class _HintRecorder:
    def __init__(self) -> None:
        self.hints: list[ReadAheadHint] = []

    def hint_read_ahead(self, hint: ReadAheadHint) -> bool:
        self.hints.append(hint)
        return True

    def close(self) -> None:
        pass


def _record(series: str, n: int, kernel: str = "Br40d") -> InstanceRecord:
    return InstanceRecord(
        sop_uid=f"{series}.{n}",
        series_uid=series,
        study_uid="1.2",
        sop_class_uid=CT,
        transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/spool/{series}.{n}.dcm"),
        size_bytes=1,
        calling_ae="MOD",
        header={"Modality": "CT", "ConvolutionKernel": kernel},
        own_output=False,
        expected_count=None,
    )


def test_the_worker_passes_each_file_once_and_the_end_of_the_series(tmp_path):
    config = node_config(tmp_path / "state", None)
    store = JobStore(tmp_path / "db.sqlite3")
    stop, wake = threading.Event(), threading.Event()
    worker = EngineWorker(
        "cpu", 0, store, config=config, stop=stop, wake=wake, on_done=lambda: None
    )
    recorder = _HintRecorder()
    worker.engine = recorder  # type: ignore[assignment]
    store.record_instance(_record("1.9.1", 1), now=1.0)
    store.record_instance(_record("1.9.1", 2), now=1.1)

    worker._run_once()  # no job: nothing expected yet, nothing passed
    assert recorder.hints == []
    worker.read_ahead("1.9.1")
    assert wake.is_set(), "the worker is woken to pass the files at once"
    worker._run_once()
    store.record_instance(_record("1.9.1", 3), now=1.2)
    worker._run_once()
    worker._run_once()
    assert [(h.series_uid, h.paths) for h in recorder.hints] == [
        ("1.9.1", ("/spool/1.9.1.1.dcm", "/spool/1.9.1.2.dcm")),
        ("1.9.1", ("/spool/1.9.1.3.dcm",)),
    ]
    worker.read_ahead(None)
    worker._run_once()
    worker._run_once()
    assert recorder.hints[-1] == ReadAheadHint("1.9.1", None)
    assert len(recorder.hints) == 3, "forgotten once"
    store.close()


def test_a_defect_in_reading_ahead_is_logged_once_and_does_not_stop_the_worker(tmp_path, caplog):
    config = node_config(tmp_path / "state", None)
    store = JobStore(tmp_path / "db.sqlite3")
    worker = EngineWorker(
        "cpu",
        0,
        store,
        config=config,
        stop=threading.Event(),
        wake=threading.Event(),
        on_done=lambda: None,
    )
    recorder = _HintRecorder()
    worker.engine = recorder  # type: ignore[assignment]
    store.record_instance(_record("1.9.2", 1), now=1.0)
    real = store.instances
    store.instances = lambda uid: (_ for _ in ()).throw(RuntimeError("a bug"))  # type: ignore[method-assign]
    worker.read_ahead("1.9.2")
    caplog.set_level(logging.ERROR)
    worker._run_once()
    worker._run_once()
    events = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    assert [e.get("event") for e in events] == ["worker.read_ahead_error"], "logged once"
    store.instances = real  # type: ignore[method-assign]
    worker.read_ahead("1.9.3")  # another series is tried again
    store.record_instance(_record("1.9.3", 1), now=1.1)
    worker._run_once()
    assert [h.series_uid for h in recorder.hints] == ["1.9.3"]
    store.close()


def test_the_scheduler_points_at_the_routed_series_that_becomes_stable_first(tmp_path):
    config = node_config(tmp_path / "state", None)
    node = Node(config)
    chosen: list[str | None] = []

    class Worker:
        def read_ahead(self, series_uid: str | None) -> None:
            chosen.append(series_uid)

    node._read_ahead_worker = Worker()  # type: ignore[assignment]
    try:
        node.schedule_once(now=10.0)
        node.store.record_instance(_record("1.8.1", 1, kernel="Bl64d"), now=10.0)  # not routed
        node.store.record_instance(_record("1.8.2", 1), now=10.2)
        node.store.record_instance(_record("1.8.3", 1), now=10.1)
        node.schedule_once(now=10.3)
        node.store.record_instance(_record("1.8.3", 2), now=10.4)  # 1.8.2 is now older
        node.schedule_once(now=10.4)
        assert chosen == [None, "1.8.3", "1.8.2"]
    finally:
        node.store.close()
