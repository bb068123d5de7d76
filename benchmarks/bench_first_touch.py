"""First touch of a series-sized numpy volume, with and without transparent huge pages.

numpy asks the kernel for transparent huge pages for its large arrays (madvise) unless the
environment says NUMPY_MADVISE_HUGEPAGE=0. The engine process allocates one float32 volume per
job (315 MB for 300 slices of 512 x 512) and writes every page of it while decoding, so what the
first write to fresh memory costs is part of every job's read + decode stage.

Two child processes, one per setting, each allocate the volume, write all of it and free it, R
times, with the churn a job leaves between volumes (300 freed 526 KB buffers, the source pixel
data); they take turns in blocks so that drift on the machine hits both. Prints seconds per
first touch: min, median, 90th percentile and max, per setting.

Usage: python benchmarks/bench_first_touch.py [--slices 300] [--size 512] [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

SETTINGS = {"huge pages (numpy's default)": "1", "small pages (NUMPY_MADVISE_HUGEPAGE=0)": "0"}
BLOCK = 5


def touch(slices: int, size: int, rounds: int) -> list[float]:
    """Seconds for each of `rounds` first touches of a fresh (slices, size, size) float32 volume."""
    import time  # noqa: PLC0415 - the child's own imports, after its environment is set

    import numpy as np  # noqa: PLC0415

    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        volume = np.empty((slices, size, size), dtype=np.float32)
        volume[...] = 1.0
        seconds.append(time.perf_counter() - start)
        del volume
        churn = [bytes(2 * size * size) for _ in range(slices)]
        del churn
    return seconds


def _child(setting: str, slices: int, size: int, rounds: int) -> list[float]:
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE=setting)
    argv = [sys.executable, __file__, "--child", str(slices), str(size), str(rounds)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=600)
    return [float(v) for v in out.stdout.split()]


def summary(seconds: Sequence[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"min {ordered[0]:.3f}  median {statistics.median(ordered):.3f}  "
        f"p90 {p90:.3f}  max {ordered[-1]:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        slices, size, rounds = (int(v) for v in args[1:4])
        print(" ".join(f"{s:.6f}" for s in touch(slices, size, rounds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=40)
    parsed = parser.parse_args(args)
    results: dict[str, list[float]] = {label: [] for label in SETTINGS}
    done = 0
    while done < parsed.rounds:
        block = min(BLOCK, parsed.rounds - done)
        for label, setting in SETTINGS.items():
            results[label] += _child(setting, parsed.slices, parsed.size, block)
        done += block
    mb = parsed.slices * parsed.size * parsed.size * 4 / 1e6
    print(f"first touch of a {mb:.0f} MB float32 volume, {parsed.rounds} rounds per setting, s:")
    for label, seconds in results.items():
        print(f"{label:42} {summary(seconds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
