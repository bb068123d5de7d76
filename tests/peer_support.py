"""Real DICOM peers on free loopback ports, shared by the interop tests (tests/interop/conftest.py)
and the reception benchmark (benchmarks/bench_receive.py): Orthanc (the PACS) started with a
temporary configuration, and the environment DCMTK's tools need. No pytest here: the callers
decide whether a missing peer skips, fails or is reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests_support import free_port, wait_until

ORTHANC_DEBIAN_PATH = Path("/usr/sbin/Orthanc")


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on; without this it crawls at ~20 instances/s.
    return {**os.environ, "TCP_NODELAY": "1"}


def orthanc_executable() -> str | None:
    """Debian installs Orthanc in /usr/sbin, which is not on a normal user's PATH."""
    return str(ORTHANC_DEBIAN_PATH) if ORTHANC_DEBIAN_PATH.exists() else shutil.which("Orthanc")


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

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_orthanc(exe: str, root: Path, startup_timeout_s: float = 60) -> Orthanc:
    """Start Orthanc with its storage, index, configuration and log under `root` (created) and
    wait for its REST API. Its defaults are kept where they matter for speed (an fsync per
    stored file, SQLite index)."""
    http_port, dicom_port = free_port(), free_port()
    root.mkdir(parents=True)
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
        # Orthanc's DICOM layer is DCMTK's: without TCP_NODELAY each C-STORE-RSP waits for a
        # delayed ACK (about 40 ms) and Orthanc receives 20 instances/s.
        proc = subprocess.Popen(
            [exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()
        )
    o = Orthanc(http_port, dicom_port, "ORTHANC", proc, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {log_path.read_text()[-2000:]}")
        try:
            o.rest("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    try:
        wait_until(up, startup_timeout_s, "Orthanc's REST API")
    except BaseException:
        o.stop()
        raise
    return o
