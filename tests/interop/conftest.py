"""Real peers for interop tests: Orthanc (the PACS) started with a temporary configuration on
free loopback ports, and DCMTK's command-line tools (the modality). Under CI a missing peer fails
the tests (tests_support.require_tool); elsewhere they skip with the install command."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests_support import free_port, require_tool, wait_until

pytestmark = pytest.mark.interop


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def rest(self, path: str, body: Any = None, method: str | None = None) -> Any:
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def find_series(self, series_uid: str) -> list[str]:
        return list(
            self.rest(
                "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}}
            )
        )

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        ids = self.find_series(series_uid)
        if not ids:
            return []
        return list(self.rest(f"/series/{ids[0]}/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.rest(f"/instances/{instance_id}/simplified-tags"))


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on; without this it crawls at ~20 instances/s.
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    exe = "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else require_tool("Orthanc")
    http_port, dicom_port = free_port(), free_port()
    root = tmp_path / "orthanc"
    root.mkdir()
    config = {
        "Name": "ltdiff-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": True,
        "StableAge": 2,
        "Plugins": [],
        "HttpServerEnabled": True,
        "DicomModalities": {},
        "DicomModalitiesInDatabase": True,
    }
    cfg_path = root / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    log_path = root / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    o = Orthanc(http_port, dicom_port, "ORTHANC", proc, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {log_path.read_text()[-2000:]}")
        try:
            o.rest("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    wait_until(up, 60, "Orthanc's REST API")
    yield o
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def storescu() -> str:
    return require_tool("storescu")


@pytest.fixture
def echoscu() -> str:
    return require_tool("echoscu")
