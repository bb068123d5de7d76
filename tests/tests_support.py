"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite

from dicom_node.config import NodeConfig
from dicom_node.demo import loopback_config
from engine.envelope import Span, ValidatedEnvelope
from engine.synthetic import make_ct_series

REQUIRE_PEERS = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of a peer program; under CI a missing peer fails the test instead of skipping it."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install -y orthanc dcmtk; `make test` does it)"
        if REQUIRE_PEERS:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def require_cluster_extra() -> None:
    """Skip without Dask distributed (the `cluster` extra); under CI, where `make test` installs
    every extra, fail instead."""
    from dicom_node.cluster import missing_package

    missing = missing_package()
    if missing is not None:
        msg = f"{missing} is not installed: the 'cluster' extra (`make test` installs it)"
        if REQUIRE_PEERS:
            pytest.fail(msg)
        pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_series(
    directory: Path,
    n_slices: int = 6,
    size: int = 64,
    kernel: str = "Br40d",
    uid_seed: str = "test-series",
    **kwargs: object,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_ct_series(n_slices, size, size, kernel, uid_seed=uid_seed, **kwargs):
        p = directory / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(p, ds, enforce_file_format=True)
        paths.append(p)
    return paths


def folder_contents(folder: Path) -> dict[str, tuple[str, str, bytes]]:
    """file path relative to `folder` -> (SOP Instance UID, Series Instance UID, pixel bytes)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            ds = dcmread(path)
            out[str(path.relative_to(folder))] = (
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                bytes(ds.PixelData),
            )
    return out


def chest_envelope(noise_hu: tuple[float, float] = (5.0, 40.0)) -> ValidatedEnvelope:
    """An envelope like a chest CT model's: 0.6-1.0 mm pixels, 0.5-2 mm slices, 32-512 pixels
    square, Br40d / Br40f, `noise_hu`. The default `tests_support.write_series` series (0.7 mm,
    1 mm, 64 x 64, Br40d) is inside it except for its noise (a noise-free phantom: 0 HU)."""
    return ValidatedEnvelope(
        pixel_spacing_mm=Span(0.6, 1.0),
        slice_thickness_mm=Span(0.5, 2.0),
        rows=Span(32, 512),
        columns=Span(32, 512),
        source_kernels=("Br40d", "Br40f"),
        noise_hu=Span(*noise_hu),
        validated_on=("T001", "T002"),
    )


def node_config(state_dir: Path, dest_port: int | None, **listener: object) -> NodeConfig:
    """Fast-moving test node: 0.5 s stable age, quick retries (4 attempts from 0.2 s)."""
    return loopback_config(
        state_dir,
        dest_port,
        stable_age_s=0.5,
        poll_interval_s=0.05,
        max_attempts=4,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        **listener,
    )


# ---- the node as hospital IT runs it: `ltdiff-node serve` in a process of its own --------------


def write_site_config(
    path: Path,
    state: Path,
    port: int,
    extra: str = "",
    *,
    stable_age_s: float = 0.5,
    poll_interval_s: float = 0.05,
    metrics_port: int | None = None,
    listener: str = "",
) -> Path:
    """A site file for a node on loopback: JSON logs at info level, no free-space minimum, quick
    series completion, metrics off unless `metrics_port` is given (the default port 9464 may be
    taken by another node on this machine). `extra` is appended (more tables, e.g.
    [[destinations]]); `listener`, more keys of [listener]."""
    metrics = "enabled = false" if metrics_port is None else f"port = {metrics_port}"
    path.write_text(
        f"""
[node]
state_dir = "{state}"
log_format = "json"
log_level = "info"
[listener]
ae_title = "LTDIFF"
bind_address = "127.0.0.1"
port = {port}
min_free_disk_mb = 0
{listener}
[assembly]
stable_age_s = {stable_age_s}
poll_interval_s = {poll_interval_s}
[metrics]
{metrics}
{extra}
"""
    )
    return path


def log_events(log: Path) -> list[dict[str, Any]]:
    """The JSON events of a node's log file, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def serve(
    config: Path,
    log: Path,
    *,
    stderr: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 90.0,
) -> subprocess.Popen[bytes]:
    """Start `python -m dicom_node.cli serve -c config` with stdout appended to `log` (stderr
    too, unless `stderr` names its own file) and wait for a new `node.ready` event."""
    ready_before = sum(e["event"] == "node.ready" for e in log_events(log))
    with log.open("ab") as out, (stderr or log).open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT if stderr is None else err,
            env=None if env is None else dict(env),
            cwd=cwd,
        )

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] + (stderr.read_text()[-3000:] if stderr else "")
            raise AssertionError(f"the node exited: {tail}")
        return sum(e["event"] == "node.ready" for e in log_events(log)) > ready_before

    wait_until(ready, timeout, "node.ready in the log")
    return proc
