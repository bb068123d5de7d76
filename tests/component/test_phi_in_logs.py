"""No PHI in anything the node process writes, black box: `ltdiff-node serve` runs as a
subprocess (JSON logs), receives malformed and odd instances that carry unique patient strings,
handles them, and everything it wrote on stdout and stderr, plus `ltdiff-node status` (text and
JSON), is searched for those strings.

The instances are written as files with a valid file meta header and hand-patched dataset bytes,
and sent by pynetdicom as they are on disk (STORE_SEND_CHUNKED_DATASET: the dataset is not
decoded and re-encoded by the sender).
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from pydicom import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from tests_support import free_port, serve, wait_until, write_site_config

from dicom_node.config import load_config
from dicom_node.store import JobStore
from engine.synthetic import make_ct_series

FAMILY, GIVEN = "ZQXFAMILY", "ZQXGIVEN"
PATIENT_ID = "ZQXPID4711"
BIRTH_DATE = "18770911"
OTHER_IDS = "ZQXOTHER0815"
ACCESSION = "ZQXACC0042"
PHI = (FAMILY, GIVEN, PATIENT_ID, BIRTH_DATE, OTHER_IDS, ACCESSION)

#: Explicit VR little endian VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def _element(raw: bytes | bytearray, tag: tuple[int, int]) -> tuple[int, int, int]:
    """(offset of the element, offset of its value, value length) of a top-level element of an
    Explicit VR Little Endian file written by pydicom (no undefined lengths)."""
    (meta_length,) = struct.unpack_from("<I", raw, 132 + 8)
    pos = 132 + 12 + meta_length
    while pos < len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        vr = bytes(raw[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            value = pos + 8
        if (group, elem) == tag:
            return pos, value, length
        pos = value + length
    raise AssertionError(f"element {tag} not found")


def set_value(raw: bytearray, tag: tuple[int, int], value: bytes) -> bytearray:
    """Replace a short-VR element's value (padded to even length with a space)."""
    pos, start, length = _element(raw, tag)
    value += b" " * (len(value) % 2)
    return raw[: pos + 6] + struct.pack("<H", len(value)) + value + raw[start + length :]


def set_length(raw: bytearray, tag: tuple[int, int], length: int) -> bytearray:
    """Patch only a short-VR element's length field: the value swallows what follows."""
    pos, _, _ = _element(raw, tag)
    struct.pack_into("<H", raw, pos + 6, length)
    return raw


def set_vr(raw: bytearray, tag: tuple[int, int], vr: bytes) -> bytearray:
    pos, _, _ = _element(raw, tag)
    raw[pos + 4 : pos + 6] = vr
    return raw


PATIENT_NAME, PATIENT_ID_TAG, BIRTH_DATE_TAG = (0x0010, 0x0010), (0x0010, 0x0020), (0x0010, 0x0030)
SOP_CLASS, SERIES_UID = (0x0008, 0x0016), (0x0020, 0x000E)
INSTANCE_NUMBER, RESCALE_INTERCEPT, ROWS = (0x0020, 0x0013), (0x0028, 0x1052), (0x0028, 0x0010)

Patch = Callable[[bytearray], bytearray]


def _keep(raw: bytearray) -> bytearray:
    return raw


class Case(NamedTuple):
    instances: int
    patch: Patch
    sop_uid: str | None = None  # also the file meta's, so the C-STORE request's


#: Every instance carries all of PHI in its patient attributes; the cases put them where pydicom,
#: pynetdicom, the engine or our own code might quote them.
CASES: dict[str, Case] = {
    # The fault campaign's case: SOP Class UID's length field patched to 720, so the UID
    # swallows the elements after it (patient name, ID, birth date included).
    "sop-class-length-720": Case(1, lambda r: set_length(r, SOP_CLASS, 720)),
    "patient-id-length-swallows-birth-date": Case(1, lambda r: set_length(r, PATIENT_ID_TAG, 40)),
    "invalid-da-birth-date": Case(
        1, lambda r: set_value(r, BIRTH_DATE_TAG, f"{BIRTH_DATE}-X".encode())
    ),
    "invalid-pn-4-groups": Case(
        1, lambda r: set_value(r, PATIENT_NAME, f"{FAMILY}^{GIVEN}=A=B=C".encode())
    ),
    "patient-name-as-ui": Case(1, lambda r: set_vr(r, PATIENT_NAME, b"UI")),
    "series-uid-with-patient-id": Case(
        1, lambda r: set_value(r, SERIES_UID, f"1.2.{PATIENT_ID}^{FAMILY}".encode())
    ),
    "rows-with-two-values": Case(1, lambda r: set_value(r, ROWS, b"\x10\x00\x10\x00")),
    # pynetdicom warns about a non-conformant Affected SOP Instance UID, quoting it.
    "affected-sop-instance-uid-with-patient-id": Case(1, _keep, f"1.2.{PATIENT_ID}.{GIVEN}"),
    # Accepted on reception, fail in processing with exceptions that quote the values.
    "instance-number-holds-patient-id": Case(
        2, lambda r: set_value(r, INSTANCE_NUMBER, PATIENT_ID.encode())
    ),
    "rescale-intercept-holds-accession": Case(
        2, lambda r: set_value(r, RESCALE_INTERCEPT, ACCESSION.encode())
    ),
}


def _write_case(directory: Path, name: str, case: Case) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    extra = {"sop_uid": case.sop_uid} if case.sop_uid else {}
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we set on purpose
        for ds in make_ct_series(case.instances, 16, 16, uid_seed=f"phi-{name}", **extra):
            ds.PatientName = f"{FAMILY}^{GIVEN}"
            ds.PatientID = PATIENT_ID
            ds.PatientBirthDate = BIRTH_DATE
            ds.OtherPatientIDs = OTHER_IDS
            ds.AccessionNumber = ACCESSION
            path = directory / f"{name}-{ds.InstanceNumber}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            path.write_bytes(bytes(case.patch(bytearray(path.read_bytes()))))
            paths.append(path)
    return paths


def _send_raw(port: int, path: Path) -> int | None:
    """C-STORE one file over its own association; the status, or None without an answer."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LTDIFF")
    if not assoc.is_established:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom, reading the file meta we made invalid
            status = assoc.send_c_store(path)
        return getattr(status, "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()


def _settled(db: Path) -> bool:
    store = JobStore(db)
    try:
        report = store.status_report(limit=100)
    finally:
        store.close()
    open_jobs = {"queued", "processing", "exporting"} & set(report["jobs"])
    return not report["series"].get("receiving") and not open_jobs


def _cli(cfg: Path, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args, "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return r.stdout + r.stderr


def test_nothing_the_node_writes_carries_phi_from_malformed_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {name: _write_case(tmp_path / "in", name, case) for name, case in CASES.items()}
    sent = b"".join(p.read_bytes() for paths in files.values() for p in paths)
    for s in PHI:
        assert s.encode() in sent, f"the instances sent carry {s}"

    port = free_port()
    cfg = write_site_config(tmp_path / "site.toml", tmp_path / "state", port, poll_interval_s=0.1)
    out, err = tmp_path / "node.stdout", tmp_path / "node.stderr"
    proc = serve(cfg, out, stderr=err)
    try:
        monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
        statuses = {p.name: _send_raw(port, p) for paths in files.values() for p in paths}
        db = load_config(cfg, []).database_path
        wait_until(lambda: _settled(db), 120, f"series closed and jobs settled ({statuses})")
        status_text = _cli(cfg, "status", "--limit", "100")
        status_json = _cli(cfg, "status", "--json", "--limit", "100")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    report = json.loads(status_json)
    failed = [j for j in report["recent_jobs"] if j["state"] == "failed"]
    assert failed, f"series that fail in processing have failed jobs: {report}"
    assert all(j["error"] for j in failed), "a failed job says why"
    written = {
        "stdout": out.read_text(errors="replace"),
        "stderr": err.read_text(errors="replace"),
        "status": status_text,
        "status --json": status_json,
    }
    leaks = [
        f"{s} in {where}: ...{text[max(0, text.index(s) - 200) : text.index(s) + 50]}..."
        for where, text in written.items()
        for s in PHI
        if s in text
    ]
    assert not leaks, "PHI in what the node wrote:\n" + "\n".join(leaks)
    lines = [json.loads(x) for x in written["stdout"].splitlines() if x.startswith("{")]
    events: set[Any] = {line["event"] for line in lines}
    assert {"node.ready", "node.stopped"} <= events, "the log is the node's JSON log"
    assert proc.returncode == 0, "SIGTERM stops the node cleanly"
