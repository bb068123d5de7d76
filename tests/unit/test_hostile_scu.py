"""The hand encoders of tests/hostile_scu.py, checked against pynetdicom's and pydicom's decoders:
what HostileSCU sends well-formed must be exactly what the Standard says."""

from io import BytesIO

from hostile_scu import (
    TAG_AFFECTED_SOP_CLASS,
    TAG_AFFECTED_SOP_INSTANCE,
    TAG_COMMAND_FIELD,
    TAG_GROUP_LENGTH,
    TAG_MESSAGE_ID,
    decode_command,
    encode_associate_rq,
    encode_command,
)
from pydicom.uid import CTImageStorage
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ

CT = str(CTImageStorage)


def _decoded(raw: bytes):
    return decode(BytesIO(raw), True, True)


def test_command_set_has_a_correct_group_length_and_values_pydicom_reads():
    raw = encode_command(
        {
            TAG_AFFECTED_SOP_CLASS: CT,  # 25 characters: padded with NUL
            TAG_COMMAND_FIELD: 0x0001,
            TAG_MESSAGE_ID: 7,
            TAG_AFFECTED_SOP_INSTANCE: "1.2.3",
        }
    )
    cs = _decoded(raw)
    assert cs.CommandGroupLength == len(raw) - 12
    assert cs.AffectedSOPClassUID == CT
    assert cs.CommandField == 1 and cs.MessageID == 7
    assert cs.AffectedSOPInstanceUID == "1.2.3"
    assert all(len(v) % 2 == 0 for v in decode_command(raw).values())


def test_values_go_verbatim_and_none_leaves_an_element_out():
    raw = encode_command(
        {TAG_COMMAND_FIELD: 1, TAG_MESSAGE_ID: b"\x01", TAG_AFFECTED_SOP_INSTANCE: None}
    )
    elements = decode_command(raw)
    assert elements[TAG_MESSAGE_ID] == b"\x01", "odd length kept"
    assert TAG_AFFECTED_SOP_INSTANCE not in elements
    assert (
        decode_command(encode_command({TAG_AFFECTED_SOP_INSTANCE: ""}))[TAG_AFFECTED_SOP_INSTANCE]
        == b""
    ), "an empty value is an element of length 0"
    long_uid = "1." + "2" * 70
    assert (
        decode_command(encode_command({TAG_AFFECTED_SOP_INSTANCE: long_uid}))[
            TAG_AFFECTED_SOP_INSTANCE
        ]
        == long_uid.encode()
    )


def test_group_length_can_be_left_out_or_wrong():
    assert TAG_GROUP_LENGTH not in decode_command(
        encode_command({TAG_GROUP_LENGTH: None, TAG_COMMAND_FIELD: 1})
    )
    wrong = decode_command(encode_command({TAG_GROUP_LENGTH: 999, TAG_COMMAND_FIELD: 1}))
    assert int.from_bytes(wrong[TAG_GROUP_LENGTH], "little") == 999


def test_associate_request_decodes_with_pynetdicom():
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(
        encode_associate_rq(
            "LTDIFF", "FUZZER", [(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])], 32768
        )
    )
    assert pdu.called_ae_title == "LTDIFF" and pdu.calling_ae_title == "FUZZER"
    (cx,) = pdu.presentation_context
    assert cx.context_id == 1
    assert cx.abstract_syntax == CT
    assert cx.transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert pdu.user_information.maximum_length == 32768
