"""The export benchmark runs end to end against real peers (storescp and Orthanc): both of the
exporter's send paths and storescu deliver every file and the table comes out, with the peer's
CPU per instance for every sender (tiny counts: a smoke test of benchmarks/bench_export.py, not
a measurement)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench_support import require_orthanc, run_benchmark
from tests_support import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_benchmark_sends_with_both_paths_and_storescu_to_both_peers(tmp_path: Path) -> None:
    require_tool("storescu")
    require_tool("storescp")
    require_orthanc()
    out = run_benchmark(
        "bench_export.py", ["--instances", "3", "--repeats", "1"], tmp_path, timeout=600
    )
    for peer in ("storescp", "orthanc"):
        assert f"3 instances to {peer}" in out, out
    for sender in ("node, direct", "node, direct x2", "node, pynetdicom"):
        assert len(re.findall(rf"^\| {sender} \| [\d.]+ \(.*\| [\d.]+ \|$", out, re.M)) == 2, out
    assert len(re.findall(r"^\| storescu \| [\d.]+ .*\| - \| [\d.]+ \|$", out, re.M)) == 2, out
    assert "| orthanc CPU ms/instance |" in out, "the peer's CPU column"
    assert list(tmp_path.iterdir()) == [], "work folder left behind"
