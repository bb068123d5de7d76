"""DICOM audit messages (PS3.15 A.5) built from typed events: each message type follows the
DICOM Audit Message Schema and carries the codes A.5.3 prescribes; syslog records and their
RFC 5425 framing; one message per series and peer from the reception ledger."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest
from audit_support import check_audit_message, code, parse_syslog, split_octet_counted
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from dicom_node.audit.messages import (
    Action,
    Application,
    ApplicationActivity,
    AuditSource,
    InstancesTransferred,
    Outcome,
    Patient,
    SecurityAlert,
    Study,
    event_datetime,
    render,
    to_xml,
)
from dicom_node.audit.reception import Peer, ReceptionLedger, Subject
from dicom_node.audit.syslog import BOM, header_field, octet_counted, pri, syslog_record

WHEN = datetime(2025, 3, 4, 10, 11, 12, 345678, tzinfo=UTC)
SOURCE = AuditSource("LTDIFF-SITE", "HOSPITAL-A")
NODE = Application("LTDIFF", "ct-node-1.hospital.example", "ltdiff-node")
MODALITY = Application("CT_SCANNER", "10.1.2.3")
CT = str(CTImageStorage)
ENHANCED_CT = str(EnhancedCTImageStorage)


def _received() -> InstancesTransferred:
    return InstancesTransferred(
        when=WHEN,
        action=Action.CREATE,
        source=MODALITY,
        destination=NODE,
        requestor="source",
        patient=Patient("PID-4711", "DOE^JANE"),
        studies=(Study("1.2.3.4", {CT: 120}, ("ACC-9",), "CT THORAX"),),
    )


def test_instances_transferred_follows_the_schema_with_the_codes_of_a537():
    root = check_audit_message(to_xml(_received(), SOURCE))

    event = root.find("EventIdentification")
    assert event is not None
    assert event.attrib == {
        "EventActionCode": "C",
        "EventDateTime": "2025-03-04T10:11:12.345+00:00",
        "EventOutcomeIndicator": "0",
    }
    assert code(event.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    source, destination = root.findall("ActiveParticipant")
    assert source.attrib == {
        "UserID": "CT_SCANNER",
        "AlternativeUserID": "AETITLES=CT_SCANNER",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.1.2.3",
        "NetworkAccessPointTypeCode": "2",  # an IP address
    }
    assert code(source.find("RoleIDCode")) == ("110153", "DCM", "Source Role ID")
    assert destination.attrib["UserID"] == "LTDIFF"
    assert destination.attrib["UserIsRequestor"] == "false"
    assert destination.attrib["NetworkAccessPointTypeCode"] == "1"  # a machine name
    assert code(destination.find("RoleIDCode")) == ("110152", "DCM", "Destination Role ID")
    audit_source = root.find("AuditSourceIdentification")
    assert audit_source is not None
    assert audit_source.attrib == {
        "AuditEnterpriseSiteID": "HOSPITAL-A",
        "AuditSourceID": "LTDIFF-SITE",
    }
    assert [c.attrib for c in audit_source] == [{"csd-code": "4"}]

    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.attrib == {
        "ParticipantObjectID": "1.2.3.4",
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
    }
    assert code(study.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    description = study.find("ParticipantObjectDescription")
    assert description is not None
    assert [(e.tag, e.attrib) for e in description] == [
        ("Accession", {"Number": "ACC-9"}),
        ("SOPClass", {"UID": CT, "NumberOfInstances": "120"}),
    ]
    assert patient.attrib == {
        "ParticipantObjectID": "PID-4711",
        "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1",
    }
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == "DOE^JANE"


def test_export_is_read_with_the_node_as_requesting_source_and_failures_described():
    sent = InstancesTransferred(
        when=WHEN,
        action=Action.READ,
        source=NODE,
        destination=Application("PACS", "pacs.hospital.example", "pacs"),
        requestor="source",
        patient=Patient("PID-4711", "DOE^JANE"),
        studies=(Study("1.2.3.4", {CT: 3, ENHANCED_CT: 1}),),
        outcome=Outcome.MINOR_FAILURE,
        description="1 instance(s) not delivered: peer answered status 0xA700",
    )
    root = check_audit_message(to_xml(sent, SOURCE))
    event = root.find("EventIdentification")
    assert event is not None
    assert event.attrib["EventActionCode"] == "R"
    assert event.attrib["EventOutcomeIndicator"] == "4"
    assert "0xA700" in event.findtext("EventOutcomeDescription", "")
    source, destination = root.findall("ActiveParticipant")
    assert (source.attrib["UserID"], source.attrib["UserIsRequestor"]) == ("LTDIFF", "true")
    assert destination.attrib["UserName"] == "pacs"
    sops = root.findall("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert {s.attrib["UID"]: s.attrib["NumberOfInstances"] for s in sops} == {
        CT: "3",
        ENHANCED_CT: "1",
    }
    # no accession and no description: the study's name is its UID (the schema needs a name)
    assert root.findtext("ParticipantObjectIdentification/ParticipantObjectName") == "1.2.3.4"


@pytest.mark.parametrize(("started", "type_code"), [(True, "110120"), (False, "110121")])
def test_application_activity_names_the_application_and_its_launcher(started, type_code):
    event = ApplicationActivity(WHEN, started, NODE, launcher="ltdiff" if started else None)
    root = check_audit_message(to_xml(event, SOURCE))
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.attrib["EventActionCode"] == "E"
    assert code(ident.find("EventID")) == ("110100", "DCM", "Application Activity")
    assert code(ident.find("EventTypeCode"))[0] == type_code
    participants = root.findall("ActiveParticipant")
    assert participants[0].attrib["AlternativeUserID"] == "AETITLES=LTDIFF"
    assert code(participants[0].find("RoleIDCode")) == ("110150", "DCM", "Application")
    if started:
        launcher = participants[1]
        assert launcher.attrib == {"UserID": "ltdiff", "UserIsRequestor": "true"}
        assert code(launcher.find("RoleIDCode")) == ("110151", "DCM", "Application Launcher")
    else:
        assert len(participants) == 1
    assert root.find("ParticipantObjectIdentification") is None  # none for this message


def test_failed_start_is_a_serious_failure_with_its_reason():
    event = ApplicationActivity(
        WHEN, True, NODE, outcome=Outcome.SERIOUS_FAILURE, description="start-up failed: X"
    )
    root = check_audit_message(to_xml(event, SOURCE))
    assert root.find("EventIdentification").attrib["EventOutcomeIndicator"] == "8"  # type: ignore[union-attr]
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "start-up failed: X"


def test_security_alert_is_node_authentication_about_the_refused_peer():
    alert = SecurityAlert(
        when=WHEN,
        reporter=NODE,
        peer=Application("INTRUDER", "192.0.2.7"),
        description="association rejected: the calling AE title is not allowed",
    )
    root = check_audit_message(to_xml(alert, SOURCE))
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.attrib["EventActionCode"] == "E"
    assert ident.attrib["EventOutcomeIndicator"] == "4"  # refused: mitigation effective
    assert code(ident.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert code(ident.find("EventTypeCode")) == ("110126", "DCM", "Node Authentication")
    reporter, peer = root.findall("ActiveParticipant")
    assert reporter.attrib["UserID"] == "LTDIFF"
    assert peer.attrib["UserID"] == "INTRUDER"
    assert peer.attrib["UserIsRequestor"] == "false"  # "Shall be FALSE" (A.5.3.11)
    assert peer.attrib["NetworkAccessPointID"] == "192.0.2.7"
    (subject,) = root.findall("ParticipantObjectIdentification")
    assert subject.attrib["ParticipantObjectID"] == "192.0.2.7"
    assert subject.attrib["ParticipantObjectTypeCode"] == "2"
    assert code(subject.find("ParticipantObjectIDTypeCode")) == ("110182", "DCM", "Node ID")
    detail = subject.find("ParticipantObjectDetail")
    assert detail is not None
    assert detail.attrib["type"] == "Alert Description"
    assert base64.b64decode(detail.attrib["value"]).decode().startswith("association rejected")


def test_a_peer_refused_before_its_association_request_is_named_by_its_address():
    alert = SecurityAlert(WHEN, NODE, Application(None, "192.0.2.8"), "connection refused")
    root = check_audit_message(to_xml(alert, SOURCE))
    peer = root.findall("ActiveParticipant")[1]
    assert peer.attrib["UserID"] == "192.0.2.8"
    assert "AlternativeUserID" not in peer.attrib  # no AE title to name


def test_text_values_become_one_line_schema_safe_tokens():
    event = InstancesTransferred(
        when=WHEN,
        action=Action.CREATE,
        source=Application("A\x00B", "10.0.0.1"),
        destination=NODE,
        requestor="source",
        patient=Patient("ID\nWITH  BREAKS", "M\u00fcller^J\u00fcrgen\x1b<&>"),
        studies=(Study("1.2", {CT: 1}),),
    )
    xml = to_xml(event, SOURCE)
    root = check_audit_message(xml)
    patient = root.findall("ParticipantObjectIdentification")[-1]
    assert patient.attrib["ParticipantObjectID"] == "ID WITH BREAKS"
    assert patient.findtext("ParticipantObjectName") == "M\u00fcller^J\u00fcrgen <&>"
    assert root.findall("ActiveParticipant")[0].attrib["UserID"] == "A B"


def test_event_time_keeps_the_offset_and_refuses_naive_times():
    cet = timezone(timedelta(hours=1))
    assert event_datetime(WHEN.astimezone(cet)) == "2025-03-04T11:11:12.345+01:00"
    with pytest.raises(ValueError, match="time zone"):
        event_datetime(datetime(2025, 3, 4, 10, 0))  # a naive time


# ---- syslog --------------------------------------------------------------------------------


def test_syslog_record_has_authpriv_pri_per_outcome_and_ihe_msgid():
    xml = to_xml(_received(), SOURCE)
    record = syslog_record(xml, 5, when=WHEN, hostname="ct-node-1", procid=4242)
    parsed = parse_syslog(record)
    assert parsed.pri == 85  # facility 10 (authpriv) * 8 + severity 5: "<85>" (PS3.15 A.6)
    assert (parsed.app_name, parsed.procid, parsed.msgid) == ("ltdiff-node", "4242", "IHE+RFC-3881")
    assert parsed.timestamp == "2025-03-04T10:11:12.345+00:00"
    assert parsed.structured_data == "-"
    assert parsed.msg == xml
    assert BOM + xml.encode() in record
    assert [render(e, SOURCE, WHEN).severity for e in (_received(),)] == [5]
    assert pri(4) == 84 and pri(3) == 83
    with pytest.raises(ValueError, match="severity"):
        pri(8)


def test_header_fields_are_printable_ascii_without_spaces_or_nil():
    assert header_field("ct node 1", 255) == "ctnode1"
    assert header_field("", 48) == "-"
    assert header_field("\u00e9\u00e8", 48) == "-"
    assert header_field("x" * 300, 255) == "x" * 255


def test_tls_framing_counts_octets_not_characters():
    xml = to_xml(_received(), SOURCE).replace("DOE^JANE", "M\u00dcLLER^J\u00dcRGEN")
    record = syslog_record(xml, 5, when=WHEN, hostname="h", procid=1)
    framed = octet_counted(record)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(record) == len(rest)
    assert len(record) > len(record.decode("utf-8"))  # the umlauts are two octets each
    frames, tail = split_octet_counted(framed + octet_counted(b"<85>1 - - - - - - x") + b"12 <8")
    assert frames == [record, b"<85>1 - - - - - - x"]
    assert tail == b"12 <8"  # an incomplete frame is left for the next read


# ---- reception ledger: one message per series and peer -------------------------------------


def _subject(patient: str = "PID-1", study: str = "1.2.3", accession: str = "ACC") -> Subject:
    return Subject(patient, "DOE^JANE", study, accession, "CT CHEST")


def test_several_instances_from_two_peers_make_one_batch_per_series_and_peer():
    ledger = ReceptionLedger()
    a, b = Peer("SCANNER_A", "10.0.0.1"), Peer("SCANNER_B", "10.0.0.2")
    for _ in range(5):
        ledger.add("1.9.1", a, _subject(), CT)
    ledger.add("1.9.1", a, _subject(), ENHANCED_CT)
    for _ in range(2):
        ledger.add("1.9.1", b, _subject(), CT)
    ledger.add("1.9.2", a, _subject(), CT)  # another series

    batches = {batch.peer: batch for batch in ledger.take("1.9.1")}
    assert set(batches) == {a, b}
    assert batches[a].instances == 6
    (study,) = batches[a].studies
    assert study.sop_classes == {CT: 5, ENHANCED_CT: 1}
    assert study.accession_numbers == ("ACC",)
    assert study.description == "CT CHEST"
    assert batches[a].patient == Patient("PID-1", "DOE^JANE")
    assert batches[b].instances == 2
    assert ledger.take("1.9.1") == [], "a series' instances are reported once"
    assert ledger.pending() == {"1.9.2": 1}


def test_a_series_with_two_patients_makes_two_messages_with_one_patient_each():
    ledger = ReceptionLedger()
    peer = Peer("SCANNER", "10.0.0.1")
    ledger.add("1.9.1", peer, _subject("PID-1"), CT)
    ledger.add("1.9.1", peer, _subject("PID-2"), CT)
    assert sorted(b.patient.patient_id for b in ledger.take("1.9.1")) == ["PID-1", "PID-2"]


def test_retract_takes_back_an_instance_that_was_not_stored():
    ledger = ReceptionLedger()
    peer = Peer("SCANNER", "10.0.0.1")
    ledger.add("1.9.1", peer, _subject(), CT)
    ticket = ledger.add("1.9.1", peer, _subject(), CT)
    ledger.retract(ticket)
    assert ledger.pending() == {"1.9.1": 1}
    only = ledger.add("1.9.3", peer, _subject(), CT)
    ledger.retract(only)
    assert "1.9.3" not in ledger.pending()
    ledger.take("1.9.1")
    ledger.retract(ticket)  # after the take: nothing to undo, no error
    assert ledger.pending() == {}


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("<ParticipantObjectName>DOE^JANE</ParticipantObjectName>", "", "do not follow"),
        ('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="1"', "EventOutcomeIndicator"),
        ('UserIsRequestor="true"', 'UserIsRequestor="yes"', "UserIsRequestor"),
        (' NumberOfInstances="120"', "", "missing attributes"),
        ('originalText="Source Role ID" ', "", "missing attributes"),
        ("+00:00", "", "time zone"),
        (
            "</AuditSourceIdentification>",
            '</AuditSourceIdentification><ActiveParticipant UserID="X" UserIsRequestor="false" />',
            "do not follow",
        ),
    ],
)
def test_the_schema_check_catches_what_the_schema_forbids(old, new, complaint):
    xml = to_xml(_received(), SOURCE)
    assert old in xml
    with pytest.raises(AssertionError, match=complaint):
        check_audit_message(xml.replace(old, new, 1))
