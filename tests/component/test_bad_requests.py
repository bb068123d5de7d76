"""Malformed DIMSE requests sent to a real node on loopback (issue 8, item 10): each gets its
documented status, or a clean A-ABORT, instead of silence; nothing is recorded or spooled for it;
the log names the reason without repeating the value; and the node keeps serving."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hostile_scu import (
    TAG_AFFECTED_SOP_CLASS,
    TAG_COMMAND_FIELD,
    TAG_DATASET_TYPE,
    TAG_MESSAGE_ID,
    TAG_PRIORITY,
    VERIFICATION,
    HostileSCU,
    encode_command,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from tests_support import wait_until

from dicom_node import statuses
from engine.synthetic import make_ct_dataset

CT, MR = str(CTImageStorage), str(MRImageStorage)
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
CONTEXTS = [(CT, [EXPLICIT]), (VERIFICATION, [IMPLICIT])]
LONG_UID = "1.2.826.0.1.3680043.2.1143." + "1" * 50  # 77 characters
JUNK = "DOE^JOHN"  # a junk value that looks like PHI: it must never reach the log
TIMEOUT = 20.0  # generous on shared CPUs; before the fix these requests got no answer at all


@dataclass(frozen=True)
class Sent:
    ds: Dataset
    encoded: bytes


def _instance(seed: str, sop_class: str = CT) -> Sent:
    ds = make_ct_dataset(uid_seed=seed)
    ds.SOPClassUID = sop_class
    return Sent(ds, encode(ds, False, True))


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    """Structured log events (as dicts) emitted while the test runs, from every thread."""
    caplog.set_level(logging.WARNING)
    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.msg
            records.append(dict(msg) if isinstance(msg, dict) else {"event": record.getMessage()})

    handler = Collect()
    logging.getLogger().addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)


def _associate(node) -> HostileSCU:
    scu = HostileSCU(
        "127.0.0.1",
        node.port,
        called_ae="LTDIFF",
        calling_ae="FUZZER",
        contexts=CONTEXTS,
        timeout=TIMEOUT,
    )
    assert scu.associate(), f"association: {scu.outcome}"
    return scu


def _store_ok(scu: HostileSCU, seed: str) -> Sent:
    good = _instance(seed)
    status = scu.c_store(
        good.encoded, sop_class=CT, sop_instance=good.ds.SOPInstanceUID, transfer_syntax=EXPLICIT
    )
    assert status == statuses.SUCCESS, f"a normal C-STORE afterwards: {status} ({scu.outcome})"
    return good


def _assert_nothing_kept(node, sent: Sent) -> None:
    assert not node.store.has_instance(sent.ds.SOPInstanceUID), "nothing recorded"
    assert not (node.config.spool_dir / sent.ds.SeriesInstanceUID).exists(), "nothing spooled"


def _assert_no_value_logged(events: list[dict[str, Any]], *values: str) -> None:
    text = repr(events)
    for value in values:
        assert value not in text, f"{value!r} reached the log: {text}"


ANSWERED = {
    # name: (c_store keyword arguments, expected status, reason logged)
    "blank instance UID": (
        {"sop_instance": ""},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Instance UID empty",
    ),
    "instance UID over 64 characters": (
        {"sop_instance": LONG_UID},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Instance UID longer than 64 characters (77)",
    ),
    "junk instance UID": (
        {"sop_instance": JUNK},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Instance UID not a valid UID",
    ),
    "instance UID missing": (
        {"sop_instance": None},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Instance UID missing",
    ),
    "blank class UID": (
        {"sop_class": "", "context_class": CT},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Class UID empty",
    ),
    "class UID over 64 characters": (
        {"sop_class": LONG_UID, "context_class": CT},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Class UID longer than 64 characters (77)",
    ),
    "junk class UID": (
        {"sop_class": JUNK, "context_class": CT},
        statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        "Affected SOP Class UID not a valid UID",
    ),
    "class other than the presentation context": (
        {"sop_class": MR, "context_class": CT},
        statuses.SOP_CLASS_NOT_SUPPORTED,
        "Affected SOP Class UID differs from the presentation context",
    ),
    "invalid priority": (
        {"priority": 7},
        statuses.CANNOT_UNDERSTAND,
        "command element not acceptable (ValueError)",
    ),
}


@pytest.mark.parametrize("case", list(ANSWERED))
def test_bad_store_request_gets_its_status_and_the_association_keeps_serving(
    start_node, events, case
):
    node = start_node()
    kwargs, expected, reason = ANSWERED[case]
    # the dataset matches the request's class, so nothing but the request itself is wrong
    bad = _instance(f"bad-{case}", MR if kwargs.get("sop_class") == MR else CT)
    scu = _associate(node)
    try:
        arguments = {"sop_class": CT, "sop_instance": bad.ds.SOPInstanceUID, **kwargs}
        status = scu.c_store(bad.encoded, transfer_syntax=EXPLICIT, **arguments)
        assert scu.outcome == "response", f"{case}: no answer ({scu.outcome})"
        assert status == expected, f"{case}: 0x{status:04X}, expected 0x{expected:04X}"
        assert scu.last_response.error_comment == reason
        assert scu.last_response.message_id_responded_to == 1
        good = _store_ok(scu, f"good-{case}")  # same association
    finally:
        scu.release()
    assert node.store.has_instance(good.ds.SOPInstanceUID)
    _assert_nothing_kept(node, bad)
    # A receiver process's log lines reach the node process a moment after the answers, and
    # a line of an earlier test's association may still arrive: look at this association's.
    wait_until(
        lambda: [(reason, f"0x{expected:04X}", "FUZZER")] in _refused_by_association(events),
        TIMEOUT,
        f"{case}: this association's one dimse.request_refused line",
    )
    _assert_no_value_logged(events, JUNK, LONG_UID)


def _refused_by_association(events: list[dict[str, Any]]) -> list[list[tuple[Any, ...]]]:
    """The (reason, status, calling AE) of each dimse.request_refused line, per association."""
    found: dict[object, list[tuple[Any, ...]]] = {}
    for e in events:
        if e.get("event") == "dimse.request_refused":
            found.setdefault(e.get("assoc"), []).append((e["reason"], e["status"], e["calling_ae"]))
    return list(found.values())


def _garbage(scu: HostileSCU, cx: int) -> None:
    scu.send_message(b"\xde\xad\xbe\xef" * 5, cx)


def _no_command_field(scu: HostileSCU, cx: int) -> None:
    scu.send_message(encode_command({TAG_MESSAGE_ID: 1, TAG_DATASET_TYPE: 0x0101}), cx)


def _unknown_command(scu: HostileSCU, cx: int) -> None:
    command = {TAG_COMMAND_FIELD: 0x1234, TAG_MESSAGE_ID: 1, TAG_DATASET_TYPE: 0x0101}
    scu.send_message(encode_command(command), cx)


def _find_request(scu: HostileSCU, cx: int) -> None:
    command = {
        TAG_AFFECTED_SOP_CLASS: CT,
        TAG_COMMAND_FIELD: 0x0020,
        TAG_MESSAGE_ID: 1,
        TAG_PRIORITY: 0,
        TAG_DATASET_TYPE: 0x0000,
    }
    scu.send_message(encode_command(command), cx, b"")


def _dataset_without_command(scu: HostileSCU, cx: int) -> None:
    scu.send_message(None, cx, _instance("orphan").encoded)


def _store_with(overrides: dict[int, Any]):
    def send(scu: HostileSCU, cx: int) -> None:
        bad = _instance("aborted")
        scu.c_store(
            bad.encoded,
            sop_class=CT,
            sop_instance=bad.ds.SOPInstanceUID,
            context_id=cx,
            overrides=overrides,
        )

    return send


ABORTED = {
    "Message ID missing": (
        _store_with({TAG_MESSAGE_ID: None}),
        "C-STORE-RQ Message ID missing or unreadable",
    ),
    "Message ID of 1 byte": (
        _store_with({TAG_MESSAGE_ID: b"\x01"}),
        "C-STORE-RQ Message ID missing or unreadable",
    ),
    "command set that does not decode": (_garbage, "command set does not decode"),
    "no Command Field": (_no_command_field, "command set does not decode"),
    "unknown command": (_unknown_command, "command set does not decode"),
    "C-FIND, not served": (_find_request, "DIMSE command 0x0020 is not served by this node"),
    "dataset without a command set": (
        _dataset_without_command,
        "dataset fragments before any command set",
    ),
}


@pytest.mark.parametrize("case", list(ABORTED))
def test_unanswerable_request_is_aborted_cleanly_and_the_node_keeps_serving(
    start_node, events, case
):
    node = start_node()
    send, reason = ABORTED[case]
    scu = _associate(node)
    try:
        send(scu, scu.context_for(CT).context_id)
        assert scu.outcome == "aborted", f"{case}: expected an A-ABORT, got {scu.outcome}"
        assert scu.abort_source == 2, "aborted by the service provider (the node's DUL)"
    finally:
        scu.close()
    # a receiver process's log lines reach the node process just after the A-ABORT
    wait_until(
        lambda: any(e.get("event") == "dimse.request_aborted" for e in events),
        TIMEOUT,
        "dimse.request_aborted",
    )
    aborts = [e for e in events if e.get("event") == "dimse.request_aborted"]
    assert len(aborts) == 1, events
    assert aborts[0]["reason"].startswith(reason), aborts[0]
    # the association's threads end (no silent crash leaves them behind) ...
    wait_until(lambda: not node.server.active_associations, TIMEOUT, "the association to end")
    # ... and the node serves the next association
    with _associate(node) as again:
        good = _store_ok(again, f"after-{case}")
    assert node.store.has_instance(good.ds.SOPInstanceUID)
    assert node.store.receiving_series()[0].n_instances == 1, "only the good instance"


def test_echo_with_a_wrong_sop_class_gets_sop_class_not_supported(start_node, events):
    node = start_node()
    with _associate(node) as scu:
        cx = scu.context_for(VERIFICATION).context_id
        for bad_class in ("", LONG_UID, CT):
            command = {
                TAG_AFFECTED_SOP_CLASS: bad_class,
                TAG_COMMAND_FIELD: 0x0030,
                TAG_MESSAGE_ID: 9,
                TAG_DATASET_TYPE: 0x0101,
            }
            status = scu.send_message(encode_command(command), cx)
            assert status == statuses.SOP_CLASS_NOT_SUPPORTED, (bad_class, scu.outcome)
        assert scu.c_echo() == statuses.SUCCESS

    refused = [
        (reason, "0x0122", "FUZZER")
        for reason in (
            "Affected SOP Class UID empty",
            "Affected SOP Class UID longer than 64 characters (77)",
            "Affected SOP Class UID not the presentation context's abstract syntax",
        )
    ]
    # as in test_bad_store_request_gets_its_status_and_the_association_keeps_serving
    wait_until(
        lambda: refused in _refused_by_association(events),
        TIMEOUT,
        "this association's three dimse.request_refused lines, in order, and no other",
    )


@pytest.mark.parametrize("message_id", [0, 0xFFFF])
def test_message_id_edge_values_are_served(start_node, message_id):
    node = start_node()
    good = _instance(f"message-id-{message_id}")
    with _associate(node) as scu:
        assert scu.c_echo(message_id=message_id) == statuses.SUCCESS
        status = scu.c_store(
            good.encoded,
            sop_class=CT,
            sop_instance=good.ds.SOPInstanceUID,
            transfer_syntax=EXPLICIT,
            message_id=message_id,
        )
        assert status == statuses.SUCCESS
        assert scu.last_response.message_id_responded_to == message_id
    assert node.store.has_instance(good.ds.SOPInstanceUID)
