"""Exporting a derived series while the engine process still writes it: the engine process
reports its output in chunks as they become durable, the worker queues their export at once,
and a job that does not finish withdraws what is still pending (what the destination confirmed
stays sent; the rerun writes the same UIDs)."""

from __future__ import annotations

from pathlib import Path

from tests_support import node_config, write_series

from dicom_node import engine_host
from dicom_node.engine_host import EngineCache, EngineJob, EngineResult, run_job
from dicom_node.store import ExportState, InstanceRecord, JobKind, JobState, JobStore

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_run_job_reports_each_chunk_but_the_last_once_it_is_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_host, "WRITE_CHUNK", 2)
    config = node_config(tmp_path / "state", None)
    paths = tuple(str(p) for p in write_series(tmp_path / "in", n_slices=5, uid_seed="chunks"))
    chunks: list[tuple[tuple[str, str, str, str], ...]] = []

    def on_written(chunk: tuple[tuple[str, str, str, str], ...]) -> None:
        assert all(Path(p).is_file() for _, _, p, _ in chunk), "reported before it was written"
        chunks.append(chunk)

    job = EngineJob(1, config.routes[0].engine, paths, str(tmp_path / "out"))
    result = run_job(job, EngineCache(config), config, "cpu", on_written=on_written)
    assert isinstance(result, EngineResult), result
    assert [len(c) for c in chunks] == [2, 2], "5 files in chunks of 2; the last one not early"
    early = [o for c in chunks for o in c]
    assert early == list(result.outputs[:4]), "the result lists every file, the early ones too"
    assert {ts for _, _, _, ts in result.outputs} == {"1.2.840.10008.1.2.1"}


def _record(sop: str) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        series_uid="1.2.3",
        study_uid="1.2",
        sop_class_uid=CT,
        transfer_syntax="1.2.840.10008.1.2.1",
        path=Path("/spool/x.dcm"),
        size_bytes=1,
        calling_ae="MOD",
        header={"Modality": "CT"},
        own_output=False,
        expected_count=None,
    )


def _processing_job(store: JobStore) -> int:
    store.record_instance(_record("1.2.3.1"), now=100.0)
    job_id = store.complete_series(
        "1.2.3", 0, job_kind=JobKind.STANDARDIZE, rule="r", engine="e", destinations=("pacs",)
    )
    assert job_id is not None
    assert store.claim_job("w", (JobKind.STANDARDIZE,)) is not None
    return job_id


def _outs(n: int, first: int = 0) -> list[tuple[str, str, Path]]:
    return [(f"9.9.{i}", CT, Path(f"/o/{i}.dcm")) for i in range(first, first + n)]


def _states(store: JobStore) -> list[tuple[str, str]]:
    return [
        (r["sop_uid"], r["state"])
        for r in store._query("SELECT sop_uid, state FROM exports ORDER BY sop_uid")
    ]


def test_early_exports_are_queued_while_processing_and_the_result_queues_the_rest(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    job_id = _processing_job(store)
    woken: list[tuple[str, ...]] = []
    store.on_exports_queued(lambda d: woken.append(tuple(d)))
    assert store.queue_outputs(job_id, _outs(2), ("pacs",), transfer_syntaxes={"9.9.0": "1.2"})
    assert woken == [("pacs",)], "the exporter is woken for the early chunk"
    assert store.job(job_id).state is JobState.PROCESSING, "the job is not exporting yet"
    store.mark_sent([r.id for r in store.due_exports("pacs", 1e12)][:1])
    assert store.export_totals(job_id, "pacs") is None, "no total while the output is written"
    store.start_export(job_id, _outs(3), ("pacs",), derived_series_uid="9.9", summary={})
    assert store.job(job_id).state is JobState.EXPORTING
    assert _states(store) == [
        ("9.9.0", ExportState.SENT.value),
        ("9.9.1", ExportState.PENDING.value),
        ("9.9.2", ExportState.PENDING.value),
    ], "each instance queued once; the one confirmed early stays sent"
    (row,) = [r for r in store.due_exports("pacs", 1e12) if r.sop_uid == "9.9.1"]
    assert row.transfer_syntax is None
    store.close()


def test_a_job_that_does_not_finish_withdraws_its_pending_early_exports(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    job_id = _processing_job(store)
    store.queue_outputs(job_id, _outs(3), ("pacs",))
    store.mark_sent([store.due_exports("pacs", 1e12)[0].id])
    assert store.record_crash(job_id, "engine process died", max_attempts=3) is JobState.QUEUED
    assert _states(store) == [("9.9.0", ExportState.SENT.value)], "pending ones withdrawn"
    assert store.claim_job("w", (JobKind.STANDARDIZE,)) is not None  # the rerun
    store.queue_outputs(job_id, _outs(2), ("pacs",))
    store.release_job(job_id)  # the node stops mid-write
    assert _states(store) == [("9.9.0", ExportState.SENT.value)]
    store.claim_job("w", (JobKind.STANDARDIZE,))
    store.queue_outputs(job_id, _outs(2), ("pacs",))
    store.fail_job(job_id, "bad input")
    assert _states(store) == [("9.9.0", ExportState.SENT.value)]
    assert not store.queue_outputs(job_id, _outs(2), ("pacs",)), "only while processing"
    assert _states(store) == [("9.9.0", ExportState.SENT.value)]
    store.close()


def test_a_node_killed_mid_write_withdraws_the_early_exports_at_restart(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    job_id = _processing_job(store)
    store.queue_outputs(job_id, _outs(3), ("pacs",))
    store.close()
    store = JobStore(tmp_path / "db.sqlite3")  # the restart after kill -9
    assert store.requeue_interrupted(max_attempts=3) == {job_id: JobState.QUEUED}
    assert _states(store) == [], "the rerun queues its output again"
    store.close()
