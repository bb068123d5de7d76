"""The node end to end on loopback: receive, complete, route, engine, export; with faults."""

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from tests_support import free_port, node_config, wait_until, write_series

from dicom_node.archive import FolderArchive
from dicom_node.config import DestinationConfig, UnmatchedAction, UnmatchedConfig
from dicom_node.export import send_paths
from dicom_node.service import Node
from dicom_node.store import JobState


def _to(node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


def _jobs(node):
    return node.store.status_report(limit=50)["recent_jobs"]


def _wait_job(node, state=JobState.DONE, n=1, timeout=60.0):
    def ok():
        jobs = _jobs(node)
        return len([j for j in jobs if j["state"] == state.value]) >= n

    wait_until(ok, timeout, f"{n} job(s) {state.value}: {_jobs(node)}")
    return [j for j in _jobs(node) if j["state"] == state.value]


def test_br40_series_comes_back_standardized_with_derived_headers(start_node, archive, br40_series):
    node = start_node(dest_port=archive.port)
    send_paths(_to(node), "PACS", br40_series)
    (job,) = _wait_job(node)
    files = archive.series_files(job["derived_series_uid"])
    assert len(files) == len(br40_series)
    src = dcmread(br40_series[0])
    out = [dcmread(f) for f in files]
    for ds in out:
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID == job["derived_series_uid"] != src.SeriesInstanceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {
            dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in br40_series
        }
    # the engine changed the pixels (sharper kernel), and the geometry is the source's
    by_pos = {float(d.ImagePositionPatient[2]): d for d in out}
    s0 = dcmread(br40_series[2])
    d0 = by_pos[float(s0.ImagePositionPatient[2])]
    assert d0.pixel_array.shape == s0.pixel_array.shape
    assert not np.array_equal(d0.pixel_array, s0.pixel_array)


def test_other_kernels_are_not_processed_and_discarded(start_node, archive, tmp_path):
    node = start_node(dest_port=archive.port)
    bl64 = write_series(tmp_path / "bl64", kernel="Bl64d", uid_seed="bl64")
    send_paths(_to(node), "PACS", bl64)
    wait_until(lambda: node.store.status_report()["series"].get("discarded") == 1, 10, "discard")
    assert _jobs(node) == []


def test_unmatched_series_forwarded_unchanged_when_configured(tmp_path, archive):
    cfg = node_config(tmp_path / "state", archive.port)
    cfg = type(cfg)(
        **{**cfg.__dict__, "unmatched": UnmatchedConfig(UnmatchedAction.FORWARD, ("archive",))}
    )
    node = Node(cfg)
    node.start()
    try:
        bl64 = write_series(tmp_path / "bl64", kernel="Bl64d", uid_seed="fwd")
        send_paths(_to(node), "PACS", bl64)
        _wait_job(node)
        series_uid = dcmread(bl64[0], stop_before_pixels=True).SeriesInstanceUID
        got = archive.series_files(series_uid)
        assert sorted(p.name for p in got) == sorted(p.name for p in bl64)
        assert dcmread(got[0]).PixelData == dcmread(tmp_path / "bl64" / got[0].name).PixelData
    finally:
        node.stop()


def test_own_output_sent_back_is_not_processed_again(start_node, archive, br40_series):
    node = start_node(dest_port=archive.port)
    send_paths(_to(node), "PACS", br40_series)
    (job,) = _wait_job(node)
    derived = archive.series_files(job["derived_series_uid"])
    send_paths(_to(node), "PACS", derived)  # a PACS rule that routes everything back
    wait_until(
        lambda: node.store.status_report()["series"].get("discarded") == 1,
        10,
        "loop guard discards the derived series",
    )
    assert len(_jobs(node)) == 1


def test_destination_down_then_up_retries_deliver(tmp_path, start_node, br40_series):
    port = free_port()
    node = start_node(dest_port=port)
    send_paths(_to(node), "PACS", br40_series)
    wait_until(lambda: node.store.status_report()["retrying"], 30, "a failed export attempt")
    archive = FolderArchive(tmp_path / "late-archive", port=port).start()
    try:
        (job,) = _wait_job(node)
        assert len(archive.series_files(job["derived_series_uid"])) == len(br40_series)
    finally:
        archive.stop()


def test_destination_never_up_becomes_dead_letter_then_retry_delivers(
    tmp_path, start_node, br40_series
):
    from dicom_node.cli import main

    port = free_port()
    node = start_node(dest_port=port)
    send_paths(_to(node), "PACS", br40_series)
    (job,) = _wait_job(node, JobState.FAILED)
    assert "dead letter" in job["error"]
    dead = node.store.status_report()["dead_letters"]
    assert dead[0]["instances"] == len(br40_series)
    archive = FolderArchive(tmp_path / "archive2", port=port).start()
    try:
        assert (
            main(["retry", str(job["id"]), "--set", f"node.state_dir='{node.config.state_dir}'"])
            == 0
        )
        _wait_job(node, JobState.DONE)
        assert len(archive.series_files(job["derived_series_uid"])) == len(br40_series)
    finally:
        archive.stop()


def test_node_stopped_mid_series_resumes_after_restart(tmp_path, archive, br40_series):
    cfg = node_config(tmp_path / "state", archive.port)
    node = Node(cfg)
    node.start()
    send_paths(_to(node), "PACS", br40_series[:3])
    node.stop()  # before the series is complete
    node2 = Node(cfg)
    node2.start()
    try:
        send_paths(_to(node2), "PACS", br40_series[3:])
        (job,) = _wait_job(node2)
        assert len(archive.series_files(job["derived_series_uid"])) == len(br40_series)
    finally:
        node2.stop()


def test_late_instance_reprocesses_series_with_same_derived_uids(start_node, archive, tmp_path):
    series = write_series(tmp_path / "late", n_slices=5, uid_seed="late")
    node = start_node(dest_port=archive.port)
    send_paths(_to(node), "PACS", series[:4])
    (first,) = _wait_job(node)
    first_files = {p.name for p in archive.series_files(first["derived_series_uid"])}
    send_paths(_to(node), "PACS", series[4:])
    jobs = _wait_job(node, n=2)
    assert {j["derived_series_uid"] for j in jobs} == {first["derived_series_uid"]}
    second_files = {p.name for p in archive.series_files(first["derived_series_uid"])}
    assert first_files < second_files and len(second_files) == 5


def test_malformed_pixel_data_fails_the_job_clearly_and_node_keeps_serving(
    start_node, archive, tmp_path
):
    node = start_node(dest_port=archive.port)
    broken = write_series(tmp_path / "broken", n_slices=3, uid_seed="broken")
    for p in broken:
        ds = dcmread(p)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data
        ds.save_as(p, enforce_file_format=True)
    send_paths(_to(node), "PACS", broken)
    (failed,) = _wait_job(node, JobState.FAILED)
    assert failed["error"], "the failure says why"
    good = write_series(tmp_path / "good", n_slices=3, uid_seed="good")
    send_paths(_to(node), "PACS", good)
    _wait_job(node, JobState.DONE)


def test_status_command_shows_jobs(start_node, archive, br40_series, capsys):
    from dicom_node.cli import main

    node = start_node(dest_port=archive.port)
    send_paths(_to(node), "PACS", br40_series)
    _wait_job(node)
    assert main(["status", "--set", f"node.state_dir='{node.config.state_dir}'"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "br40-to-bl64" in out
    assert "PHANTOM" not in out and "PatientName" not in out


def test_enhanced_ct_instance_is_standardized_into_single_frame_ct_images(start_node, archive):
    """Enhanced CT (multi-frame) is accepted and becomes one CT Image per frame."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None, "pydicom-data ships eCT_Supplemental.dcm (installed by make test)"
    source = dcmread(path)
    # The route matches ^Br40; this file has no kernel. Put one where Enhanced CT keeps it:
    # the CT Reconstruction functional group macro (PS3.3 C.8.15.3.6).
    recon = Dataset()
    recon.ConvolutionKernel = "Br40d"
    source.SharedFunctionalGroupsSequence[0].CTReconstructionSequence = [recon]
    src_file = archive.root.parent / "ect.dcm"
    source.save_as(src_file, enforce_file_format=True)
    node = start_node(dest_port=archive.port)
    assert send_paths(_to(node), "PACS", [src_file]).sent == [0]
    (job,) = _wait_job(node)
    out = [dcmread(p) for p in archive.series_files(job["derived_series_uid"])]
    assert len(out) == int(source.NumberOfFrames)
    assert {ds.SOPClassUID for ds in out} == {"1.2.840.10008.5.1.4.1.1.2"}
    refs = {int(ds.SourceImageSequence[0].ReferencedFrameNumber) for ds in out}
    assert refs == set(range(1, int(source.NumberOfFrames) + 1))
