"""A background load like the node's engine process, for measuring what processing costs reception.

`start_engine_load()` starts this script as a child process that does what a node's engine
process does during a linear job's engine stage, in a loop: the shipped Br40d -> Bl64d linear
filter over a fresh copy of a 512x512 volume (`out=` over the copy, as the pipeline does), with
the node's CPU settings for one CPU worker (`share_cpus(1)`: torch's threads over every core)
and the engine processes' priority (`jobs.engine_nice`, 10 shipped, or SCHED_IDLE when asked).
It is the same work whatever the receiver: bench_receive.py `--load engine` runs each receiver
with and without it, so that the node's loss can be read beside Orthanc's on the same machine
in the same run.

Run alone (what the parent runs): python benchmarks/engine_load.py [--slices 64] [--nice 10]
[--sched-idle]; it prints READY once warm, then loops until killed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_receive import process_stat

from dicom_node.config import JobsConfig


@dataclass
class EngineLoad:
    """A running load: its process, and its CPU seconds when it was ready."""

    proc: subprocess.Popen[bytes]
    cpu_at_ready: float

    def cpu_s(self) -> float:
        """CPU seconds used since it was ready (0.0 once it is gone)."""
        stat = process_stat(self.proc.pid)
        return 0.0 if stat is None else stat[1] - self.cpu_at_ready

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_engine_load(
    *, slices: int = 64, nice: int = JobsConfig.engine_nice, sched_idle: bool = False
) -> EngineLoad:
    """Start the load and wait until it runs its loop (the engine loaded, one pass done)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--slices", str(slices)]
    argv += ["--nice", str(nice), *(["--sched-idle"] if sched_idle else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline().decode().strip()
        if line != "READY":
            raise RuntimeError(f"the engine load did not start (exit {proc.poll()}): {line!r}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stat = process_stat(proc.pid)
    return EngineLoad(proc, 0.0 if stat is None else stat[1])


def _run(slices: int, nice: int, sched_idle: bool) -> int:
    import numpy as np  # noqa: PLC0415 - the parent never needs them

    from engine.cpu_threads import share_cpus  # noqa: PLC0415
    from engine.interface import SeriesGeometry  # noqa: PLC0415
    from engine.linear_filter import LinearFilterEngine, shipped_weights_path  # noqa: PLC0415

    if sched_idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif nice:
        os.nice(nice)
    engine = LinearFilterEngine.from_file(shipped_weights_path())
    share_cpus(1)
    volume = np.random.default_rng(0).normal(-300.0, 400.0, (slices, 512, 512)).astype(np.float32)
    geometry = SeriesGeometry((0.703125, 0.703125), tuple(float(z) for z in range(slices)))
    work = volume.copy()
    engine.standardize(work, geometry, out=work)
    print("READY", flush=True)
    while True:
        np.copyto(work, volume)
        engine.standardize(work, geometry, out=work)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--nice", type=int, default=JobsConfig.engine_nice)
    parser.add_argument("--sched-idle", action="store_true", help="SCHED_IDLE instead of nice")
    args = parser.parse_args(argv)
    return _run(args.slices, args.nice, args.sched_idle)


if __name__ == "__main__":
    raise SystemExit(main())
