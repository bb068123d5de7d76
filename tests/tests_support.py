"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmwrite

from dicom_node.config import NodeConfig
from dicom_node.demo import loopback_config
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
