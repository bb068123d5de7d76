"""The turnaround benchmark runs end to end against real peers: storescu sends a series to the
node, the node standardizes it and exports it to Orthanc, the stage table, storescu's floor and
the reception-while-processing ratio come out (tiny counts: a smoke test of
benchmarks/bench_turnaround.py, not a measurement)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench_support import require_orthanc, run_benchmark
from tests_support import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_benchmark_prints_the_stages_the_floor_and_reception_while_processing(
    tmp_path: Path,
) -> None:
    require_tool("storescu")
    require_orthanc()
    out = run_benchmark(
        "bench_turnaround.py",
        ["--slices", "4", "--repeats", "1", "--engine-nice", "0"],
        tmp_path,
    )
    for stage in ("series closed", "engine process: engine", "export: exporter starts"):
        assert re.search(rf"^\| {re.escape(stage)}.* \| -?[\d.]+ \(", out, re.M), out
    assert re.search(r"^\| \*\*turnaround, stable age excluded\*\* \| [\d.]+ ", out, re.M), out
    assert re.search(r"^\| node export / storescu \| [\d.]+ ", out, re.M), out
    assert re.search(r"busy / idle [\d.]+ ", out), out
    for role in ("node process", "receiver processes", "engine processes", "Orthanc"):
        assert re.search(rf"CPU s during the second send: .*{role} [\d.]+ ", out), out
    assert re.search(r"the first job took [\d.]+ .* paused for reception [\d.]+ ", out), out
    assert list(tmp_path.iterdir()) == [], "work folder left behind"


def test_benchmark_measures_a_warm_nodes_second_series(tmp_path: Path) -> None:
    """--warm: a first series goes through the node and into Orthanc before the measured one;
    the table is this series' (its stages, its derived files for storescu's floor)."""
    require_tool("storescu")
    require_orthanc()
    out = run_benchmark(
        "bench_turnaround.py",
        [
            *("--slices", "4", "--repeats", "1", "--engine-nice", "0"),
            *("--no-during-processing", "--warm"),
        ],
        tmp_path,
    )
    assert "a warm node (its second series)" in out, out
    assert re.search(r"^\| \*\*turnaround, stable age excluded\*\* \| [\d.]+ ", out, re.M), out
    assert re.search(r"^\| node export / storescu \| [\d.]+ ", out, re.M), out
