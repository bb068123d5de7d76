"""The audit trail of a real node on loopback (issue 10, item 2).

`ltdiff-node serve` with `[audit] path` and UDP syslog to a receiver socket in the test: a series
received, standardized and sent to a loopback archive, and an association refused by the
calling AE allow-list, arrive as DICOM audit messages in the file and at the receiver, and the
patient's ID and name are in those and nowhere in what the node writes on stdout and stderr.
An in-process node sends over TLS (RFC 5425) and reconnects after the server dropped it.
"""

from __future__ import annotations

import dataclasses
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from audit_support import (
    TlsSyslogReceiver,
    UdpSyslogReceiver,
    check_audit_message,
    code,
)
from listener_support import self_signed
from pydicom import dcmwrite
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from tests_support import (
    free_port,
    node_config,
    require_tool,
    serve,
    wait_until,
    write_site_config,
)

from dicom_node.config import (
    AuditConfig,
    DestinationConfig,
    SyslogConfig,
    SyslogTransport,
    TLSConfig,
)
from dicom_node.export import send_paths
from engine.synthetic import make_ct_series

PATIENT_ID, FAMILY, GIVEN = "ZQXAUDIT0815", "ZQXAUDITFAMILY", "ZQXAUDITGIVEN"
SLICES = 4


def _series(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_ct_series(SLICES, 32, 32, "Br40d", uid_seed="audit-component"):
        ds.PatientID, ds.PatientName = PATIENT_ID, f"{FAMILY}^{GIVEN}"
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines() if path.exists() else []


def _kind(root: ET.Element) -> str:
    event = root.find("EventIdentification")
    assert event is not None
    event_id = code(event.find("EventID"))[0]
    types = [code(t)[0] for t in event.findall("EventTypeCode")]
    return {
        ("110100", "110120"): "start",
        ("110100", "110121"): "stop",
        ("110104", ""): f"transferred-{event.get('EventActionCode')}",
        ("110113", "110126"): "security-alert",
    }[(event_id, types[0] if types else "")]


def _instances(root: ET.Element) -> int:
    return sum(int(s.attrib["NumberOfInstances"]) for s in root.iter("SOPClass"))


def _refused_association(port: int, calling_ae: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LTDIFF")
    if assoc.is_established:
        assoc.release()
    return bool(assoc.is_rejected)


def test_a_served_node_audits_a_series_in_and_out_and_a_refused_peer_without_logging_phi(
    tmp_path, archive
):
    receiver = UdpSyslogReceiver()
    audit_log = tmp_path / "audit" / "atna.log"
    audit_log.parent.mkdir()
    port = free_port()
    cfg = write_site_config(
        tmp_path / "site.toml",
        tmp_path / "state",
        port,
        f"""
[audit]
enabled = true
path = "{audit_log}"
source_id = "AUDIT-SRC"
[audit.syslog]
host = "127.0.0.1"
port = {receiver.port}
transport = "udp"

[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = {archive.port}
""",
        listener='allowed_calling_ae_titles = ["MODALITY"]',
    )
    out, err = tmp_path / "node.stdout", tmp_path / "node.stderr"
    proc = serve(cfg, out, stderr=err)
    try:
        node = DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=port)
        assert not send_paths(node, "MODALITY", _series(tmp_path / "in")).failed
        assert _refused_association(port, "INTRUDER"), "INTRUDER is not an allowed calling AE"

        def exported() -> bool:
            return any('EventActionCode="R"' in line for line in _lines(audit_log))

        wait_until(exported, 120, "the export's audit message in the file")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0

    lines = _lines(audit_log)
    messages = [check_audit_message(line) for line in lines]
    by_kind: dict[str, list[ET.Element]] = {}
    for m in messages:
        by_kind.setdefault(_kind(m), []).append(m)
    assert sorted(by_kind) == [
        "security-alert",
        "start",
        "stop",
        "transferred-C",
        "transferred-R",
    ], [_kind(m) for m in messages]
    assert [len(v) for v in by_kind.values()] == [1] * 5, "one message per series and peer"
    assert _kind(messages[0]) == "start" and _kind(messages[-1]) == "stop"
    assert {m.find("AuditSourceIdentification").get("AuditSourceID") for m in messages} == {  # type: ignore[union-attr]
        "AUDIT-SRC"
    }

    (received,) = by_kind["transferred-C"]
    source, destination = received.findall("ActiveParticipant")
    assert source.attrib["UserID"] == "MODALITY"
    assert source.attrib["NetworkAccessPointID"] == "127.0.0.1"
    assert destination.attrib["UserID"] == "LTDIFF"
    assert _instances(received) == SLICES, "the instances of the series, in one message"
    patient = received.findall("ParticipantObjectIdentification")[-1]
    assert patient.attrib["ParticipantObjectID"] == PATIENT_ID
    assert patient.findtext("ParticipantObjectName") == f"{FAMILY}^{GIVEN}"

    (sent,) = by_kind["transferred-R"]
    assert sent.find("EventIdentification").get("EventOutcomeIndicator") == "0"  # type: ignore[union-attr]
    assert [p.get("UserID") for p in sent.findall("ActiveParticipant")] == ["LTDIFF", "ARCHIVE"]
    assert _instances(sent) == archive.received == SLICES
    assert (
        sent.findall("ParticipantObjectIdentification")[-1].get("ParticipantObjectID") == PATIENT_ID
    )

    (alert,) = by_kind["security-alert"]
    peer = alert.findall("ActiveParticipant")[1]
    assert (peer.get("UserID"), peer.get("NetworkAccessPointID")) == ("INTRUDER", "127.0.0.1")

    # The same messages reached the syslog receiver, as RFC 5424 records.
    wait_until(lambda: len(receiver.datagrams) >= len(lines), 30, "every message over UDP")
    records = receiver.records()
    receiver.close()
    assert sorted(r.msg for r in records) == sorted(lines)
    assert {(r.app_name, r.msgid, r.structured_data) for r in records} == {
        ("ltdiff-node", "IHE+RFC-3881", "-")
    }
    pri = {_kind(check_audit_message(r.msg)): r.pri for r in records}
    assert pri == {
        "start": 85,
        "transferred-C": 85,
        "transferred-R": 85,
        "security-alert": 84,
        "stop": 85,
    }

    # Patient data in the audit outputs, and nowhere in what the node wrote.
    audit_text = audit_log.read_text("utf-8")
    for phi in (PATIENT_ID, FAMILY, GIVEN):
        assert phi in audit_text
    written = {"stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}
    leaks = [
        f"{phi} in {where}"
        for where, text in written.items()
        for phi in (PATIENT_ID, FAMILY, GIVEN)
        if phi in text
    ]
    assert not leaks, leaks
    assert '"event": "audit.started"' in written["stdout"]


@pytest.fixture
def syslog_certificate(tmp_path):
    return self_signed(require_tool("openssl"), tmp_path, "syslog", "localhost")


def test_audit_over_tls_is_octet_counted_verified_and_survives_a_dropped_connection(
    tmp_path, start_node, syslog_certificate
):
    key, certificate = syslog_certificate
    receiver = TlsSyslogReceiver(certificate, key)
    syslog = SyslogConfig(
        host="127.0.0.1",
        port=receiver.port,
        transport=SyslogTransport.TLS,
        tls=TLSConfig(enabled=True, ca_certificates=certificate),
    )
    config = dataclasses.replace(
        node_config(tmp_path / "state", None, allowed_addresses=("192.0.2.0/24",)),
        audit=AuditConfig(enabled=True, syslog=syslog),
    )
    node = start_node(config)

    def kinds() -> list[str]:
        return [_kind(check_audit_message(r.msg)) for r in receiver.records()]

    wait_until(lambda: kinds() == ["start"], 30, "Application Start over TLS")
    assert not _connects(node.port), "127.0.0.1 is not an allowed address"
    wait_until(lambda: kinds() == ["start", "security-alert"], 30, "the alert over TLS")
    alert = check_audit_message(receiver.records()[-1].msg)
    assert alert.findall("ActiveParticipant")[1].get("UserID") == "127.0.0.1"

    receiver.drop_connections()  # the server restarts; the node notices and reconnects
    assert not _connects(node.port)
    wait_until(lambda: kinds().count("security-alert") == 2, 30, "an alert after the reconnect")
    assert len(receiver.streams) == 2, "a second connection"
    node.stop()
    wait_until(lambda: kinds()[-1:] == ["stop"], 30, "Application Stop over TLS")
    receiver.close()


def _connects(port: int) -> bool:
    ae = AE(ae_title="ANYONE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LTDIFF")
    if assoc.is_established:
        assoc.release()
        return True
    return False
