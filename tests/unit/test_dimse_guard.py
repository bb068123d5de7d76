"""dimse_guard.check_request: which decoded command sets are answered with which status, which
abort the association, and which go on to pynetdicom (issue 8, item 10)."""

from io import BytesIO

import pytest
from hostile_scu import (
    TAG_AFFECTED_SOP_CLASS,
    TAG_AFFECTED_SOP_INSTANCE,
    TAG_COMMAND_FIELD,
    TAG_DATASET_TYPE,
    TAG_MESSAGE_ID,
    TAG_PRIORITY,
    CommandValue,
    encode_command,
)
from pydicom.uid import CTImageStorage
from pynetdicom.dsutils import decode

from dicom_node import statuses
from dicom_node.dimse_guard import check_request, uid_problem

CT = str(CTImageStorage)
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
LONG = "1." + "2" * 70


def _store(**changes: CommandValue):
    elements: dict[int, CommandValue] = {
        TAG_AFFECTED_SOP_CLASS: CT,
        TAG_COMMAND_FIELD: 0x0001,
        TAG_MESSAGE_ID: 5,
        TAG_PRIORITY: 0,
        TAG_DATASET_TYPE: 0x0000,
        TAG_AFFECTED_SOP_INSTANCE: "1.2.826.0.1.3680043.2.1",
    }
    names = {
        "sop_class": TAG_AFFECTED_SOP_CLASS,
        "field": TAG_COMMAND_FIELD,
        "message_id": TAG_MESSAGE_ID,
        "sop_instance": TAG_AFFECTED_SOP_INSTANCE,
    }
    for name, value in changes.items():
        elements[names[name]] = value
    return decode(BytesIO(encode_command(elements)), True, True)


def _echo(**changes: CommandValue):
    return _store(**{"field": 0x0030, "sop_instance": None, "sop_class": VERIFICATION, **changes})


def test_a_valid_store_request_goes_on_to_pynetdicom():
    assert check_request(_store(), CT) is None


@pytest.mark.parametrize(
    ("sop_instance", "problem"),
    [
        ("", "empty"),
        (None, "missing"),
        (LONG, "longer than 64 characters (72)"),
        ("DOE^JOHN", "not a valid UID"),
        ("1.2.03", "not a valid UID"),
        ("1.2.3\\1.2.4", "multi-valued"),
        (b"\xff\xfe", "not a valid UID"),
    ],
)
def test_bad_affected_sop_instance_uid_is_answered_invalid_request_uid(sop_instance, problem):
    refusal = check_request(_store(sop_instance=sop_instance), CT)
    assert refusal is not None
    assert refusal.status == statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID
    assert refusal.message_id == 5, "answered to the request's Message ID"
    assert refusal.reason == f"Affected SOP Instance UID {problem}"
    assert "DOE" not in refusal.reason, "the offending value is never repeated"


@pytest.mark.parametrize(
    ("sop_class", "problem"),
    [
        ("", "empty"),
        (None, "missing"),
        (LONG, "longer than 64 characters (72)"),
        ("junk", "not a valid UID"),
    ],
)
def test_bad_affected_sop_class_uid_is_answered_invalid_request_uid(sop_class, problem):
    refusal = check_request(_store(sop_class=sop_class), CT)
    assert refusal is not None
    assert refusal.status == statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID
    assert refusal.reason == f"Affected SOP Class UID {problem}"
    assert refusal.sop_class is None, "an invalid UID is not echoed in the response"


def test_sop_class_other_than_the_presentation_context_is_not_supported():
    refusal = check_request(_store(sop_class=MR), CT)
    assert refusal is not None
    assert refusal.status == statuses.SOP_CLASS_NOT_SUPPORTED
    assert refusal.sop_class == MR


@pytest.mark.parametrize("message_id", [None, b"", b"\x01", b"\x01\x00\x02"])
def test_missing_or_unreadable_message_id_aborts(message_id):
    refusal = check_request(_store(message_id=message_id), CT)
    assert refusal is not None
    assert refusal.status is None, "no Message ID to answer: abort"
    assert "Message ID" in refusal.reason


@pytest.mark.parametrize(
    ("message_id", "expected"), [(0, 0), (0xFFFF, 0xFFFF), (b"\x07\x00\x08\x00", 7)]
)
def test_message_id_edge_values_are_served(message_id, expected):
    assert check_request(_store(message_id=message_id), CT) is None
    refusal = check_request(_store(message_id=message_id, sop_instance=""), CT)
    assert refusal is not None and refusal.message_id == expected


def test_request_on_a_context_that_was_not_accepted_aborts():
    refusal = check_request(_store(), None)
    assert refusal is not None and refusal.status is None


def test_echo_with_a_wrong_sop_class_is_refused_as_not_supported():
    assert check_request(_echo(), VERIFICATION) is None
    for bad in ("", CT, LONG):
        refusal = check_request(_echo(sop_class=bad), VERIFICATION)
        assert refusal is not None and refusal.status == statuses.SOP_CLASS_NOT_SUPPORTED


@pytest.mark.parametrize("field", [0x0020, 0x0010, 0x0021, 0x0100, 0x0120, 0x1234])
def test_commands_the_node_does_not_serve_abort(field):
    refusal = check_request(_store(field=field), CT)
    assert refusal is not None and refusal.status is None
    assert "not served" in refusal.reason


@pytest.mark.parametrize("field", [0x8001, 0x8030, 0x0FFF])
def test_responses_and_cancels_are_left_to_pynetdicom(field):
    assert check_request(_store(field=field, sop_instance=""), CT) is None


def test_uid_problem_accepts_valid_uids():
    assert uid_problem("1.2.840.10008.5.1.4.1.1.2") is None
    assert uid_problem("1." + "2" * 62) is None, "64 characters is the maximum, not over it"
