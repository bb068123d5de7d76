"""The disk benchmark runs: one row per round with a median and p90 for every step of the
spool's durable write, and nothing left in its folder (tiny counts: a smoke test of
benchmarks/bench_disk.py, not a measurement)."""

from __future__ import annotations

import re
from pathlib import Path

from bench_support import run_benchmark


def test_benchmark_times_every_step_per_round_and_cleans_up(tmp_path: Path) -> None:
    out = run_benchmark(
        "bench_disk.py",
        ["--dir", str(tmp_path), "--instances", "3", "--rounds", "2", "--kb", "4"],
        tmp_path,
        timeout=120,
    )
    cells = r" \| ".join([r"[\d.]+ / [\d.]+"] * 6)
    rows = re.findall(rf"^(\d) \| {cells} \| [\d.]+$", out, re.M)
    assert rows == ["1", "2"], out
    assert list(tmp_path.iterdir()) == [], "work folder left behind"
