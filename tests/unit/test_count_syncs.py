"""benchmarks/count_syncs.py's pure parts: reading `strace -c`'s table, the process tree of a
receiver, and the per-instance table. No strace, no peers."""

from __future__ import annotations

import os
import subprocess
import sys

from bench_support import load_benchmark as _load

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 29.87    0.002096          52        40           writev
 23.50    0.001649          20        81           fsync
 15.10    0.001060          25        41           fdatasync
  8.41    0.000590           6        85         3 openat
  3.98    0.000279           6        40           link
------ ----------- ----------- --------- --------- ----------------
100.00    0.007018          10       287         3 total
"""


def test_the_strace_summary_gives_calls_per_system_call():
    counts = _load("count_syncs").parse_strace_summary(STRACE_SUMMARY)
    assert counts == {"writev": 40, "fsync": 81, "fdatasync": 41, "openat": 85, "link": 40}


def test_the_table_sums_the_flushes_per_instance_and_leaves_out_calls_nobody_made():
    count_syncs = _load("count_syncs")
    table = count_syncs.format_counts(
        {"orthanc": {"fdatasync": 40, "write": 80}, "node": {"fsync": 80, "fdatasync": 40}}, 40
    )
    lines = table.splitlines()
    assert lines[0] == "| per instance | orthanc | node |"
    assert lines[2].startswith("| **flushes**") and lines[2].endswith("| 1.00 | 3.00 |")
    assert "| fsync | 0.00 | 2.00 |" in lines
    assert "| write | 2.00 | 0.00 |" in lines
    assert not any(line.startswith("| rename ") for line in lines)


def test_a_receivers_process_tree_includes_its_children():
    count_syncs = _load("count_syncs")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert {os.getpid(), child.pid} <= set(count_syncs.with_descendants([os.getpid()]))
    finally:
        child.communicate(b"")
