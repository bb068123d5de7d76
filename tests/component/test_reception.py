"""C-ECHO/C-STORE SCP with real pynetdicom peers on loopback: statuses, durability, policies."""

from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from dicom_node import statuses
from dicom_node.config import DestinationConfig, OtherStorage
from dicom_node.export import echo, send_paths
from engine.synthetic import make_ct_dataset


def _to(node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


def _store_one(node, ds, calling_ae="PACS", sop_class=CTImageStorage) -> int:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_echo_succeeds(start_node):
    node = start_node()
    ok, what = echo(_to(node), "PACS")
    assert ok, what


def test_stored_instances_are_in_the_spool_and_database_before_success(start_node, br40_series):
    node = start_node()
    result = send_paths(_to(node), "PACS", br40_series)
    assert len(result.sent) == len(br40_series) and not result.failed
    for p in br40_series:
        sop = dcmread(p, stop_before_pixels=True).SOPInstanceUID
        assert node.store.has_instance(sop)
    (series,) = {dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in br40_series}
    spooled = sorted(x.name for x in (node.config.spool_dir / series).iterdir())
    assert spooled == sorted(p.name for p in br40_series)
    # the spooled bytes are the sender's dataset, untouched
    original = dcmread(br40_series[0])
    copy = dcmread(node.config.spool_dir / series / br40_series[0].name)
    assert copy.PixelData == original.PixelData


def test_duplicate_instance_is_idempotent(start_node, br40_series):
    node = start_node()
    send_paths(_to(node), "PACS", br40_series[:1])
    again = send_paths(_to(node), "PACS", br40_series[:1])
    assert again.sent == [0]
    (s,) = node.store.receiving_series()
    assert s.n_instances == 1


def test_calling_ae_not_on_allow_list_is_rejected(start_node, br40_series):
    node = start_node(allowed_calling_ae_titles=("PACS",))
    assert send_paths(_to(node), "PACS", br40_series[:1]).sent == [0]
    result = send_paths(_to(node), "INTRUDER", br40_series[:1])
    assert result.sent == []
    assert "rejected" in result.failed[0][1]


def test_source_address_not_allowed_is_refused(start_node, br40_series):
    node = start_node(allowed_addresses=("192.0.2.1",))
    result = send_paths(_to(node), "PACS", br40_series[:1])
    assert result.sent == []


def test_non_ct_storage_is_not_negotiated_by_default(start_node):
    node = start_node()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {CTImageStorage}
    finally:
        assoc.release()


def test_non_ct_storage_accepted_when_configured(start_node):
    node = start_node(other_storage=OtherStorage.ACCEPT)
    ds = make_ct_dataset(uid_seed="mr-as-other")
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    assert _store_one(node, ds, sop_class=MRImageStorage) == statuses.SUCCESS


def test_invalid_series_uid_gets_cannot_understand_and_node_keeps_serving(start_node):
    node = start_node()
    bad = make_ct_dataset(uid_seed="bad-uid")
    bad.SeriesInstanceUID = "1.2.03.4"  # leading zero: not a valid UID, must never become a path
    assert _store_one(node, bad) == statuses.CANNOT_UNDERSTAND_INVALID_UID
    good = make_ct_dataset(uid_seed="good-uid")
    assert _store_one(node, good) == statuses.SUCCESS


def test_unwritable_spool_answers_out_of_resources_and_sender_keeps_its_copy(start_node):
    node = start_node()
    ds = make_ct_dataset(uid_seed="unwritable")
    # the series folder cannot be created: a file is in its way (works as root too)
    Path(node.config.spool_dir / ds.SeriesInstanceUID).write_text("in the way")
    assert _store_one(node, ds) == statuses.OUT_OF_RESOURCES
    assert not node.store.has_instance(ds.SOPInstanceUID), "nothing recorded that is not stored"
    other = make_ct_dataset(uid_seed="writable")
    assert _store_one(node, other) == statuses.SUCCESS


def test_low_disk_space_answers_out_of_resources(start_node):
    node = start_node(receiver_processes=0)  # the limit is changed in this process's spool
    node.spool.min_free_bytes = 1 << 62
    assert _store_one(node, make_ct_dataset(uid_seed="full-disk")) == statuses.OUT_OF_RESOURCES
