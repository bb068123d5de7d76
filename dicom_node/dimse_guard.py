"""Answer or abort malformed DIMSE requests instead of letting pynetdicom drop them silently.

pynetdicom 3.0.4 turns a complete DIMSE message into a primitive in
`DIMSEServiceProvider.receive_primitive`, on the association's DUL thread, before any handler:

- A blank Affected SOP Instance or Class UID, or a missing Message ID, becomes None; the
  association's `_serve_request` then finds `is_valid_request` false and ignores the request.
  No response is sent and the sender waits until its own timeout (issue 8, item 10).
- A UID over 64 characters makes the primitive's setter (`utils.set_uid`) raise; pynetdicom
  aborts with no status and logs the offending value.
- A command set that does not decode raises inside the state machine and ends the DUL thread.
- A valid SOP Class UID that differs from the presentation context (an MR UID on the CT context)
  reaches the C-STORE handler, as if that class had been negotiated.

`GuardedDIMSEProvider` checks each complete message before pynetdicom converts it, and either
answers the request with a documented failure status (dicom_node.statuses, docs/OPERATIONS.md)
or, when no valid response can be built (no usable Message ID or presentation context, a
command set that does not decode, a command this node does not serve), aborts the association
with an A-ABORT through pynetdicom's own state machine event for an invalid PDU (Evt19). Every
refusal is logged with its reason, never with the offending value. Requests that pass go to
pynetdicom unchanged.

It is installed per association from EVT_CONN_OPEN (`install`), before the association's
threads start: pynetdicom itself is not patched, and the node's own SCU associations (export)
are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicom_node import statuses
from dicom_node.logs import get_logger
from engine.dicom_facts import is_valid_uid

log = get_logger("dicom_node.dimse_guard")

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
_RESPONSE_BIT = 0x8000
_SERVED = {C_STORE_RQ: "C-STORE-RQ", C_ECHO_RQ: "C-ECHO-RQ"}
_ERROR_COMMENT_MAX = 64  # Error Comment is LO (PS3.5 Table 6.2-1)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused. With a `status` (and a Message ID to answer) the request gets a
    response with that status; without, the association is aborted."""

    reason: str
    status: int | None = None
    message_id: int | None = None
    command: int | None = None
    sop_class: str | None = None


def _raw(command: Dataset, keyword: str) -> bytes | int | str | None:
    """A command element's value as received (None when absent): raw bytes when pydicom has not
    converted it yet. Reading raw bytes avoids pydicom's conversion, which validates the value and
    logs it (a hostile peer's junk, possibly PHI) before we have said anything."""
    elem = command.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    return value if isinstance(value, bytes | int | str) else repr(value)


def _message_id(command: Dataset) -> int | None:
    """The Message ID (US); the first value of a multi-valued one, as pynetdicom takes it."""
    value = _raw(command, "MessageID")
    if isinstance(value, bytes):
        return (
            int.from_bytes(value[:2], "little") if len(value) >= 2 and len(value) % 2 == 0 else None
        )
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _uid(command: Dataset, keyword: str) -> str | None:
    """A UI element's value without its padding (None when absent)."""
    value = _raw(command, keyword)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\0 ")
    return None if value is None else str(value)


def uid_problem(value: str | None) -> str | None:
    """What is wrong with a request UID (None when it is a valid UID)."""
    if value is None:
        return "missing"
    if value == "":
        return "empty"
    if "\\" in value:
        return "multi-valued"
    if len(value) > 64:
        return f"longer than 64 characters ({len(value)})"
    if not is_valid_uid(value):
        return "not a valid UID"
    return None


def check_request(command: Dataset, context_abstract_syntax: str | None) -> Refusal | None:
    """The refusal of a decoded command set, or None to let pynetdicom serve it.

    `context_abstract_syntax` is the accepted presentation context's abstract syntax (None when
    the message came on a context that was not accepted).
    """
    field = _raw(command, "CommandField")
    if isinstance(field, bytes) and len(field) == 2:
        field = int.from_bytes(field, "little")
    if not isinstance(field, int):
        return Refusal("Command Field unreadable")
    if field & _RESPONSE_BIT or field == C_CANCEL_RQ:
        return None  # responses and cancels: pynetdicom's business (an SCP ignores responses)
    if field not in _SERVED:
        return Refusal(f"DIMSE command 0x{field:04X} is not served by this node")
    name = _SERVED[field]
    message_id = _message_id(command)
    if message_id is None:
        return Refusal(f"{name} Message ID missing or unreadable", command=field)
    if context_abstract_syntax is None:
        return Refusal(f"{name} on a presentation context that was not accepted", command=field)

    sop_class = _uid(command, "AffectedSOPClassUID")
    class_problem = uid_problem(sop_class)
    valid_class = sop_class if class_problem is None else None

    def refuse(reason: str, status: int) -> Refusal:
        return Refusal(reason, status, message_id, field, valid_class)

    if field == C_ECHO_RQ:
        if valid_class == context_abstract_syntax:
            return None
        what = class_problem or "not the presentation context's abstract syntax"
        return refuse(f"Affected SOP Class UID {what}", statuses.SOP_CLASS_NOT_SUPPORTED)
    if class_problem is not None:
        return refuse(
            f"Affected SOP Class UID {class_problem}",
            statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        )
    if valid_class != context_abstract_syntax:
        return refuse(
            "Affected SOP Class UID differs from the presentation context",
            statuses.SOP_CLASS_NOT_SUPPORTED,
        )
    instance_problem = uid_problem(_uid(command, "AffectedSOPInstanceUID"))
    if instance_problem is not None:
        return refuse(
            f"Affected SOP Instance UID {instance_problem}",
            statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
        )
    return None


def _already_decoded(*_args: object, **_kwargs: object) -> bool:
    return True


class GuardedDIMSEProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with `check_request` between decoding and conversion."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        try:
            complete = message.decode_msg(primitive, self.assoc)
        except Exception as exc:  # noqa: BLE001 - any decode failure: the command set is garbage
            self._abort(Refusal(f"command set does not decode ({type(exc).__name__})"))
            return
        if not complete:
            return
        try:
            refusal = self._inspect(message)
        except Exception as exc:  # noqa: BLE001 - a check that fails must not leave the peer hanging
            refusal = Refusal(f"request could not be checked ({type(exc).__name__})")
        if refusal is None:
            # pynetdicom's receive_primitive decodes, then converts and queues. The message is
            # decoded already (decoding twice would append the fragment twice), so its decode
            # step only reports completion.
            message.decode_msg = _already_decoded  # type: ignore[method-assign]
            super().receive_primitive(primitive)
        elif refusal.status is None or refusal.message_id is None or message.context_id is None:
            self._abort(refusal)
        else:
            self._answer(refusal, message.context_id)

    def _inspect(self, message: Any) -> Refusal | None:
        if message.context_id is None or not isinstance(message.command_set, Dataset):
            return Refusal("dataset fragments before any command set")
        contexts = {cx.context_id: cx for cx in self.assoc.accepted_contexts}
        context = contexts.get(message.context_id)
        abstract = str(context.abstract_syntax) if context is not None else None
        refusal = check_request(message.command_set, abstract)
        if refusal is not None:
            return refusal
        try:  # what check_request does not look at: let pynetdicom's own conversion judge
            converted = message.message_to_primitive()
        except Exception as exc:  # noqa: BLE001 - any rejection of a command element
            field = message.command_set.CommandField  # converted by decode_msg already
            return Refusal(
                f"command element not acceptable ({type(exc).__name__})",
                statuses.CANNOT_UNDERSTAND if field == C_STORE_RQ else None,
                _message_id(message.command_set),
                field,
            )
        # pynetdicom's receive_primitive converts the message again: hand it this conversion
        message.message_to_primitive = lambda: converted
        return None

    def _answer(self, refusal: Refusal, context_id: int) -> None:
        self.message = None
        rsp = C_STORE() if refusal.command == C_STORE_RQ else C_ECHO()
        rsp.MessageIDBeingRespondedTo = refusal.message_id
        rsp.Status = refusal.status
        rsp.ErrorComment = refusal.reason[:_ERROR_COMMENT_MAX]  # type: ignore[assignment]
        if refusal.sop_class is not None:
            rsp.AffectedSOPClassUID = refusal.sop_class
        log.warning(
            "dimse.request_refused",
            command=_SERVED.get(refusal.command or 0),
            reason=refusal.reason,
            status=f"0x{refusal.status:04X}",
            calling_ae=self.assoc.requestor.ae_title,
            assoc=self.assoc.native_id,
        )
        try:
            self.send_msg(rsp, context_id)
        except Exception as exc:  # noqa: BLE001 - unanswerable after all: abort rather than hang
            self._abort(Refusal(f"response could not be sent ({type(exc).__name__})"))

    def _abort(self, refusal: Refusal) -> None:
        self.message = None
        log.warning(
            "dimse.request_aborted",
            reason=refusal.reason,
            calling_ae=self.assoc.requestor.ae_title,
            assoc=self.assoc.native_id,
        )
        # Evt19 (invalid PDU) makes the state machine send an A-ABORT and tell the association
        # (AA-8), exactly as pynetdicom does for a message it cannot convert.
        self.dul.event_queue.put("Evt19")


def install(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of the listener: guard the new association's DIMSE provider."""
    event.assoc.dimse = GuardedDIMSEProvider(event.assoc)
