"""Job store: durable state machine for series, jobs and exports, resumable after restart."""

from pathlib import Path

import pytest

from dicom_node.export import backoff_seconds
from dicom_node.store import (
    ExportState,
    InstanceRecord,
    JobKind,
    JobState,
    JobStore,
    ReceiveOutcome,
    SeriesState,
)


def _rec(sop: str, series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        series_uid=series,
        study_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/spool/{series}/{sop}.dcm"),
        size_bytes=10,
        calling_ae="PACS",
        header={"Modality": "CT"},
        own_output=False,
        expected_count=None,
    )


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _complete(store, series="1.2.3", revision=0, dests=("pacs",)):
    return store.complete_series(
        series,
        revision,
        job_kind=JobKind.STANDARDIZE,
        rule="r",
        engine="linear",
        destinations=dests,
        now=200.0,
    )


def test_duplicate_instance_is_recorded_once(store):
    assert store.record_instance(_rec("1.2.3.1"), now=100.0) is ReceiveOutcome.NEW
    assert store.record_instance(_rec("1.2.3.1"), now=101.0) is ReceiveOutcome.DUPLICATE
    (s,) = store.receiving_series()
    assert s.n_instances == 1
    assert s.last_received == 100.0


def test_job_lifecycle_to_done(store):
    for i in range(3):
        store.record_instance(_rec(f"1.2.3.{i + 1}"), now=100.0)
    job_id = _complete(store)
    assert store.series("1.2.3").state is SeriesState.COMPLETE
    job = store.claim_job("w", (JobKind.STANDARDIZE,))
    assert job.id == job_id and job.state is JobState.PROCESSING
    assert store.claim_job("w2", (JobKind.STANDARDIZE,)) is None, "a job is claimed once"
    outs = [(f"9.9.{i}", "1.2.840.10008.5.1.4.1.1.2", Path(f"/o/{i}.dcm")) for i in range(3)]
    assert (
        store.start_export(job_id, outs, ("pacs",), derived_series_uid="9.9", summary={})
        is JobState.EXPORTING
    )
    due = store.due_exports("pacs", now=1e12)
    assert len(due) == 3
    store.mark_sent([r.id for r in due])
    ((settled, state),) = store.settle_exporting_jobs()
    assert settled == job_id and state is JobState.DONE


def test_failed_exports_back_off_then_become_dead_letters_and_retry_revives_them(store):
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    store.claim_job("w", (JobKind.STANDARDIZE,))
    store.start_export(
        job_id,
        [("9.9.1", "1.2", Path("/o/1.dcm"))],
        ("pacs",),
        derived_series_uid="9.9",
        summary={},
        now=100.0,
    )

    def backoff(a):
        return backoff_seconds(a, 10, 1000)

    (row,) = store.due_exports("pacs", now=100.0)
    assert store.mark_export_failed([row], "down", max_attempts=3, backoff=backoff, now=100.0) == 0
    assert store.due_exports("pacs", now=109.0) == [], "backoff: not due before 10 s"
    (row,) = store.due_exports("pacs", now=110.0)
    assert row.attempts == 1
    store.mark_export_failed([row], "down", max_attempts=3, backoff=backoff, now=110.0)
    (row,) = store.due_exports("pacs", now=130.0)
    assert store.mark_export_failed([row], "down", max_attempts=3, backoff=backoff, now=130.0) == 1
    ((_, state),) = store.settle_exporting_jobs()
    assert state is JobState.FAILED
    report = store.status_report()
    assert report["dead_letters"][0]["instances"] == 1
    assert "dead-letter" in store.retry_job(job_id)
    assert store.job(job_id).state is JobState.EXPORTING
    (row,) = store.due_exports("pacs", now=1e12)
    assert row.attempts == 0


def test_backoff_doubles_and_caps():
    assert [backoff_seconds(a, 10, 60) for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_interrupted_processing_is_requeued_on_restart(tmp_path):
    s = JobStore(tmp_path / "db.sqlite3")
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.claim_job("w", (JobKind.STANDARDIZE,))
    s.close()  # the node dies mid-job
    s2 = JobStore(tmp_path / "db.sqlite3")
    assert s2.requeue_interrupted(max_attempts=3) == {job_id: JobState.QUEUED}
    job = s2.claim_job("w", (JobKind.STANDARDIZE,))
    assert job.id == job_id and job.process_attempts == 2 and job.crashes == 1
    s2.close()


def test_late_instance_reopens_series_and_supersedes_queued_job(store):
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    assert store.record_instance(_rec("1.2.3.2"), now=300.0) is ReceiveOutcome.REOPENED
    assert store.job(job_id).state is JobState.SUPERSEDED
    (s,) = store.receiving_series()
    assert s.revision == 1 and s.n_instances == 2
    assert _complete(store, revision=0) is None, "an old revision cannot complete the series"
    assert _complete(store, revision=1) is not None


def test_failed_processing_can_be_retried(store):
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    store.claim_job("w", (JobKind.STANDARDIZE,))
    store.fail_job(job_id, "SeriesError: bad")
    assert "queued for processing again" in store.retry_job(job_id)
    assert store.claim_job("w", (JobKind.STANDARDIZE,)).id == job_id
    with pytest.raises(KeyError):
        store.retry_job(999)


def test_discarded_series_is_purgeable_after_retention(store):
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    store.complete_series(
        "1.2.3", 0, job_kind=None, rule=None, engine=None, destinations=(), now=100.0
    )
    assert store.series("1.2.3").state is SeriesState.DISCARDED
    assert store.purgeable(older_than=50.0) == ([], [])
    assert store.purgeable(older_than=150.0) == (["1.2.3"], [])
    store.forget_series("1.2.3")
    assert store.series("1.2.3") is None


def test_export_state_values_are_stable():
    # These strings are stored in the database and shown to operators: changing them breaks both.
    assert [s.value for s in ExportState] == ["pending", "sent", "dead"]
    assert [s.value for s in JobState] == [
        "queued",
        "processing",
        "exporting",
        "done",
        "failed",
        "superseded",
    ]
