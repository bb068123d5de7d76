"""dicom_node/dimse_response.py: a C-STORE-RSP command set, byte for byte as pynetdicom's."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node import statuses
from dicom_node.dimse_response import COMMAND_LAST_FRAGMENT, encode_store_response


def _response(**values: object) -> C_STORE:
    rsp = C_STORE()
    for keyword, value in values.items():
        setattr(rsp, keyword, value)
    return rsp


def _pynetdicoms(rsp: C_STORE, context_id: int = 1) -> bytes:
    """The one PDV pynetdicom sends for `rsp` (DIMSEServiceProvider.send_msg's path)."""
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(context_id, 16382)
    ((cid, pdv),) = pdata.presentation_data_value_list
    assert cid == context_id
    return bytes(pdv)


@pytest.mark.parametrize(
    "values",
    [
        {  # the handler's answer: every field pynetdicom's C-STORE SCP sets
            "MessageIDBeingRespondedTo": 7,
            "AffectedSOPClassUID": CTImageStorage,
            "AffectedSOPInstanceUID": "1.2.3.4",  # even length
            "Status": statuses.SUCCESS,
        },
        {
            "MessageIDBeingRespondedTo": 65535,
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2.1",  # odd length
            "AffectedSOPInstanceUID": "2.25." + "9" * 59,  # 64 characters
            "Status": statuses.OUT_OF_RESOURCES,
        },
        {"MessageIDBeingRespondedTo": 1, "Status": statuses.CANNOT_UNDERSTAND},  # no UIDs
    ],
)
def test_store_response_is_pynetdicoms_encoding(values):
    rsp = _response(**values)
    encoded = encode_store_response(rsp)
    assert encoded is not None
    assert COMMAND_LAST_FRAGMENT + encoded == _pynetdicoms(rsp)


@pytest.mark.parametrize(
    "values",
    [
        {"MessageIDBeingRespondedTo": 1, "Status": 0xC000, "ErrorComment": "why"},
        {"MessageIDBeingRespondedTo": 1, "Status": 0xA900, "OffendingElement": [0x00100010]},
        {"MessageID": 1, "AffectedSOPClassUID": CTImageStorage},  # a request
        {"MessageIDBeingRespondedTo": 1},  # no status yet
    ],
)
def test_anything_more_than_a_status_is_left_to_pynetdicom(values):
    assert encode_store_response(_response(**values)) is None
