"""The export benchmark runs end to end against real peers (storescp and Orthanc): both of the
exporter's send paths and storescu deliver every file and the table comes out (tiny counts: a
smoke test of benchmarks/bench_export.py, not a measurement)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peer_support import orthanc_executable
from tests_support import REQUIRE_PEERS, require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_export.py"


def test_benchmark_sends_with_both_paths_and_storescu_to_both_peers(tmp_path: Path) -> None:
    require_tool("storescu")
    require_tool("storescp")
    if orthanc_executable() is None:
        if REQUIRE_PEERS:
            pytest.fail("Orthanc is not installed")
        pytest.skip("Orthanc is not installed")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--instances", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its work folder, removed at the end
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-3000:]}"
    for peer in ("storescp", "orthanc"):
        assert f"3 instances to {peer}" in out, out
    for sender in ("node, direct", "node, direct x2", "node, pynetdicom"):
        assert len(re.findall(rf"^\| {sender} \| [\d.]+ \(.*\| [\d.]+ \|$", out, re.M)) == 2, out
    assert len(re.findall(r"^\| storescu \| [\d.]+ ", out, re.M)) == 2, out
    assert list(tmp_path.iterdir()) == [], "work folder left behind"
