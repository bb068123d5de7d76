"""Interop with real peers: DCMTK as the modality, Orthanc as the PACS (verified by REST)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from peer_support import Orthanc, dcmtk_env
from pydicom import dcmread
from tests_support import (
    free_port,
    require_tool,
    serve,
    wait_until,
    write_series,
    write_site_config,
)

from dicom_node.config import DestinationConfig, NodeConfig
from dicom_node.service import Node

pytestmark = pytest.mark.interop


def _orthanc_dest(orthanc: Orthanc) -> DestinationConfig:
    return DestinationConfig(
        name="pacs",
        ae_title=orthanc.aet,
        host="127.0.0.1",
        port=orthanc.dicom_port,
        max_attempts=5,
        backoff_initial_s=0.5,
    )


def _node_with_orthanc(tmp_path: Path, orthanc: Orthanc) -> Node:
    from tests_support import node_config

    base = node_config(tmp_path / "state", None)
    cfg = NodeConfig(
        **{
            **base.__dict__,
            "destinations": (_orthanc_dest(orthanc),),
            "routes": tuple(
                type(r)(r.name, r.engine, ("pacs",), r.match, r.exclude) for r in base.routes
            ),
        }
    )
    node = Node(cfg)
    node.start()
    return node


def _storescu(
    storescu: str, port: int, files: list[Path], aec: str = "LTDIFF", options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            storescu,
            *options,
            "-aet",
            "MODALITY",
            "-aec",
            aec,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _wait_derived_in_orthanc(node: Node, orthanc: Orthanc, n: int, timeout: float = 90) -> str:
    def done() -> bool:
        jobs = node.store.status_report()["recent_jobs"]
        return bool(jobs) and jobs[0]["state"] == "done"

    wait_until(done, timeout, f"job done: {node.store.status_report()}")
    derived_uid = node.store.status_report()["recent_jobs"][0]["derived_series_uid"]
    wait_until(lambda: len(orthanc.series_instances(derived_uid)) == n, 30, "instances in Orthanc")
    return str(derived_uid)


def test_echoscu_gets_success_from_node(start_node, echoscu):
    node = start_node()
    r = subprocess.run(
        [echoscu, "-aet", "MODALITY", "-aec", "LTDIFF", "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr


# (compressor, its arguments, the storescu option that proposes that transfer syntax)
COMPRESSORS: dict[str, tuple[str, list[str], str] | None] = {
    "uncompressed": None,
    "rle": ("dcmcrle", [], "-xr"),
    "jpeg-ls-lossless": ("dcmcjpls", [], "-xt"),
    "jpeg-lossless-sv1": ("dcmcjpeg", ["+e1"], "-xs"),
}


@pytest.mark.parametrize("syntax", list(COMPRESSORS))
def test_storescu_series_comes_back_standardized_in_orthanc(tmp_path, orthanc, storescu, syntax):
    series = write_series(tmp_path / "src", n_slices=5, size=96, uid_seed=f"dcmtk-{syntax}")
    options: tuple[str, ...] = ()
    if COMPRESSORS[syntax] is not None:
        tool, args, propose = COMPRESSORS[syntax]
        options = (propose,)
        exe = require_tool(tool)
        for p in series:
            subprocess.run(
                [exe, *args, str(p), str(p)], check=True, capture_output=True, timeout=60
            )
        assert dcmread(series[0]).file_meta.TransferSyntaxUID.is_compressed
    node = _node_with_orthanc(tmp_path, orthanc)
    try:
        r = _storescu(storescu, node.port, series, options=options)
        assert r.returncode == 0, r.stderr
        derived_uid = _wait_derived_in_orthanc(node, orthanc, len(series))
        inst = orthanc.series_instances(derived_uid)
        tags = orthanc.tags(inst[0]["ID"])
        src = dcmread(series[0], stop_before_pixels=True)
        assert tags["StudyInstanceUID"] == src.StudyInstanceUID
        assert tags["ImageType"].startswith("DERIVED\\SECONDARY")
        assert tags["SeriesDescription"].startswith("STD Bl64d-like")
        assert (
            "ltdiff" in tags["DerivationDescription"].lower()
            or "linear" in tags["DerivationDescription"].lower()
        )
        assert int(tags["SeriesNumber"]) == int(src.SeriesNumber) + 1000
    finally:
        node.stop()


def test_pacs_routes_series_to_node_and_receives_the_standardized_series(
    tmp_path, orthanc, storescu
):
    """Modality -> PACS (storescu -> Orthanc); PACS routes to the node (Orthanc C-STORE);
    the node sends the derived series back to the PACS."""
    series = write_series(tmp_path / "src", n_slices=6, size=96, uid_seed="pacs-route")
    r = _storescu(storescu, orthanc.dicom_port, series, aec="ORTHANC")
    assert r.returncode == 0, r.stderr
    node = _node_with_orthanc(tmp_path, orthanc)
    try:
        orthanc.rest(
            "/modalities/ltdiff",
            {"AET": "LTDIFF", "Host": "127.0.0.1", "Port": node.port},
            method="PUT",
        )
        src_uid = dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID
        (orthanc_series_id,) = orthanc.find_series(src_uid)
        orthanc.rest(
            "/modalities/ltdiff/store", {"Resources": [orthanc_series_id], "Synchronous": True}
        )
        derived_uid = _wait_derived_in_orthanc(node, orthanc, len(series))
        study = orthanc.rest(f"/series/{orthanc.find_series(derived_uid)[0]}")["ParentStudy"]
        assert study == orthanc.rest(f"/series/{orthanc_series_id}")["ParentStudy"], (
            "same study in the PACS"
        )
    finally:
        node.stop()


def _status_json(cfg: Path) -> dict[str, Any]:
    """`ltdiff-node status --json` as an operator would run it, in its own process."""
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "status", "--json", "-c", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def test_node_killed_mid_series_loses_nothing(tmp_path, orthanc, storescu):
    """The series completes by its expected count (ImagesInAcquisition) and never by idle time
    (an hour), so the outcome does not depend on how fast a busy machine restarts the node and
    the sender: one job with all 8 instances."""
    port = free_port()
    cfg = write_site_config(
        tmp_path / "site.toml",
        tmp_path / "state",
        port,
        f"""
[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
backoff_initial_s = 0.5
""",
        stable_age_s=3600,
        poll_interval_s=0.1,
    )
    log = tmp_path / "node.log"
    series = write_series(tmp_path / "src", n_slices=8, size=96, uid_seed="killed")
    for p in series:
        ds = dcmread(p)
        ds.ImagesInAcquisition = len(series)
        ds.save_as(p)
    proc = serve(cfg, log)
    assert _storescu(storescu, port, series[:4]).returncode == 0
    os.kill(proc.pid, signal.SIGKILL)  # power cut: no clean shutdown
    proc.wait(timeout=10)
    proc = serve(cfg, log)
    try:
        assert _storescu(storescu, port, series[4:]).returncode == 0

        def delivered() -> bool:
            jobs = _status_json(cfg)["recent_jobs"]
            return bool(jobs) and jobs[0]["state"] == "done"

        wait_until(delivered, 90, "job done after restart")
        (job,) = _status_json(cfg)["recent_jobs"]
        assert job["n_instances"] == 8
        assert len(orthanc.series_instances(job["derived_series_uid"])) == 8
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert any(line["event"] == "series.done" for line in lines), (
            "one canonical line per series"
        )
        text = log.read_text()
        assert "PHANTOM" not in text and "PatientName" not in text, "no PHI in the logs"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0, "SIGTERM stops the node cleanly"
