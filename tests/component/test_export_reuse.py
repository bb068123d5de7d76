"""The exporter against a real pynetdicom destination on loopback: one association carries
consecutive jobs, a kept association that the peer closed is noticed and replaced without an
instance lost, counted or marked twice, and each file goes out as written, in the transfer
syntax recorded when it was written."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from tests_support import wait_until
from tests_support import write_series as write_source_series

from dicom_node import export, statuses
from dicom_node.config import DestinationConfig
from dicom_node.export import Exporter
from dicom_node.part10 import dataset_offset
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.store import ExportState, InstanceRecord, JobKind, JobStore


class Destination:
    """A storage SCP that records each association it accepts and each C-STORE: the SOP
    Instance UID, the transfer syntax of the context and the data set's bytes as received.
    `abort_on_request`: the n-th C-STORE request aborts the association instead of storing."""

    def __init__(
        self, transfer_syntaxes: list[str] | None = None, maximum_pdu_size: int = 16382
    ) -> None:
        self.lock = threading.Lock()
        self.associations = 0
        self.stored: list[tuple[str, str, bytes]] = []
        self.requests = 0
        self.abort_on_request: int | None = None
        ae = AE(ae_title="DEST")
        ae.maximum_pdu_size = maximum_pdu_size
        ae.add_supported_context(CTImageStorage, transfer_syntaxes or ACCEPTED_TRANSFER_SYNTAXES)
        self.server: Any = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accept)],
        )
        self.port = int(self.server.server_address[1])

    def _on_accept(self, _event: evt.Event) -> None:
        with self.lock:
            self.associations += 1

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.requests += 1
            if self.requests == self.abort_on_request:
                event.assoc.abort()
                return statuses.SUCCESS  # never goes out: the association is gone
            self.stored.append(
                (
                    str(event.request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    bytes(event.request.DataSet.getvalue()),
                )
            )
        return statuses.SUCCESS

    def close_associations(self) -> None:
        for assoc in self.server.active_associations:
            assoc.abort()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def destination() -> Iterator[Destination]:
    d = Destination()
    yield d
    d.stop()


def _record(sop: str) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        series_uid=f"{sop}.0",
        study_uid="1.2",
        sop_class_uid=str(CTImageStorage),
        transfer_syntax=str(ExplicitVRLittleEndian),
        path=Path("/spool/x.dcm"),
        size_bytes=1,
        calling_ae="MOD",
        header={"Modality": "CT"},
        own_output=False,
        expected_count=None,
    )


def _queue_job(store: JobStore, files: list[Path], name: str, *, record_ts: bool = True) -> int:
    """A processed job whose output is `files`, queued for the destination "d"."""
    store.record_instance(_record(f"1.2.3.{name}"), now=100.0)
    job_id = store.complete_series(
        f"1.2.3.{name}.0",
        0,
        job_kind=JobKind.STANDARDIZE,
        rule="r",
        engine="e",
        destinations=("d",),
    )
    assert job_id is not None
    store.claim_job("w", (JobKind.STANDARDIZE,))
    metas = [dcmread(p, stop_before_pixels=True) for p in files]
    outputs = [
        (str(m.SOPInstanceUID), str(m.SOPClassUID), p) for m, p in zip(metas, files, strict=True)
    ]
    syntaxes = {str(m.SOPInstanceUID): str(m.file_meta.TransferSyntaxUID) for m in metas}
    store.start_export(
        job_id,
        outputs,
        ("d",),
        derived_series_uid=f"9.{name}",
        summary={},
        transfer_syntaxes=syntaxes if record_ts else None,
    )
    return job_id


def _exporter(
    store: JobStore, port: int, close_delay_s: float = 20.0, associations: int = 2
) -> Exporter:
    dest = DestinationConfig(
        name="d",
        ae_title="DEST",
        host="127.0.0.1",
        port=port,
        dimse_timeout_s=10.0,
        network_timeout_s=30.0,
        association_close_delay_s=close_delay_s,
        associations=associations,
    )
    return Exporter(
        dest,
        store,
        calling_ae="LTDIFF",
        stop=threading.Event(),
        wake=threading.Event(),
        on_progress=lambda: None,
    )


def _exports(store: JobStore) -> list[tuple[str, int]]:
    return [
        (r["state"], r["attempts"])
        for r in store._query("SELECT state, attempts FROM exports ORDER BY id")
    ]


def _data_set(path: Path) -> bytes:
    """The file's data set bytes, as written (after the Part 10 header)."""
    raw = path.read_bytes()
    offset = dataset_offset(raw[:144])
    assert offset is not None
    return raw[offset:]


def _sops(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def test_consecutive_jobs_go_out_over_one_association(tmp_path, destination):
    store = JobStore(tmp_path / "db.sqlite3")
    first = write_source_series(tmp_path / "a", n_slices=3, size=16, uid_seed="reuse-a")
    second = write_source_series(tmp_path / "b", n_slices=3, size=16, uid_seed="reuse-b")
    ex = _exporter(store, destination.port)
    try:
        _queue_job(store, first, "1")
        assert ex.run_once(1e12)
        assert ex.held.link is not None and ex.held.link.alive, "kept after the first job"
        _queue_job(store, second, "2")
        assert ex.run_once(1e12)
    finally:
        ex.held.close()
        store_rows = _exports(store)
        store.close()
    assert destination.associations == 1, "the second job reused the first job's association"
    assert [s for s, _, _ in destination.stored] == _sops(first) + _sops(second)
    assert store_rows == [(ExportState.SENT.value, 0)] * 6


def test_a_kept_association_the_peer_closed_is_replaced_without_losing_an_instance(
    tmp_path, destination
):
    store = JobStore(tmp_path / "db.sqlite3")
    first = write_source_series(tmp_path / "a", n_slices=2, size=16, uid_seed="closed-a")
    second = write_source_series(tmp_path / "b", n_slices=3, size=16, uid_seed="closed-b")
    ex = _exporter(store, destination.port)
    try:
        _queue_job(store, first, "1")
        assert ex.run_once(1e12)
        link = ex.held.link
        assert link is not None
        destination.close_associations()  # the PACS ends the idle association
        wait_until(lambda: not link.alive, 10, "the exporter to notice the peer's abort")
        _queue_job(store, second, "2")
        assert ex.run_once(1e12)
    finally:
        ex.held.close()
        rows = _exports(store)
        store.close()
    assert destination.associations == 2
    assert [s for s, _, _ in destination.stored] == _sops(first) + _sops(second), "each once"
    assert rows == [(ExportState.SENT.value, 0)] * 5, "nothing counted as a failed attempt"


def test_a_kept_association_closed_as_its_first_request_arrives_is_reopened_at_once(
    tmp_path, destination
):
    """The peer aborts the reused association on the next job's first C-STORE (it closed it
    just as the exporter sent): that instance is not a failed attempt; the job goes out on a
    new association, every instance stored and marked sent once."""
    store = JobStore(tmp_path / "db.sqlite3")
    first = write_source_series(tmp_path / "a", n_slices=2, size=16, uid_seed="race-a")
    second = write_source_series(tmp_path / "b", n_slices=3, size=16, uid_seed="race-b")
    ex = _exporter(store, destination.port)
    try:
        _queue_job(store, first, "1")
        assert ex.run_once(1e12)
        destination.abort_on_request = 3  # the first request of the second job
        _queue_job(store, second, "2")
        assert ex.run_once(1e12)
    finally:
        ex.held.close()
        rows = _exports(store)
        store.close()
    assert destination.associations == 2
    assert [s for s, _, _ in destination.stored] == _sops(first) + _sops(second)
    assert rows == [(ExportState.SENT.value, 0)] * 5


def test_the_file_goes_out_in_its_recorded_transfer_syntax_byte_for_byte(
    tmp_path, destination, monkeypatch
):
    """The transfer syntax recorded when the output was written picks the presentation
    context; the data set's bytes are the file's, unchanged (no decode, no re-encode), and the
    file meta is not parsed to find them."""
    files = write_source_series(tmp_path / "a", n_slices=2, size=16, uid_seed="bytes")

    def no_parse(_path: Path) -> Any:
        raise AssertionError("the file meta was parsed although the syntax was recorded")

    monkeypatch.setattr(export, "split_dataset", no_parse)
    store = JobStore(tmp_path / "db.sqlite3")
    ex = _exporter(store, destination.port, close_delay_s=0)
    try:
        _queue_job(store, files, "1")
        assert ex.run_once(1e12)
        assert ex.held.link is None, "close_delay_s = 0 releases after the batch"
    finally:
        rows = _exports(store)
        store.close()
    assert rows == [(ExportState.SENT.value, 0)] * 2
    for path, (sop, ts, data) in zip(files, destination.stored, strict=True):
        assert ts == str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert data == _data_set(path), f"{sop}: the bytes sent are not the file's data set"


@pytest.mark.parametrize("maximum_pdu_size", [4096, 0])
def test_requests_are_written_to_the_socket_in_the_peers_pdu_size(
    tmp_path, monkeypatch, maximum_pdu_size
):
    """Over plain TCP the exporter writes the C-STORE request itself (dicom_node.store_request),
    not through pynetdicom's send_msg, in PDUs no larger than the peer takes (0: no limit); the
    peer receives each file's data set byte for byte."""
    dest = Destination(maximum_pdu_size=maximum_pdu_size)
    files = write_source_series(tmp_path / "a", n_slices=3, size=64, uid_seed="pdu")

    written: list[int] = []
    real_send = export.send_within

    def counting_send(sock: Any, pieces: list[Any], timeout_s: float) -> None:
        written.append(len(pieces))
        real_send(sock, pieces, timeout_s)

    monkeypatch.setattr(export, "send_within", counting_send)
    store = JobStore(tmp_path / "db.sqlite3")
    ex = _exporter(store, dest.port, close_delay_s=0)
    try:
        _queue_job(store, files, "1")
        assert ex.run_once(1e12)
    finally:
        rows = _exports(store)
        store.close()
        dest.stop()
    assert rows == [(ExportState.SENT.value, 0)] * 3
    assert len(written) == 3, "each request was written directly"
    if maximum_pdu_size:  # 8 KB data sets: two or more PDUs each, header and data pieces
        assert min(written) >= 2 * 3
    for path, (_sop, _ts, data) in zip(files, dest.stored, strict=True):
        assert data == _data_set(path)


def test_a_large_batch_goes_out_over_two_associations_and_both_are_kept(tmp_path, destination):
    """`associations = 2`: a 40-instance job is split over two associations, every instance
    arrives once and byte for byte, and both associations are kept for the next job."""
    files = write_source_series(tmp_path / "a", n_slices=40, size=16, uid_seed="lanes")
    more = write_source_series(tmp_path / "b", n_slices=40, size=16, uid_seed="lanes-2")
    store = JobStore(tmp_path / "db.sqlite3")
    ex = _exporter(store, destination.port, associations=2)
    try:
        _queue_job(store, files, "1")
        assert ex.run_once(1e12)
        assert destination.associations == 2
        assert all(lane.link is not None for lane in ex.lanes), "both kept"
        _queue_job(store, more, "2")
        assert ex.run_once(1e12)
        assert destination.associations == 2, "the next job reused both"
    finally:
        rows = _exports(store)
        for lane in ex.lanes:
            lane.close()
        assert ex._lane_pool is not None
        ex._lane_pool.shutdown()
        store.close()
    assert rows == [(ExportState.SENT.value, 0)] * 80
    stored = {sop: data for sop, _ts, data in destination.stored}
    assert len(destination.stored) == len(stored) == 80, "each instance once"
    for path in files + more:
        assert stored[_sops([path])[0]] == _data_set(path)


def test_a_file_in_a_syntax_the_peer_refuses_is_converted(tmp_path):
    """A destination that accepts only Implicit VR Little Endian still gets an Explicit VR file
    (pynetdicom decodes and converts it), as before; and an export row queued without a
    recorded syntax (an older version's) reads it from the file."""
    dest = Destination([str(ImplicitVRLittleEndian)])
    files = write_source_series(tmp_path / "a", n_slices=2, size=16, uid_seed="convert")
    for p in files:  # make sure the files are Explicit VR Little Endian
        ds = dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        dcmwrite(p, ds, enforce_file_format=True)
    store = JobStore(tmp_path / "db.sqlite3")
    ex = _exporter(store, dest.port, close_delay_s=0)
    try:
        _queue_job(store, files, "1", record_ts=False)
        assert ex.run_once(1e12)
    finally:
        rows = _exports(store)
        store.close()
        dest.stop()
    assert rows == [(ExportState.SENT.value, 0)] * 2
    assert [ts for _, ts, _ in dest.stored] == [str(ImplicitVRLittleEndian)] * 2


def test_dataset_offset_reads_the_file_meta_group_length(tmp_path):
    (path,) = write_source_series(tmp_path / "a", n_slices=1, size=16, uid_seed="offset")
    raw = path.read_bytes()
    offset = dataset_offset(raw[:144])
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    assert offset == meta_end
    assert raw[offset : offset + 2] == b"\x08\x00", "the data set starts with group 0008"
    assert dataset_offset(b"\x00" * 144) is None, "no DICM prefix: parse the file meta instead"
    assert dataset_offset(raw[:100]) is None
