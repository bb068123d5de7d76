"""How many disk flushes each receiver makes per instance: the cost a slow disk multiplies.

The receive rates of `bench_receive.py` move with this machine's disk (docs/PERFORMANCE.md);
what they move by is the number of flushes (fsync, fdatasync, sync_file_range, syncfs) a
receiver waits for before it answers Success, each one a journal commit and a disk cache
flush. This script sends N synthetic CT instances (dicom_node.phantom) with DCMTK's storescu
over one association to each receiver in turn (the same starters as bench_receive.py) while
`strace -f -c` counts the receiver's system calls, and prints them per instance.

strace slows the receivers down, so no rate is printed: the counts are the result. Needs
strace (`apt-get install strace`) and the right to trace the receivers (root, or
kernel.yama.ptrace_scope = 0).

Usage: python benchmarks/count_syncs.py [--instances 40] [--receivers orthanc,node]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench_receive import STARTERS, PeerMissingError, send

from dicom_node.phantom import generate_phantom_series

#: The system calls that wait for the disk: a flush each.
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs")
#: What else a receiver does per instance on the way to the disk.
OTHER_CALLS = (
    "openat",
    "write",
    "writev",
    "pwrite64",
    "link",
    "linkat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
)
TRACED = ",".join(SYNC_CALLS + OTHER_CALLS)
ATTACH_WAIT_S = 2.0


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls per system call from the table `strace -c` writes (the 'calls' column)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"; the total row says "total".
        if len(fields) < 5 or not fields[0].replace(".", "", 1).isdigit():
            continue
        name = fields[-1]
        if name == "total":
            continue
        counts[name] = int(fields[3])
    return counts


def listening_pids(port: int) -> list[int]:
    """The processes that hold a listening TCP socket on `port` (ss -ltnp)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    pids: set[int] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[3].endswith(f":{port}"):
            continue
        for part in line.split("pid=")[1:]:
            pids.add(int(part.split(",")[0]))
    return sorted(pids)


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` and every process below them (/proc/PID/task/TID/children)."""
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
    return sorted(found)


def count(name: str, storescu: str, files: Sequence[Path], work: Path) -> dict[str, int]:
    """System calls of receiver `name` while it stores `files` (one association)."""
    work.mkdir(parents=True)
    running = STARTERS[name](work, None, False)
    try:
        pids = with_descendants(listening_pids(running.port))
        if not pids:
            raise RuntimeError(f"{name}: no process listens on port {running.port}")
        summary = work / f"strace-{name}.txt"
        argv = ["strace", "-f", "-c", "-e", f"trace={TRACED}", "-o", str(summary)]
        for pid in pids:
            argv += ["-p", str(pid)]
        tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            time.sleep(ATTACH_WAIT_S)  # strace attaches to every thread before the first call
            send(storescu, running, files, 1)
            stored = running.count()
        finally:
            tracer.terminate()
            tracer.wait(timeout=30)
        if stored != len(files):
            raise RuntimeError(f"{name}: stored {stored} of {len(files)} instances")
        return parse_strace_summary(summary.read_text())
    finally:
        running.stop()


def format_counts(results: dict[str, dict[str, int]], instances: int) -> str:
    """A table: system calls per instance, receivers as columns, flushes first and summed."""
    names = list(results)
    rows = [("**flushes** (" + " + ".join(SYNC_CALLS) + ")", None)]
    rows += [(call, call) for call in SYNC_CALLS + OTHER_CALLS]
    lines = [
        "| per instance | " + " | ".join(names) + " |",
        "| --- |" + " --: |" * len(names),
    ]
    for label, call in rows:
        cells = []
        for name in names:
            calls = results[name]
            total = sum(calls.get(c, 0) for c in SYNC_CALLS) if call is None else calls.get(call, 0)
            cells.append(f"{total / instances:.2f}")
        if call is None or any(results[n].get(call, 0) for n in names):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--receivers", default="orthanc,node")
    args = parser.parse_args(argv)
    receivers = [r for r in args.receivers.split(",") if r]
    unknown = [r for r in receivers if r not in STARTERS]
    if unknown:
        parser.error(f"unknown receiver(s) {unknown}; choose from {sorted(STARTERS)}")
    missing = [tool for tool in ("strace", "storescu", "ss") if shutil.which(tool) is None]
    if missing:
        print(
            f"needs {', '.join(missing)} (apt-get install strace dcmtk iproute2)", file=sys.stderr
        )
        return 2
    storescu = shutil.which("storescu")
    assert storescu is not None
    work = Path(tempfile.mkdtemp(prefix="ltdiff-count-syncs-"))
    try:
        files = generate_phantom_series(work / "input", n_slices=args.instances, seed=7)
        results: dict[str, dict[str, int]] = {}
        for name in receivers:
            try:
                results[name] = count(name, storescu, files, work / name)
            except PeerMissingError as exc:
                print(f"{name}: skipped, {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results:
        return 1
    print(f"{args.instances} instances over one association (storescu), strace -f -c:\n")
    print(format_counts(results, args.instances))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
