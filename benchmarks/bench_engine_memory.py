"""Peak resident memory of one engine process while it standardizes a synthetic series.

What `jobs.memory_max_mb` (and the systemd unit's MemoryMax=) must leave room for. Runs the
node's own engine process (dicom_node/engine_host.py) on a synthetic Br40d series and samples
its resident set every 50 ms.

    .venv/bin/python benchmarks/bench_engine_memory.py --slices 100 --size 512
    .venv/bin/python benchmarks/bench_engine_memory.py --engine ltdiff --slices 24
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from pathlib import Path

from pydicom import dcmwrite

from dicom_node.demo import loopback_config
from dicom_node.engine_host import EngineJob, EngineProcess, EngineResult, resident_bytes
from engine.envelope_policy import OutsideEnvelope
from engine.synthetic import make_ct_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="linear-filter", help="engine kind")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for ds in make_ct_series(args.slices, args.size, args.size, "Br40d", uid_seed="mem"):
            path = root / f"{ds.SOPInstanceUID}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            paths.append(str(path))
        config = loopback_config(root / "state", None, stable_age_s=1.0, engine_kind=args.engine)
        config = dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, memory_max_mb=0))
        engine = EngineProcess(config, "cpu", "bench")
        engine.start()
        pid = engine.pid
        idle = resident_bytes(pid or 0) or 0
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, resident_bytes(pid or 0) or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        # The synthetic series may lie outside a learned engine's validated envelope; the
        # figure is for the engine asked for, so it runs anyway (no fallback).
        job = EngineJob(
            1,
            config.routes[0].engine,
            tuple(paths),
            str(root / "out"),
            outside_envelope=OutsideEnvelope.PROCESS,
        )
        outcome = engine.run(job, threading.Event())
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        engine.close()
    if not isinstance(outcome, EngineResult):
        raise SystemExit(f"the job did not succeed: {outcome}")
    ran = outcome.summary.get("engine", "?")
    print(
        f"engine {args.engine}, ran {ran}: {args.slices} slices of {args.size}x{args.size} "
        f"in {seconds:.1f} s; "
        f"engine process resident memory {idle >> 20} MB idle, {peak >> 20} MB peak "
        f"({(peak - idle) / args.slices / 2**20:.2f} MB per slice above idle)"
    )


if __name__ == "__main__":
    main()
