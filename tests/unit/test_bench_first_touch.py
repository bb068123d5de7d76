"""The first-touch benchmark runs both settings and prints a summary line for each (tiny
volume, few rounds: a smoke test of benchmarks/bench_first_touch.py, not a measurement), and
its summary's percentiles are the sorted values'."""

from __future__ import annotations

import re
from pathlib import Path

from bench_support import load_benchmark, run_benchmark


def test_benchmark_prints_both_settings(tmp_path: Path) -> None:
    out = run_benchmark(
        "bench_first_touch.py", ["--slices", "4", "--size", "64", "--rounds", "3"], tmp_path, 120
    )
    figures = r"min [\d.]+  median [\d.]+  p90 [\d.]+  max [\d.]+"
    assert re.search(rf"^huge pages \(numpy's default\) +{figures}$", out, re.M), out
    assert re.search(rf"^small pages \(NUMPY_MADVISE_HUGEPAGE=0\) +{figures}$", out, re.M), out


def test_summary_reads_the_sorted_values() -> None:
    summary = load_benchmark("bench_first_touch").summary
    values = [0.9, 0.1, 0.5, 0.3, 0.2, 0.4, 0.6, 0.7, 0.8, 1.0, 0.05]
    assert summary(values) == "min 0.050  median 0.500  p90 0.900  max 1.000"
