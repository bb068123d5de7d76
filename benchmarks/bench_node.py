"""Node benchmark: receive rate and series turnaround with the linear engine.

A synthetic 512x512 Br40d phantom series (default 300 slices) is sent to a node by DCMTK's
storescu (TCP_NODELAY=1, as a modality would), the node standardizes it with the configured
engine and sends it to an embedded archive on loopback. Prints:

- receive rate: instances/s over the storescu run (each instance fsynced to the spool and
  recorded in SQLite before Success);
- turnaround: last instance received -> derived series fully delivered, split into the stable-age
  wait (configurable, not work), decode, engine, encode and export.

Usage: python benchmarks/bench_node.py [--slices 300] [--stable-age 2] [--device cpu]
       [--engine linear-filter|ltdiff] [--engine-nice N] [--during-processing N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dicom_node.archive import FolderArchive
from dicom_node.demo import loopback_config
from dicom_node.logs import configure_logging
from dicom_node.phantom import generate_phantom_series
from dicom_node.service import Node


def send(storescu: str, port: int, paths: list[Path]) -> None:
    subprocess.run(
        [storescu, "-aet", "BENCH", "-aec", "LTDIFF", "127.0.0.1", str(port), *map(str, paths)],
        env={**os.environ, "TCP_NODELAY": "1"},  # Debian's DCMTK leaves Nagle on otherwise
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--stable-age", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--engine",
        default="linear-filter",
        choices=["linear-filter", "ltdiff"],
        help="engine kind with its shipped weights",
    )
    parser.add_argument(
        "--engine-nice",
        type=int,
        help="jobs.engine_nice (default: the config's, 10): the engine's CPU priority below "
        "reception's",
    )
    parser.add_argument(
        "--receiver-processes",
        help='listener.receiver_processes (default: the config\'s, "auto"; 0: in the node process)',
    )
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    parser.add_argument(
        "--during-processing",
        type=int,
        default=100,
        metavar="N",
        help="also send an N-slice series while the engine works on the first (0: skip)",
    )
    args = parser.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        print("storescu (DCMTK) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    configure_logging("console", "warning")
    work = args.keep or Path(tempfile.mkdtemp(prefix="ltdiff-bench-"))
    t0 = time.monotonic()
    paths = generate_phantom_series(work / "input", n_slices=args.slices, size=args.size, seed=7)
    print(f"phantom: {len(paths)} slices {args.size}x{args.size} in {time.monotonic() - t0:.1f} s")

    second = (
        generate_phantom_series(
            work / "input2", n_slices=args.during_processing, size=args.size, seed=8
        )
        if args.during_processing
        else []
    )
    archive = FolderArchive(work / "archive").start()
    config = loopback_config(
        work / "state",
        archive.port,
        stable_age_s=args.stable_age,
        poll_interval_s=0.1,
        device=args.device,
        engine_kind=args.engine,
    )
    if args.engine_nice is not None:
        config = dataclasses.replace(
            config, jobs=dataclasses.replace(config.jobs, engine_nice=args.engine_nice)
        )
    if args.receiver_processes is not None:
        value = args.receiver_processes
        config = dataclasses.replace(
            config,
            listener=dataclasses.replace(
                config.listener, receiver_processes=value if value == "auto" else int(value)
            ),
        )
    print(
        f"engine {args.engine} on {args.device}, jobs.engine_nice = {config.jobs.engine_nice}, "
        f"listener.receiver_processes = {config.listener.receiver_processes!r}"
    )
    node = Node(config)
    node.start()
    try:
        t_send = time.monotonic()
        send(storescu, node.port, paths)
        t_received = time.monotonic()
        receive_s = t_received - t_send
        busy_rate = None
        if second:
            while not node.store.status_report(limit=1)["jobs"].get("processing"):
                time.sleep(0.01)
            t2 = time.monotonic()
            send(storescu, node.port, second)
            busy_rate = len(second) / (time.monotonic() - t2)
        while True:
            first_job = node.store.job(1)
            if first_job is not None and first_job.state.value in ("done", "failed"):
                break
            time.sleep(0.05)
        t_done = time.monotonic()
        (job,) = [j for j in node.store.status_report(limit=50)["recent_jobs"] if j["id"] == 1]
        outcome = node.store.job_outcome(job["id"])
        summary = outcome["summary"]
        delivered = len(archive.series_files(job["derived_series_uid"] or ""))
    finally:
        node.stop()
        archive.stop()
    mb = sum(p.stat().st_size for p in paths) / 1e6
    turnaround = t_done - t_received
    processing = summary.get("processing_ms", 0) / 1000
    print(
        f"receive: {len(paths)} instances ({mb:.0f} MB) in {receive_s:.2f} s = "
        f"{len(paths) / receive_s:.0f} instances/s, {mb / receive_s:.0f} MB/s (storescu, fsync "
        "per instance)"
    )
    if busy_rate is not None:
        print(
            f"receive while the engine processes the first series: {len(second)} instances "
            f"at {busy_rate:.0f} instances/s"
        )
    print(f"job: {job['state']}, {delivered} derived instances delivered")
    print(f"turnaround (last instance received -> series delivered): {turnaround:.1f} s")
    print(f"  stable-age wait   {args.stable_age:.1f} s (configured idle time, not work)")
    print(f"  decode            {summary.get('decode_ms', 0) / 1000:.2f} s")
    print(
        f"  engine            {summary.get('engine_ms', 0) / 1000:.2f} s "
        f"({len(paths) / max(summary.get('engine_ms', 1) / 1000, 1e-9):.0f} slices/s, "
        f"{args.device})"
    )
    print(f"  build + encode    {summary.get('encode_ms', 0) / 1000:.2f} s")
    print(
        f"  write + export    {turnaround - args.stable_age - processing:.2f} s "
        "(outbox fsync, C-STORE to the archive, settle)"
    )
    print(f"turnaround without the stable-age wait: {turnaround - args.stable_age:.1f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if job["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
