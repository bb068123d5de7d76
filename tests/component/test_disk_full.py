"""A disk that fills up for real: the node's state folder on a small tmpfs (needs root, as CI
has; elsewhere the tests skip, under CI=true they fail)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from tests_support import REQUIRE_PEERS, node_config, wait_until, write_series

from dicom_node.cli import main
from dicom_node.config import AssemblyConfig, DestinationConfig, JobsConfig
from dicom_node.export import send_paths
from dicom_node.logs import configure_logging
from dicom_node.service import Node


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        msg = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if REQUIRE_PEERS:
            pytest.fail(msg)
        pytest.skip(msg)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        f.write(bytes(max(0, free - leave_bytes)))
    return filler


def test_a_job_that_finds_the_disk_full_waits_and_finishes_by_itself(
    small_disk, tmp_path, archive, capsys
):
    """Defect 8: a job that hit ENOSPC writing its output failed and needed a manual retry, and
    the worker logged a database error at every poll while the disk was full."""
    configure_logging("json", "info")
    base = node_config(small_disk / "state", archive.port)
    cfg = dataclasses.replace(
        base,
        # complete by the expected count only, so the job starts when the test says so
        assembly=AssemblyConfig(stable_age_s=3600, poll_interval_s=0.05),
        jobs=dataclasses.replace(JobsConfig(), disk_full_retry_s=0.5),
    )
    series = write_series(tmp_path / "src", n_slices=10, size=256, uid_seed="disk-full")
    for p in series:
        ds = dcmread(p)
        ds.ImagesInAcquisition = len(series)
        ds.save_as(p)
    seen: list[str] = []
    node = Node(cfg)
    node.start()
    try:
        to_node = DestinationConfig("node", "LTDIFF", "127.0.0.1", node.port)
        assert not send_paths(to_node, "PACS", series[:-1]).failed
        filler = _fill(small_disk, leave_bytes=400 << 10)  # room for one instance, not the output
        assert not send_paths(to_node, "PACS", series[-1:]).failed
        wait_until(
            lambda: node.store.status_report()["waiting"], 60, "the job waiting for disk space"
        )
        (waiting,) = node.store.status_report()["waiting"]
        assert "disk full" in waiting["reason"]
        (job,) = node.store.status_report()["recent_jobs"]
        assert job["state"] == "queued", "waiting, not failed"
        assert main(["status", "--set", f"node.state_dir='{cfg.state_dir}'"]) == 0
        seen.append(capsys.readouterr().out)
        assert "waiting (retried by the node itself):" in seen[-1]
        assert f"job {job['id']}: disk full writing the output" in seen[-1]
        filler.unlink()
        wait_until(
            lambda: node.store.status_report()["recent_jobs"][0]["state"] == "done",
            60,
            "the job to finish by itself once there is space",
        )
        derived = node.store.status_report()["recent_jobs"][0]["derived_series_uid"]
        assert len(archive.series_files(derived)) == len(series)
    finally:
        node.stop()
    seen.append(capsys.readouterr().out)
    events = [
        json.loads(line)["event"] for line in "".join(seen).splitlines() if line.startswith("{")
    ]
    assert "job.waiting_for_disk" in events
    assert "job.failed" not in events and "worker.claim_failed" not in events
    assert events.count("worker.database_unavailable") <= 1, "logged once, not at every poll"


def test_below_the_free_space_minimum_workers_wait_and_reception_refuses(
    small_disk, tmp_path, capsys
):
    """Defect 8: min_free_disk_mb guarded reception only; now the worker does not start a job
    below it either, and says so once."""
    configure_logging("json", "info")
    cfg = dataclasses.replace(
        node_config(small_disk / "state", None),
        listener=dataclasses.replace(node_config(tmp_path, None).listener, min_free_disk_mb=4),
    )
    node = Node(cfg)
    node.start()
    try:
        to_node = DestinationConfig("node", "LTDIFF", "127.0.0.1", node.port)
        series = write_series(tmp_path / "src", n_slices=3, size=64, uid_seed="low-disk")
        filler = _fill(small_disk, leave_bytes=2 << 20)
        result = send_paths(to_node, "PACS", series)
        assert not result.sent and all("0xA700" in why for _, why in result.failed)
        wait_until(
            lambda: '"worker.waiting_for_disk"' in capsys.readouterr().out,
            30,
            "the worker to report the low disk",
        )
        filler.unlink()
        result = send_paths(to_node, "PACS", series)
        assert len(result.sent) == len(series)
        wait_until(
            lambda: node.store.status_report()["jobs"].get("done") == 1, 60, "the job to run"
        )
    finally:
        node.stop()
