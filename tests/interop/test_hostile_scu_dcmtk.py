"""tests/hostile_scu.py against DCMTK's storescp: a second, independent SCP understands what the
module sends well-formed (so the node's tests do not only test pynetdicom against itself)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_scu import VERIFICATION, HostileSCU
from peer_support import dcmtk_env
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage
from tests_support import free_port, require_tool, wait_until

from dicom_node import statuses
from engine.synthetic import make_ct_dataset

pytestmark = pytest.mark.interop

CT = str(CTImageStorage)
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
CONTEXTS = [(CT, [EXPLICIT]), (VERIFICATION, [IMPLICIT])]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """storescp on a free port, announcing a 4096-byte maximum PDU, writing into a folder."""
    exe = require_tool("storescp")
    out, port = tmp_path / "storescp", free_port()
    out.mkdir()
    proc = subprocess.Popen(
        [exe, "--max-pdu", "4096", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _listening(port), 30, "storescp to listen")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_storescp_answers_echo_and_stores_a_dataset_sent_over_several_pdus(storescp):
    port, out = storescp
    ds = make_ct_dataset(uid_seed="hostile-dcmtk", rows=128, cols=128)
    data = encode(ds, False, True)
    with HostileSCU(
        "127.0.0.1", port, called_ae="STORESCP", calling_ae="FUZZER", contexts=CONTEXTS
    ) as scu:
        assert scu.peer_max_pdu == 4096
        assert scu.c_echo() == statuses.SUCCESS
        status = scu.c_store(
            data, sop_class=CT, sop_instance=ds.SOPInstanceUID, transfer_syntax=EXPLICIT
        )
        assert status == statuses.SUCCESS, scu.outcome
        assert scu.pdus_sent > len(data) // 4096
    (written,) = out.iterdir()
    assert dcmread(written).PixelData == ds.PixelData


def test_a_blank_instance_uid_reaches_storescp_and_its_refusal_is_reported(storescp):
    port, out = storescp
    ds = make_ct_dataset(uid_seed="hostile-dcmtk-blank")
    with HostileSCU("127.0.0.1", port, called_ae="STORESCP", contexts=CONTEXTS, timeout=30) as scu:
        status = scu.c_store(
            encode(ds, False, True), sop_class=CT, sop_instance="", transfer_syntax=EXPLICIT
        )
        # DCMTK refuses the malformed command: a failure status or an A-ABORT, never silence
        assert scu.outcome in ("response", "aborted"), scu.outcome
        assert status != statuses.SUCCESS
    assert list(out.iterdir()) == []
