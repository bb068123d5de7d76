"""What a disk costs the node per received instance: the spool's durable write, step by step.

Reception's speed with one association is bound by the latency of each instance (the sender
waits for every response), and most of that latency is the durable write before Success
(dicom_node/spool.py, engine/durable.py): a new temporary file written with one writev, fsynced,
linked to its final name, the temporary name removed, the directory fsynced, then the SQLite
transaction committed (WAL, synchronous=FULL, as dicom_node/store.py). This script repeats that
sequence N times in DIR (default: a new folder in the system's temporary folder; point it at the
spool's filesystem, `listener.spool_dir`) with random data of the size of a 512 x 512 CT
instance, and prints the median and 90th percentile of each step in ms, per round, so that the
variation between rounds shows too. It uses the system calls the node uses, not the node itself,
so each step is timed alone.

On the 2-core development VM these figures changed several-fold between hours of one day
(docs/PERFORMANCE.md, "Reception performance"); such swings move the node's 1-association receive
rate, and Orthanc's, by tens of percent between runs of bench_receive.py, so run this beside it.

Usage: python benchmarks/bench_disk.py [--dir DIR] [--instances 300] [--rounds 3] [--kb 526]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

STEPS = ("open", "writev", "fsync", "link+unlink", "dir fsync", "commit")


def _one_round(folder: Path, count: int, payload: bytes) -> dict[str, list[float]]:
    header = os.urandom(332)  # a Part 10 preamble, prefix and file meta: written by the same call
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    database = sqlite3.connect(folder / "index.sqlite", isolation_level=None)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=FULL")
    database.execute("CREATE TABLE instances (sop TEXT PRIMARY KEY, path TEXT)")
    try:
        for index in range(count):
            temporary, final = folder / f".{index}.tmp", folder / f"{index}.dcm"
            t0 = time.perf_counter()
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            t1 = time.perf_counter()
            try:
                os.writev(fd, [header, payload])
                t2 = time.perf_counter()
                os.fsync(fd)
                t3 = time.perf_counter()
            finally:
                os.close(fd)
            os.link(temporary, final)
            temporary.unlink()
            t4 = time.perf_counter()
            directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            t5 = time.perf_counter()
            database.execute("BEGIN IMMEDIATE")
            database.execute("INSERT INTO instances VALUES (?, ?)", (str(index), str(final)))
            database.execute("COMMIT")
            t6 = time.perf_counter()
            for step, seconds in zip(
                STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True
            ):
                times[step].append(seconds * 1000.0)
    finally:
        database.close()
    return times


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kb", type=int, default=526, help="size of one instance in KB")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.rounds < 1 or args.kb < 1:
        parser.error("--instances, --rounds and --kb must be at least 1")
    payload = os.urandom(args.kb * 1024)
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    print(f"{args.instances} instances of {args.kb} KB per round, in {base}")
    print("round | " + " | ".join(f"{step} median / p90 ms" for step in STEPS) + " | total median")
    for round_number in range(1, args.rounds + 1):
        folder = Path(tempfile.mkdtemp(prefix="ltdiff-bench-disk-", dir=base))
        try:
            times = _one_round(folder, args.instances, payload)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        totals = [sum(step_times) for step_times in zip(*times.values(), strict=True)]
        cells = " | ".join(
            f"{statistics.median(times[step]):.2f} / {_p90(times[step]):.2f}" for step in STEPS
        )
        print(f"{round_number} | {cells} | {statistics.median(totals):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
