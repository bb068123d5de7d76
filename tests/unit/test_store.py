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


class _Finished:
    """Collects the store's job-finished announcements."""

    def __init__(self) -> None:
        self.events: list[tuple[int, JobState]] = []

    def __call__(self, event) -> None:
        self.events.append((event.job.id, event.state))


@pytest.fixture
def watched(tmp_path):
    finished = _Finished()
    s = JobStore(tmp_path / "watched.sqlite3", on_job_finished=finished)
    yield s, finished
    s.close()


def test_a_job_that_takes_its_engine_down_fails_after_max_attempts(watched):
    """Defect 1: interrupted jobs were re-queued without a cap, so a poison series took the node
    down again on every restart."""
    store, finished = watched
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    for attempt in (1, 2):
        store.claim_job("w", (JobKind.STANDARDIZE,))
        state = store.record_crash(job_id, "engine process killed: memory", max_attempts=3)
        assert state is JobState.QUEUED, f"attempt {attempt} is retried"
        assert f"attempt {attempt} of 3" in store.job(job_id).error
    store.claim_job("w", (JobKind.STANDARDIZE,))
    assert store.record_crash(job_id, "engine process killed: memory", max_attempts=3) is (
        JobState.FAILED
    )
    job = store.job(job_id)
    assert job.state is JobState.FAILED and job.crashes == 3
    assert "memory" in job.error and "given up after 3" in job.error
    assert finished.events == [(job_id, JobState.FAILED)], "one canonical announcement"
    assert store.claim_job("w", (JobKind.STANDARDIZE,)) is None


def test_crashes_of_the_node_count_at_start_up_and_stop_a_restart_loop(tmp_path):
    path = tmp_path / "db.sqlite3"
    s = JobStore(path)
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.close()
    for restart in (1, 2):
        s = JobStore(path)
        assert s.claim_job("w", (JobKind.STANDARDIZE,)).id == job_id
        s.close()  # the node dies while processing (kill -9, out of memory)
        s = JobStore(path)
        expected = JobState.QUEUED if restart == 1 else JobState.FAILED
        assert s.requeue_interrupted(max_attempts=2) == {job_id: expected}
        s.close()
    s = JobStore(path)
    assert s.job(job_id).state is JobState.FAILED
    assert "stopped abnormally while processing" in s.job(job_id).error
    assert "queued for processing again" in s.retry_job(job_id)
    assert s.job(job_id).crashes == 0, "an operator retry resets the count"
    s.close()


def test_a_clean_stop_releases_the_job_without_counting_an_attempt(store):
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    store.claim_job("w", (JobKind.STANDARDIZE,))
    store.release_job(job_id)
    job = store.job(job_id)
    assert job.state is JobState.QUEUED and job.crashes == 0


def test_a_job_waiting_for_disk_is_not_claimed_before_its_time_and_shows_why(store):
    """Defect 8: a job that hit ENOSPC failed and needed a manual retry."""
    store.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(store)
    store.claim_job("w", (JobKind.STANDARDIZE,), now=300.0)
    store.defer_job(job_id, "disk full writing the output", not_before=360.0, now=300.0)
    assert store.claim_job("w", (JobKind.STANDARDIZE,), now=359.0) is None
    (waiting,) = store.status_report()["waiting"]
    assert waiting == {
        "job_id": job_id,
        "reason": "disk full writing the output",
        "next_attempt": 360.0,
    }
    job = store.claim_job("w", (JobKind.STANDARDIZE,), now=360.0)
    assert job.id == job_id and job.waiting is None
    assert store.status_report()["waiting"] == []


def test_every_terminal_transition_is_announced_once(watched):
    """Defect 14: one owner of job completion; every done/failed is announced exactly once."""
    store, finished = watched
    ids = {}
    for i, name in enumerate(("no-dest", "engine-fail", "exported", "dead")):
        series = f"1.2.{10 + i}"
        store.record_instance(_rec(f"{series}.1", series=series), now=100.0)
        dests = () if name == "no-dest" else ("pacs",)
        ids[name] = _complete(store, series=series, dests=dests)
    outs = [("9.9.1", "1.2.840.10008.5.1.4.1.1.2", Path("/o/1.dcm"))]
    for name in ("no-dest", "exported", "dead"):
        store.claim_job("w", (JobKind.STANDARDIZE,))
        dests = () if name == "no-dest" else ("pacs",)
        store.start_export(ids[name], outs, dests, derived_series_uid="9.9", summary={})
    store.fail_job(ids["engine-fail"], "SeriesError: no pixel data")
    rows = {r.job_id: r for r in store.due_exports("pacs", now=1e12)}
    exported = next(r for r in rows.values() if r.job_id == ids["exported"])
    dead = next(r for r in rows.values() if r.job_id == ids["dead"])
    store.mark_sent([exported.id])
    store.mark_export_failed([dead], "refused", max_attempts=1, backoff=lambda a: 1, now=1.0)
    store.settle_exporting_jobs()
    store.settle_exporting_jobs()  # settling again announces nothing new
    assert sorted(finished.events) == sorted(
        [
            (ids["no-dest"], JobState.DONE),
            (ids["engine-fail"], JobState.FAILED),
            (ids["exported"], JobState.DONE),
            (ids["dead"], JobState.FAILED),
        ]
    )


def test_a_failing_listener_does_not_undo_the_transition(tmp_path):
    def broken(_event) -> None:
        raise RuntimeError("listener bug")

    s = JobStore(tmp_path / "db.sqlite3", on_job_finished=broken)
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.fail_job(job_id, "x")
    assert s.job(job_id).state is JobState.FAILED
    s.close()


def test_a_schema_1_database_is_migrated_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    s = JobStore(path)
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.close()
    con = sqlite3.connect(path)  # make it look like a database written by schema 1
    con.executescript(
        "ALTER TABLE jobs DROP COLUMN crashes; ALTER TABLE jobs DROP COLUMN not_before; "
        "ALTER TABLE jobs DROP COLUMN waiting; ALTER TABLE exports DROP COLUMN transfer_syntax; "
        "UPDATE meta SET value='1';"
    )
    con.close()
    s = JobStore(path)
    job = s.claim_job("w", (JobKind.STANDARDIZE,))
    assert job.id == job_id and job.crashes == 0
    s.close()


def test_a_schema_2_database_keeps_its_queued_exports_without_a_transfer_syntax(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    s = JobStore(path)
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.claim_job("w", (JobKind.STANDARDIZE,))
    s.start_export(
        job_id,
        [("9.9.1", "1.2.840.10008.5.1.4.1.1.2", Path("/o/1.dcm"))],
        ("pacs",),
        derived_series_uid="9.9",
        summary={},
    )
    s.close()
    con = sqlite3.connect(path)  # as written by schema 2: no transfer syntax per export
    con.executescript("ALTER TABLE exports DROP COLUMN transfer_syntax; UPDATE meta SET value='2';")
    con.close()
    s = JobStore(path)
    (row,) = s.due_exports("pacs", now=1e12)
    assert row.transfer_syntax is None, "the exporter reads it from the file, as before"
    s.close()


def test_the_transfer_syntax_recorded_with_the_output_is_what_the_exporter_gets(tmp_path):
    s = JobStore(tmp_path / "db.sqlite3")
    s.record_instance(_rec("1.2.3.1"), now=100.0)
    job_id = _complete(s)
    s.claim_job("w", (JobKind.STANDARDIZE,))
    woken: list[tuple[str, ...]] = []
    s.on_exports_queued(lambda dests: woken.append(tuple(dests)))
    outs = [(f"9.9.{i}", "1.2.840.10008.5.1.4.1.1.2", Path(f"/o/{i}.dcm")) for i in range(2)]
    s.start_export(
        job_id,
        outs,
        ("pacs",),
        derived_series_uid="9.9",
        summary={},
        transfer_syntaxes={"9.9.0": "1.2.840.10008.1.2.1", "9.9.1": "1.2.840.10008.1.2.4.80"},
    )
    rows = s.due_exports("pacs", now=1e12)
    assert [(r.sop_uid, r.transfer_syntax) for r in rows] == [
        ("9.9.0", "1.2.840.10008.1.2.1"),
        ("9.9.1", "1.2.840.10008.1.2.4.80"),
    ]
    assert woken == [("pacs",)], "the exporter is told after the commit"
    s.close()


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    import sqlite3

    path = tmp_path / "new.sqlite3"
    JobStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='99'")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match=r"schema 99 .* cannot be migrated"):
        JobStore(path)


def test_the_duplicate_check_does_not_wait_for_a_write_transaction_in_progress(tmp_path):
    """has_instance reads on its own connection: an association thread checks for a duplicate
    while another thread of its process is inside a write transaction (here: waiting for the
    database, which another process holds), and sees what is committed."""
    import sqlite3
    import threading

    from tests_support import wait_until

    db = tmp_path / "node.db"
    store = JobStore(db)
    assert store.record_instance(_rec("1.0")) is ReceiveOutcome.NEW
    other = sqlite3.connect(str(db), isolation_level=None)  # another receiver, mid-commit
    other.execute("BEGIN IMMEDIATE")
    writer = threading.Thread(target=store.record_instance, args=(_rec("1.1"),))
    writer.start()

    def writer_inside() -> bool:  # the writer holds the store's lock, in its transaction
        if store._lock.acquire(blocking=False):
            store._lock.release()
            return False
        return True

    try:
        wait_until(writer_inside, what="the writer in its transaction")
        answers: list[tuple[bool, bool]] = []
        checker = threading.Thread(
            target=lambda: answers.append((store.has_instance("1.0"), store.has_instance("1.1")))
        )
        checker.start()
        checker.join(timeout=30)
        assert answers == [(True, False)], "the check waited for the write transaction"
    finally:
        other.execute("ROLLBACK")
        other.close()
        writer.join(timeout=60)
    assert store.has_instance("1.1"), "committed, and seen by the next check"
    store.close()
