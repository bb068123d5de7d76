"""The audit trail without sockets: what the node's hooks produce (one message per series and
peer; export outcomes; which refusals are security alerts), and the writer threads (a full
queue drops and counts without blocking or logging patient data; a failing output keeps its
messages; a rotated file is reopened)."""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from audit_support import check_audit_message
from listener_support import recording
from pydicom import dcmwrite
from pydicom.uid import CTImageStorage
from tests_support import wait_until

from dicom_node.audit.messages import Rendered
from dicom_node.audit.reception import Subject, read_subject_file
from dicom_node.audit.sinks import FileSink, SinkError
from dicom_node.audit.trail import SECURITY_REFUSALS, AuditTrail, SinkWriter
from dicom_node.config import AuditConfig, DestinationConfig
from dicom_node.metrics import RejectionReason
from dicom_node.store import (
    ExportTotals,
    InstanceRecord,
    JobKind,
    JobStore,
    SeriesRow,
    SeriesState,
)
from engine.synthetic import make_ct_series

WHEN = datetime(2025, 3, 4, 10, 11, 12, tzinfo=UTC)
CT = str(CTImageStorage)
PATIENT_ID, PATIENT_NAME = "ZQXAUDITPID", "ZQXAUDIT^NAME"


def _trail(tmp_path: Path, **kw: object) -> AuditTrail:
    cfg = AuditConfig(enabled=True, path=tmp_path / "audit.log", **kw)  # type: ignore[arg-type]
    return AuditTrail(cfg, ae_title="LTDIFF", hostname="ct-node-1", clock=lambda: WHEN)


def _messages(path: Path) -> list[ET.Element]:
    return [check_audit_message(line) for line in path.read_text("utf-8").splitlines()]


def _subject(study: str = "1.2.3") -> Subject:
    return Subject(PATIENT_ID, PATIENT_NAME, study, "ACC-1", "CT CHEST")


def _counts(root: ET.Element) -> dict[str, int]:
    return {e.attrib["UID"]: int(e.attrib["NumberOfInstances"]) for e in root.iter("SOPClass")}


def test_instances_of_a_series_from_two_peers_give_one_message_each_at_completion(tmp_path):
    trail = _trail(tmp_path)
    trail.start()
    for _ in range(4):
        trail.instance_receiving("1.9.1", "SCANNER_A", "10.0.0.1", _subject(), CT)
    refused = trail.instance_receiving("1.9.1", "SCANNER_A", "10.0.0.1", _subject(), CT)
    trail.instance_not_stored(refused)
    trail.instance_receiving("1.9.1", "SCANNER_B", "10.0.0.2", _subject(), CT)
    assert trail.series_complete("1.9.1") == 2
    assert trail.series_complete("1.9.1") == 0, "nothing new: no message"
    trail.close()

    messages = _messages(tmp_path / "audit.log")
    by_peer = {m.findall("ActiveParticipant")[0].attrib["UserID"]: m for m in messages}
    assert set(by_peer) == {"SCANNER_A", "SCANNER_B"}
    assert _counts(by_peer["SCANNER_A"]) == {CT: 4}
    assert _counts(by_peer["SCANNER_B"]) == {CT: 1}
    node = by_peer["SCANNER_A"].findall("ActiveParticipant")[1]
    assert (node.attrib["UserID"], node.attrib["NetworkAccessPointID"]) == ("LTDIFF", "ct-node-1")
    patient = by_peer["SCANNER_A"].findall("ParticipantObjectIdentification")[-1]
    assert patient.attrib["ParticipantObjectID"] == PATIENT_ID
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600, "patient data: owner only"


def test_source_id_defaults_to_the_ae_title_and_can_be_set(tmp_path):
    default = _trail(tmp_path)
    assert default.source.source_id == "LTDIFF"
    named = _trail(tmp_path, source_id="SITE-7", enterprise_site_id="HOSP")
    assert (named.source.source_id, named.source.enterprise_site_id) == ("SITE-7", "HOSP")


def _sample(tmp_path: Path) -> Path:
    (ds,) = make_ct_series(1, 8, 8, uid_seed="audit-export")
    ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, "ACC-77"
    path = tmp_path / "sample.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _totals(path: Path, sent: dict[str, int], dead: dict[str, int]) -> ExportTotals:
    return ExportTotals(
        job_id=7,
        destination="pacs",
        series_uid="1.9.1",
        study_uid="1.2.3",
        sent=sent,
        dead=dead,
        last_error="peer answered status 0xA700" if dead else None,
        sample_path=path,
    )


PACS = DestinationConfig(name="pacs", ae_title="PACS", host="10.0.0.9", port=104, max_attempts=3)


@pytest.mark.parametrize(
    ("sent", "dead", "outcomes"),
    [
        ({CT: 5}, {}, [("0", {CT: 5})]),
        ({CT: 4}, {CT: 1}, [("0", {CT: 4}), ("4", {CT: 1})]),  # A.5.2: never mixed results
        ({}, {CT: 5}, [("8", {CT: 5})]),
    ],
)
def test_an_export_ends_in_one_message_per_outcome(tmp_path, sent, dead, outcomes):
    trail = _trail(tmp_path)
    trail.start()
    assert trail.series_exported(PACS, _totals(_sample(tmp_path), sent, dead)) == len(outcomes)
    trail.close()
    messages = _messages(tmp_path / "audit.log")
    got = [
        (m.find("EventIdentification").attrib["EventOutcomeIndicator"], _counts(m))  # type: ignore[union-attr]
        for m in messages
    ]
    assert got == outcomes
    for m in messages:
        assert m.find("EventIdentification").attrib["EventActionCode"] == "R"  # type: ignore[union-attr]
        source, destination = m.findall("ActiveParticipant")
        assert (source.attrib["UserID"], source.attrib["UserIsRequestor"]) == ("LTDIFF", "true")
        assert destination.attrib["UserID"] == "PACS"
        assert destination.attrib["NetworkAccessPointID"] == "10.0.0.9"
        study, patient = m.findall("ParticipantObjectIdentification")
        assert study.attrib["ParticipantObjectID"] == "1.2.3"
        assert [a.attrib["Number"] for a in study.iter("Accession")] == ["ACC-77"]
        assert patient.attrib["ParticipantObjectID"] == PATIENT_ID
    failures = [m for m in messages if m.findtext("EventIdentification/EventOutcomeDescription")]
    assert all(
        "0xA700" in m.findtext("EventIdentification/EventOutcomeDescription", "") for m in failures
    )
    assert len(failures) == len(outcomes) - (1 if sent else 0)


def test_an_unreadable_sample_file_still_gives_the_message(tmp_path):
    assert read_subject_file(tmp_path / "missing.dcm") is None
    trail = _trail(tmp_path)
    trail.start()
    assert trail.series_exported(PACS, _totals(tmp_path / "missing.dcm", {CT: 1}, {})) == 1
    trail.close()
    (message,) = _messages(tmp_path / "audit.log")
    assert (
        message.findall("ParticipantObjectIdentification")[0].attrib["ParticipantObjectID"]
        == "1.2.3"
    )


@pytest.mark.parametrize("reason", list(RejectionReason))
def test_only_security_refusals_are_security_alerts(tmp_path, reason):
    trail = _trail(tmp_path)
    made = trail.association_rejected(reason, "192.0.2.1", "SOMEONE", detail="why")
    assert made == (reason in SECURITY_REFUSALS)
    assert set(SECURITY_REFUSALS) == {
        RejectionReason.ADDRESS_NOT_ALLOWED,
        RejectionReason.TLS_FAILED,
        RejectionReason.CALLING_AE_NOT_ALLOWED,
        RejectionReason.CALLED_AE_NOT_RECOGNIZED,
    }


def test_start_and_stop_are_reported_with_the_launching_account(tmp_path):
    trail = _trail(tmp_path)
    trail.start()
    trail.application_started()
    trail.application_started(failure=RuntimeError("port in use"))
    trail.application_stopped()
    trail.close()
    start, failed, stop = _messages(tmp_path / "audit.log")
    assert start.findall("ActiveParticipant")[1].attrib["UserIsRequestor"] == "true"
    assert failed.find("EventIdentification").attrib["EventOutcomeIndicator"] == "8"  # type: ignore[union-attr]
    assert "RuntimeError" in failed.findtext("EventIdentification/EventOutcomeDescription", "")
    assert stop.find("EventIdentification/EventTypeCode").attrib["csd-code"] == "110121"  # type: ignore[union-attr]


# ---- writer threads --------------------------------------------------------------------------


class _BlockingSink:
    """Holds the first batch until released; records what it was given."""

    name = "syslog"

    def __init__(self, fail_first: int = 0) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[str]] = []
        self.fail_first = fail_first

    def send(self, batch: Sequence[Rendered]) -> None:
        self.entered.set()
        self.release.wait(30)
        if self.fail_first:
            self.fail_first -= 1
            raise SinkError(0, ConnectionRefusedError("server down"))
        self.batches.append([m.xml for m in batch])

    def close(self) -> None:
        pass


def _message(i: int) -> Rendered:
    return Rendered(f"<AuditMessage n='{i}'>{PATIENT_ID}</AuditMessage>", 5, WHEN)


def test_a_full_queue_drops_counts_and_never_blocks_nor_logs_patient_data():
    sink = _BlockingSink()
    dropped: list[tuple[str, int]] = []
    writer = SinkWriter(sink, queue_size=2, on_dropped=lambda out, n: dropped.append((out, n)))
    writer.start()
    with recording("dicom_node.audit") as events:
        assert writer.offer(_message(0))
        wait_until(sink.entered.is_set, 10, "the writer holding the first batch")
        offered = [writer.offer(_message(i)) for i in range(1, 6)]
        assert offered == [True, True, False, False, False], "two fit in the queue"
        assert writer.dropped == 3
        assert sum(n for _, n in dropped) == 3 and {out for out, _ in dropped} == {"syslog"}
        sink.release.set()
        writer.close(deadline=time.monotonic() + 30)
    assert [len(b) for b in sink.batches] == [1, 2]
    logged = events.named("audit.dropped")
    assert logged and logged[0]["output"] == "syslog"
    assert sum(e["messages"] for e in logged) == 3, "every drop is logged, throttled into lines"
    assert PATIENT_ID not in repr(events.events), "audit logs never carry the messages"


def test_a_failing_output_keeps_its_batch_and_delivers_it_when_it_recovers(monkeypatch):
    monkeypatch.setattr("dicom_node.audit.trail.RETRY_INITIAL_S", 0.01)
    sink = _BlockingSink(fail_first=2)
    sink.release.set()
    writer = SinkWriter(sink, queue_size=10)
    writer.start()
    with recording("dicom_node.audit") as events:
        writer.offer(_message(1))
        wait_until(lambda: sink.batches, 10, "the batch delivered after two failures")
        writer.close(deadline=time.monotonic() + 30)
    assert sink.batches == [[_message(1).xml]]
    assert writer.delivered == 1 and writer.dropped == 0
    assert len(events.named("audit.output_failed")) == 1, "one line per outage"
    assert events.named("audit.output_recovered")


def test_messages_left_at_the_stop_deadline_are_counted_as_dropped():
    sink = _BlockingSink()
    writer = SinkWriter(sink, queue_size=10)
    writer.start()
    writer.offer(_message(1))
    wait_until(sink.entered.is_set, 10, "the writer holding the first batch")
    writer.offer(_message(2))
    threading.Timer(0.2, sink.release.set).start()  # the batch in hand completes meanwhile
    writer.close(deadline=0.0)  # already past: give up after the batch in hand
    assert not writer.is_alive()
    assert (writer.delivered, writer.dropped) == (1, 1)


def test_file_output_appends_lines_and_reopens_a_rotated_file(tmp_path):
    path = tmp_path / "audit.log"
    sink = FileSink(path)
    sink.send([_message(1), _message(2)])
    path.rename(tmp_path / "audit.log.1")  # logrotate
    sink.send([_message(3)])
    sink.close()
    assert (tmp_path / "audit.log.1").read_text().count("\n") == 2
    assert path.read_text() == _message(3).xml + "\n"


def test_file_output_that_cannot_be_written_raises_for_a_retry(tmp_path):
    sink = FileSink(tmp_path / "no-such-dir" / "audit.log")
    with pytest.raises(SinkError) as info:
        sink.send([_message(1)])
    assert info.value.delivered == 0


def test_a_series_received_before_a_restart_is_reported_from_the_database(tmp_path):
    sample = _sample(tmp_path)
    series = SeriesRow(
        "1.9.5", "1.2.3", SeriesState.RECEIVING, 0, 2, None, 0.0, 0.0, False, {}, "SCANNER"
    )
    trail = _trail(tmp_path)
    trail.start()
    trail.resume_series(series, [("1.1", CT, sample), ("1.2", CT, sample)])
    trail.instance_receiving("1.9.5", "SCANNER", "10.0.0.1", _subject(), CT)  # after the restart
    assert trail.series_complete("1.9.5") == 2
    trail.close()
    messages = _messages(tmp_path / "audit.log")
    before = next(m for m in messages if "NetworkAccessPointID" not in m[1].attrib)
    assert before[1].attrib["UserID"] == "SCANNER", "the AE title the database kept"
    assert _counts(before) == {CT: 2}
    assert "restarted" in before.findtext("EventIdentification/EventOutcomeDescription", "")
    assert before.findall("ParticipantObjectIdentification")[-1].get("ParticipantObjectID") == (
        PATIENT_ID
    ), "the patient read from a spooled file"


def test_export_totals_wait_until_nothing_is_pending(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    paths = [tmp_path / f"{i}.dcm" for i in range(2)]
    for i, path in enumerate(paths):
        store.record_instance(
            InstanceRecord(
                f"1.5.{i}",
                "1.9.9",
                "1.2.9",
                CT,
                "1.2.840.10008.1.2.1",
                path,
                1,
                "SCANNER",
                {},
                False,
                None,
            )
        )
    job = store.complete_series(
        "1.9.9", 0, job_kind=JobKind.FORWARD, rule=None, engine=None, destinations=("pacs",)
    )
    assert job is not None
    store.claim_job("test", (JobKind.FORWARD,))
    store.start_export(
        job,
        [(f"1.5.{i}", CT, p) for i, p in enumerate(paths)],
        ("pacs",),
        derived_series_uid=None,
        summary={},
    )
    first, second = store.due_exports("pacs", time.time() + 1)
    assert store.export_totals(job, "pacs") is None
    store.mark_sent([first.id])
    assert store.export_totals(job, "pacs") is None, "one still pending"
    store.mark_export_failed([second], "boom", max_attempts=1, backoff=lambda a: 1.0, now=0.0)
    totals = store.export_totals(job, "pacs")
    store.close()
    assert totals is not None
    assert (totals.sent, totals.dead, totals.last_error) == ({CT: 1}, {CT: 1}, "boom")
    assert (totals.series_uid, totals.study_uid, totals.sample_path) == ("1.9.9", "1.2.9", paths[0])
