"""The reception benchmark runs end to end against real peers: storescu sends to DCMTK's
storescp and to the node, the table and the node's profile come out (tiny counts: a smoke
test of benchmarks/bench_receive.py, not a measurement)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench_support import run_benchmark
from tests_support import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_benchmark_prints_rates_ratio_and_profile_for_storescp_and_the_node(
    tmp_path: Path,
) -> None:
    require_tool("storescu")
    require_tool("storescp")
    profile = tmp_path / "profile"
    out = run_benchmark(
        "bench_receive.py",
        [
            *("--instances", "6", "--repeats", "1", "--associations", "1,2"),
            *("--receivers", "storescp,node", "--profile", str(profile)),
        ],
        tmp_path,
        timeout=600,
    )
    assert re.search(r"^\| DCMTK storescp \(no fsync\) \| \d+ \| \d+ \|$", out, re.M), out
    assert re.search(r"^\| ltdiff-node \| \d+ \| \d+ \|$", out, re.M), out
    assert re.search(r"^\| node / storescp \| [\d.]+x \| [\d.]+x \|$", out, re.M), out
    assert "| record_instance | handler |" in out, out
    assert list(profile.glob("stages-*.json")), "the node wrote no profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile"], "work folder left behind"


def test_benchmark_runs_a_receiver_under_the_engine_load_beside_its_idle_trial(
    tmp_path: Path,
) -> None:
    require_tool("storescu")
    require_tool("storescp")
    out = run_benchmark(
        "bench_receive.py",
        [
            *("--instances", "6", "--repeats", "1", "--associations", "1"),
            *("--receivers", "storescp", "--load", "none,engine"),
        ],
        tmp_path,
        timeout=600,
    )
    assert re.search(
        r"^storescp\+engine 1 assoc run 1: +\d+ instances/s \(the load used", out, re.M
    )
    assert re.search(
        r"^\| DCMTK storescp \(no fsync\), engine load \(nice 10\) \| \d+ \|$", out, re.M
    )
    assert re.search(r"^storescp\+engine / storescp, 1 association: per run [\d.]+;", out, re.M)
    assert not list(tmp_path.iterdir()), "work folder left behind"
