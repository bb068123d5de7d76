"""DICOM audit messages (PS3.15 A.5, the XML that IHE ATNA uses), built by pure functions.

Each event the node audits is a frozen dataclass; `to_xml(event, source)` returns its
`AuditMessage` as one line of XML (no declaration, no line breaks: one message per line in the
audit file). Element order and attributes follow the DICOM Audit Message Schema (PS3.15
A.5.1, Relax NG); codes are the DCM codes of PS3.16 and the RFC 3881 values A.5.1.2 keeps:

- `ApplicationActivity` (A.5.3.1): EventID 110100 Application Activity, action E, EventTypeCode
  110120 Application Start or 110121 Application Stop;
- `InstancesTransferred` (A.5.3.7): EventID 110104 DICOM Instances Transferred, action C (the
  node received instances it did not hold) or R (the node sent them);
- `SecurityAlert` (A.5.3.11): EventID 110113 Security Alert, action E, EventTypeCode 110126 Node
  Authentication (CID 403).

Text values are made schema-safe (`_token`): characters XML 1.0 cannot carry and line breaks
become spaces, runs of white space collapse (xsd:token), and nothing that is not UTF-8 passes.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from ipaddress import ip_address
from typing import Literal


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName, originalText (the DICOM Code Meaning)."""

    value: str
    scheme: str
    meaning: str


DCM = "DCM"
EVENT_APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
EVENT_INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
EVENT_SECURITY_ALERT = Code("110113", DCM, "Security Alert")
TYPE_APPLICATION_START = Code("110120", DCM, "Application Start")
TYPE_APPLICATION_STOP = Code("110121", DCM, "Application Stop")
#: CID 403. Not 110127 (Emergency Override Started) nor 110129 (Security Configuration: a change
#: of the security configuration): a peer refused by the allow-lists or TLS failed to
#: authenticate as a node this one accepts.
TYPE_NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", DCM, "Application Launcher")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")
ID_STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
ID_NODE = Code("110182", DCM, "Node ID")
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")

#: AuditSourceTypeCode 4: "Application server process tier in a multi-tier system".
AUDIT_SOURCE_TYPE_APPLICATION_SERVER = "4"


class Outcome(Enum):
    """EventOutcomeIndicator (A.5.1)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # e.g. part of a series could not be delivered; a refused peer
    SERIOUS_FAILURE = "8"  # e.g. none of a series could be delivered; start-up failed
    MAJOR_FAILURE = "12"  # the reporting application is now unavailable


class Action(StrEnum):
    """EventActionCode of DICOM Instances Transferred (A.5.3.7)."""

    CREATE = "C"  # the node received instances it did not hold
    READ = "R"  # the node sent instances (it does not know what the receiver held)


# ---- participants and objects -------------------------------------------------------------


@dataclass(frozen=True)
class Application:
    """A DICOM application on the network: this node or a peer.

    UserID is the AE title (it is how the node's logs name peers, A.5.2.1), or the host when the
    AE title is unknown (a connection refused before its association request);
    AlternativeUserID `AETITLES=<AE>` (A.5.2.2); UserName a process or destination name
    (A.5.2.3). NetworkAccessPointID is the host: an IP address (type 2) or a machine name
    (type 1); None when unknown.
    """

    ae_title: str | None
    host: str | None = None
    name: str | None = None

    @property
    def user_id(self) -> str:
        return _token(self.ae_title or "") or _token(self.host or "") or "unknown"


@dataclass(frozen=True)
class Study:
    """A study touched by the event: what of it (SOP Class UID -> instances)."""

    study_uid: str
    sop_classes: Mapping[str, int]
    accession_numbers: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str = ""


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports (config `[audit] source_id`, default the node's
    AE title; `enterprise_site_id` optional)."""

    source_id: str
    enterprise_site_id: str | None = None


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplicationActivity:
    """The node started or stopped (A.5.3.1). `launcher`: the OS account that started it."""

    when: datetime
    started: bool  # False: stopped
    application: Application
    launcher: str | None = None
    outcome: Outcome = Outcome.SUCCESS
    description: str | None = None


@dataclass(frozen=True)
class InstancesTransferred:
    """Instances of one series moved between two applications (A.5.3.7): one message per
    series, peer and outcome. `when` is the time the transfer completed."""

    when: datetime
    action: Action
    source: Application
    destination: Application
    requestor: Literal["source", "destination"]
    patient: Patient
    studies: tuple[Study, ...]
    outcome: Outcome = Outcome.SUCCESS
    description: str | None = None

    @property
    def instances(self) -> int:
        return sum(n for study in self.studies for n in study.sop_classes.values())


@dataclass(frozen=True)
class SecurityAlert:
    """A connection or association refused for security (A.5.3.11). The reporter is the node;
    the peer is the performing process and the alert's subject (110182 Node ID: its address)."""

    when: datetime
    reporter: Application
    peer: Application
    description: str  # ParticipantObjectDetail "Alert Description"
    alert_type: Code = TYPE_NODE_AUTHENTICATION
    outcome: Outcome = Outcome.MINOR_FAILURE  # refused: mitigation was effective (A.5.3.11)


AuditEvent = ApplicationActivity | InstancesTransferred | SecurityAlert


# ---- XML ------------------------------------------------------------------------------------

_NOT_XML = re.compile("[^\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _token(value: object) -> str:
    """A value as an xsd:token XML 1.0 can carry: no control characters or line breaks, white
    space collapsed, valid UTF-8."""
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    return " ".join(_NOT_XML.sub(" ", text).split())


def event_datetime(when: datetime) -> str:
    """xsd:dateTime with the time zone, milliseconds (A.5.2.5: EventDateTime includes it)."""
    if when.tzinfo is None:
        raise ValueError("EventDateTime needs a time zone (A.5.2.5); got a naive datetime")
    return when.isoformat(timespec="milliseconds")


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _host_type(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine (DNS) name."""
    try:
        ip_address(host)
    except ValueError:
        return "1"
    return "2"


def _event(
    root: ET.Element,
    event_id: Code,
    action: str,
    when: datetime,
    outcome: Outcome,
    *,
    types: tuple[Code, ...] = (),
    description: str | None = None,
) -> None:
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": event_datetime(when),
            "EventOutcomeIndicator": outcome.value,
        },
    )
    _coded(ident, "EventID", event_id)
    for code in types:
        _coded(ident, "EventTypeCode", code)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _token(description)


def _participant(root: ET.Element, app: Application, role: Code | None, *, requestor: bool) -> None:
    attrs = {"UserID": app.user_id}
    if app.ae_title and _token(app.ae_title):
        attrs["AlternativeUserID"] = f"AETITLES={_token(app.ae_title)}"
    if app.name:
        attrs["UserName"] = _token(app.name)
    attrs["UserIsRequestor"] = "true" if requestor else "false"
    if app.host:
        attrs["NetworkAccessPointID"] = _token(app.host)
        attrs["NetworkAccessPointTypeCode"] = _host_type(app.host)
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _coded(element, "RoleIDCode", role)


def _person(root: ET.Element, user: str, role: Code) -> None:
    """An active participant that is an OS account (the Application Launcher)."""
    element = ET.SubElement(
        root, "ActiveParticipant", {"UserID": _token(user), "UserIsRequestor": "true"}
    )
    _coded(element, "RoleIDCode", role)


def _source(root: ET.Element, source: AuditSource) -> None:
    attrs = {}
    if source.enterprise_site_id:
        attrs["AuditEnterpriseSiteID"] = _token(source.enterprise_site_id)
    attrs["AuditSourceID"] = _token(source.source_id)
    element = ET.SubElement(root, "AuditSourceIdentification", attrs)
    ET.SubElement(
        element, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_TYPE_APPLICATION_SERVER}
    )


def _object(
    root: ET.Element,
    object_id: str,
    *,
    type_code: str,
    role: str | None,
    id_type: Code,
    name: str,
) -> ET.Element:
    attrs = {"ParticipantObjectID": _token(object_id), "ParticipantObjectTypeCode": type_code}
    if role is not None:
        attrs["ParticipantObjectTypeCodeRole"] = role
    element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    # The schema asks for a name or a query; a name is always given.
    ET.SubElement(element, "ParticipantObjectName").text = _token(name)
    return element


def _study(root: ET.Element, study: Study) -> None:
    """Type 2 (system object), role 3 (report), 110180; the description holds the accession
    numbers and, per SOP class, its UID and number of instances (A.5.1 DICOMObjectDescription)."""
    element = _object(
        root,
        study.study_uid,
        type_code="2",
        role="3",
        id_type=ID_STUDY_INSTANCE_UID,
        name=study.description or study.study_uid,
    )
    description = ET.SubElement(element, "ParticipantObjectDescription")
    for accession in study.accession_numbers:
        if _token(accession):
            ET.SubElement(description, "Accession", {"Number": _token(accession)})
    for uid, count in sorted(study.sop_classes.items()):
        ET.SubElement(
            description, "SOPClass", {"UID": _token(uid), "NumberOfInstances": str(int(count))}
        )


def _patient(root: ET.Element, patient: Patient) -> None:
    """Type 1 (person), role 1 (patient), ID type 2 "Patient Number" (RFC-3881)."""
    _object(
        root,
        patient.patient_id,
        type_code="1",
        role="1",
        id_type=ID_PATIENT_NUMBER,
        name=patient.name,
    )


def _application_activity(event: ApplicationActivity, root: ET.Element) -> None:
    _event(
        root,
        EVENT_APPLICATION_ACTIVITY,
        "E",
        event.when,
        event.outcome,
        types=(TYPE_APPLICATION_START if event.started else TYPE_APPLICATION_STOP,),
        description=event.description,
    )
    _participant(root, event.application, ROLE_APPLICATION, requestor=False)
    if event.launcher:
        _person(root, event.launcher, ROLE_APPLICATION_LAUNCHER)


def _instances_transferred(event: InstancesTransferred, root: ET.Element) -> None:
    _event(
        root,
        EVENT_INSTANCES_TRANSFERRED,
        event.action.value,
        event.when,
        event.outcome,
        description=event.description,
    )
    _participant(root, event.source, ROLE_SOURCE, requestor=event.requestor == "source")
    _participant(
        root, event.destination, ROLE_DESTINATION, requestor=event.requestor == "destination"
    )


def _security_alert(event: SecurityAlert, root: ET.Element) -> None:
    _event(root, EVENT_SECURITY_ALERT, "E", event.when, event.outcome, types=(event.alert_type,))
    _participant(root, event.reporter, None, requestor=False)
    _participant(root, event.peer, None, requestor=False)  # "Shall be FALSE" (A.5.3.11)


def to_xml(event: AuditEvent, source: AuditSource) -> str:
    """The event's `AuditMessage`, one line of XML (the caller encodes it as UTF-8)."""
    root = ET.Element("AuditMessage")
    if isinstance(event, ApplicationActivity):
        _application_activity(event, root)
        _source(root, source)
    elif isinstance(event, InstancesTransferred):
        _instances_transferred(event, root)
        _source(root, source)
        for study in event.studies:
            _study(root, study)
        _patient(root, event.patient)
    else:
        _security_alert(event, root)
        _source(root, source)
        node_id = event.peer.host or event.peer.user_id
        subject = _object(
            root, node_id, type_code="2", role=None, id_type=ID_NODE, name=event.peer.user_id
        )
        ET.SubElement(
            subject,
            "ParticipantObjectDetail",
            {
                "type": "Alert Description",
                "value": base64.b64encode(_token(event.description).encode()).decode("ascii"),
            },
        )
    return ET.tostring(root, encoding="unicode")


#: Severity of the syslog record per outcome (RFC 5424 6.2.1; PS3.15 A.6/A.7: 5, "normal but
#: significant", for most messages, others where the message says more).
SEVERITY: Mapping[Outcome, int] = {
    Outcome.SUCCESS: 5,  # notice
    Outcome.MINOR_FAILURE: 4,  # warning
    Outcome.SERIOUS_FAILURE: 3,  # error
    Outcome.MAJOR_FAILURE: 2,  # critical
}


@dataclass(frozen=True)
class Rendered:
    """A message ready for the sinks: its XML, the syslog severity of its outcome and when it
    was made (the syslog TIMESTAMP)."""

    xml: str
    severity: int
    created: datetime


def render(event: AuditEvent, source: AuditSource, created: datetime) -> Rendered:
    return Rendered(to_xml(event, source), SEVERITY[event.outcome], created)
