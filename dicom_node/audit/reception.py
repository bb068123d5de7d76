"""Which instances of a series came from which peer, from their C-STORE until the series is
complete: the material of one DICOM Instances Transferred message per series, peer and patient.

The C-STORE handler reads the audit subject of each instance (`read_subject`: patient, study,
accession) from the header it has already parsed, and `ReceptionLedger.add`s it before the
instance is recorded in the database, so a series can never be completed, and its messages
taken, without an instance the database holds; an instance the handler then refuses (or finds to
be a duplicate) is `retract`ed. When the scheduler completes the series, `take` returns its
tallies and forgets them. Pure bookkeeping in memory, thread-safe; nothing here logs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.audit.messages import Patient, Study

#: The attributes of an instance that an audit message names.
SUBJECT_KEYWORDS = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "AccessionNumber",
    "StudyDescription",
)


@dataclass(frozen=True)
class Subject:
    """Whom and what an instance is about, as the audit message names it."""

    patient_id: str
    patient_name: str
    study_uid: str
    accession: str = ""
    study_description: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode names nobody
        return ""


def read_subject(ds: Dataset) -> Subject:
    """The audit subject of a parsed header; never raises (undecodable values are empty)."""
    return Subject(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_uid=_text(ds, "StudyInstanceUID"),
        accession=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
    )


def read_subject_file(path: Path) -> Subject | None:
    """The audit subject of a DICOM file (its header only), or None when it cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(SUBJECT_KEYWORDS))
    except Exception:  # noqa: BLE001 - a missing or unreadable file: the caller says "unknown"
        return None
    return read_subject(ds)


@dataclass(frozen=True)
class Peer:
    """Who sent: the calling AE title and the address (None: unknown, e.g. instances received
    before a restart; the database keeps no addresses)."""

    ae_title: str
    address: str | None


@dataclass(frozen=True)
class Ticket:
    """What `add` counted, so that `retract` can take it back."""

    series_uid: str
    peer: Peer
    subject: Subject
    sop_class_uid: str
    count: int = 1


@dataclass(frozen=True)
class ReceivedBatch:
    """The instances of one series received from one peer, for one patient."""

    series_uid: str
    peer: Peer
    patient: Patient
    studies: tuple[Study, ...]

    @property
    def instances(self) -> int:
        return sum(n for study in self.studies for n in study.sop_classes.values())


@dataclass
class _StudyTally:
    sop_classes: Counter[str] = field(default_factory=Counter)
    accessions: dict[str, None] = field(default_factory=dict)  # ordered set
    description: str = ""


@dataclass
class _Tally:
    patient_name: str
    studies: dict[str, _StudyTally] = field(default_factory=dict)


class ReceptionLedger:
    """Instances per series, peer and patient since the last `take` of the series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, dict[tuple[Peer, str], _Tally]] = {}

    def add(
        self,
        series_uid: str,
        peer: Peer,
        subject: Subject,
        sop_class_uid: str,
        count: int = 1,
    ) -> Ticket:
        with self._lock:
            tallies = self._series.setdefault(series_uid, {})
            tally = tallies.setdefault(
                (peer, subject.patient_id), _Tally(patient_name=subject.patient_name)
            )
            study = tally.studies.setdefault(subject.study_uid, _StudyTally())
            study.sop_classes[sop_class_uid] += count
            if subject.accession:
                study.accessions[subject.accession] = None
            if subject.study_description and not study.description:
                study.description = subject.study_description
        return Ticket(series_uid, peer, subject, sop_class_uid, count)

    def retract(self, ticket: Ticket) -> None:
        """Undo an `add` whose instance was not stored after all (a no-op once the series was
        taken: its message already counted the instance)."""
        with self._lock:
            tallies = self._series.get(ticket.series_uid)
            key = (ticket.peer, ticket.subject.patient_id)
            tally = None if tallies is None else tallies.get(key)
            study = None if tally is None else tally.studies.get(ticket.subject.study_uid)
            if tallies is None or tally is None or study is None:
                return
            study.sop_classes[ticket.sop_class_uid] -= ticket.count
            if study.sop_classes[ticket.sop_class_uid] <= 0:
                del study.sop_classes[ticket.sop_class_uid]
            if not study.sop_classes:
                del tally.studies[ticket.subject.study_uid]
            if not tally.studies:
                del tallies[key]
            if not tallies:
                del self._series[ticket.series_uid]

    def take(self, series_uid: str) -> list[ReceivedBatch]:
        """The series' tallies, one per peer and patient, and forget them."""
        with self._lock:
            tallies = self._series.pop(series_uid, {})
        return [
            ReceivedBatch(
                series_uid=series_uid,
                peer=peer,
                patient=Patient(patient_id, tally.patient_name),
                studies=tuple(
                    Study(
                        study_uid,
                        dict(study.sop_classes),
                        tuple(study.accessions),
                        study.description,
                    )
                    for study_uid, study in tally.studies.items()
                ),
            )
            for (peer, patient_id), tally in tallies.items()
        ]

    def pending(self) -> Mapping[str, int]:
        """Series UID -> instances counted and not yet taken (for tests and diagnostics)."""
        with self._lock:
            return {
                uid: sum(
                    n
                    for tally in tallies.values()
                    for study in tally.studies.values()
                    for n in study.sop_classes.values()
                )
                for uid, tallies in self._series.items()
            }
