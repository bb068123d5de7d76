"""The test-support requestor (tests/hostile_scu.py) against a real pynetdicom SCP on loopback:
what it sends well-formed is understood, datasets arrive byte for byte, PDU limits are kept, and
every way a peer can fail to answer is reported."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostile_scu import VERIFICATION, AssociationUnusableError, HostileSCU
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from dicom_node import statuses
from engine.synthetic import make_ct_dataset

CT = str(CTImageStorage)
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
CONTEXTS = [(CT, [EXPLICIT]), (CT, [IMPLICIT]), (VERIFICATION, [IMPLICIT])]


class Scp:
    """A pynetdicom Storage SCP on an OS-assigned port that records what it receives."""

    def __init__(self, on_store: Callable[[evt.Event], int] | None = None, **ae_options: Any):
        self.received: list[tuple[str, str, bytes]] = []
        self.pdata_lengths: list[int] = []
        self._on_store = on_store
        ae = AE(ae_title="SCP")
        for key, value in ae_options.items():
            setattr(ae, key, value)
        ae.add_supported_context(VERIFICATION)
        ae.add_supported_context(CT, [EXPLICIT, IMPLICIT])
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_C_ECHO, lambda e: 0),
                (evt.EVT_PDU_RECV, self._pdu),
            ],
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        req = event.request
        self.received.append(
            (
                str(req.AffectedSOPClassUID),
                str(req.AffectedSOPInstanceUID),
                event.request.DataSet.getvalue(),
            )
        )
        return self._on_store(event) if self._on_store else 0

    def _pdu(self, event: evt.Event) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            self.pdata_lengths.append(len(event.pdu.encode()) - 6)


@pytest.fixture
def scp() -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(on_store: Callable[[evt.Event], int] | None = None, **ae_options: Any) -> Scp:
        s = Scp(on_store, **ae_options)
        started.append(s)
        return s

    yield start
    for s in started:
        s.server.shutdown()


def _dataset(seed: str = "hostile-scu", size: int = 64) -> tuple[bytes, str]:
    ds = make_ct_dataset(uid_seed=seed, rows=size, cols=size)
    return encode(ds, False, True), str(ds.SOPInstanceUID)


def test_echo_gets_success(scp):
    server = scp()
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=30
    ) as scu:
        assert scu.associated, scu.outcome
        assert scu.c_echo() == statuses.SUCCESS
        assert scu.last_response is not None and scu.last_response.message_id_responded_to == 1
    assert not scu.associated and not scu.aborted, "released cleanly"


def test_valid_c_store_gets_success_and_the_dataset_arrives_byte_for_byte(scp):
    server = scp()
    data, sop = _dataset()
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=30
    ) as scu:
        status = scu.c_store(data, sop_class=CT, sop_instance=sop, transfer_syntax=EXPLICIT)
        assert status == statuses.SUCCESS, scu.outcome
        assert scu.last_response.affected_sop_instance == sop
    assert server.received == [(CT, sop, data)]


def test_transfer_syntax_selects_the_presentation_context(scp):
    server = scp()
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=30
    ) as scu:
        assert {cx.transfer_syntax for cx in scu.accepted if cx.abstract_syntax == CT} == {
            EXPLICIT,
            IMPLICIT,
        }
        ds = make_ct_dataset(uid_seed="implicit")
        data = encode(ds, True, True)
        status = scu.c_store(
            data, sop_class=CT, sop_instance=ds.SOPInstanceUID, transfer_syntax=IMPLICIT
        )
        assert status == statuses.SUCCESS
        with pytest.raises(LookupError, match="no accepted presentation context"):
            scu.context_for(CT, "1.2.840.10008.1.2.4.50")


def test_dataset_is_split_over_several_pdus_within_the_peers_maximum(scp):
    server = scp(maximum_pdu_size=4096)
    data, sop = _dataset("split", size=128)  # 32 KiB of pixels
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=30
    ) as scu:
        assert scu.peer_max_pdu == 4096
        status = scu.c_store(data, sop_class=CT, sop_instance=sop, transfer_syntax=EXPLICIT)
        assert status == statuses.SUCCESS
        assert scu.pdus_sent >= len(data) // 4096 + 1
    assert server.received == [(CT, sop, data)], "reassembled byte for byte"
    assert max(server.pdata_lengths) <= 4096, server.pdata_lengths


def test_fragment_size_forces_many_pdus_when_the_peer_has_no_limit(scp):
    server = scp(maximum_pdu_size=0)
    data, sop = _dataset("fragments")
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, fragment_size=512
    ) as scu:
        assert scu.peer_max_pdu == 0
        assert scu.c_store(data, sop_class=CT, sop_instance=sop, transfer_syntax=EXPLICIT) == 0
        assert scu.pdus_sent > len(data) // 512
    assert server.received[0][2] == data
    assert max(server.pdata_lengths) <= 512


def test_rejected_association_is_reported(scp):
    server = scp(require_calling_aet=["PACS"])
    with HostileSCU("127.0.0.1", server.port, calling_ae="INTRUDER", contexts=CONTEXTS) as scu:
        assert scu.rejected and not scu.associated
        assert scu.reject_reason == (1, 1, 3), "rejected-permanent, service user, calling AE"
        with pytest.raises(AssociationUnusableError):
            scu.c_echo()


def test_no_response_within_the_timeout_returns_none_and_says_timeout(scp):
    gate = threading.Event()

    def stall(event: evt.Event) -> int:
        gate.wait(60)
        return 0

    server = scp(on_store=stall)
    data, sop = _dataset("stall")
    try:
        with HostileSCU(
            "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=1
        ) as scu:
            assert (
                scu.c_store(data, sop_class=CT, sop_instance=sop, transfer_syntax=EXPLICIT) is None
            )
            assert scu.outcome == "timeout"
            assert not scu.associated, "an association that timed out is unusable"
            with pytest.raises(AssociationUnusableError):
                scu.c_echo()
    finally:
        gate.set()


def test_peer_abort_returns_none_and_says_aborted(scp):
    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0

    server = scp(on_store=abort)
    data, sop = _dataset("abort")
    with HostileSCU(
        "127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=30
    ) as scu:
        assert scu.c_store(data, sop_class=CT, sop_instance=sop, transfer_syntax=EXPLICIT) is None
        assert scu.outcome == "aborted" and scu.aborted
        assert scu.abort_source == 0, "service user (the SCP's handler) aborted"


def test_uids_are_sent_verbatim_even_when_no_library_would(scp):
    """A blank Affected SOP Instance UID: pynetdicom's SCP silently drops such a request, which
    is what the node must not do (issue 8, item 10); here it shows the module sent it as is."""
    server = scp()
    data, _ = _dataset("verbatim")
    with HostileSCU("127.0.0.1", server.port, called_ae="SCP", contexts=CONTEXTS, timeout=1) as scu:
        assert scu.c_store(data, sop_class=CT, sop_instance="", transfer_syntax=EXPLICIT) is None
        assert scu.outcome == "timeout"
    assert server.received == []
