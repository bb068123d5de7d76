"""Throughput of the linear-filter engine on 512 x 512 slices (slices per second).

Run: `.venv/bin/python benchmarks/bench_linear_engine.py [--slices N] [--repeats R] [--over-input]`.
Uses the shipped Br40d -> Bl64d filter and a noise volume (content does not change FFT time).
Without `--over-input` every repeat allocates a new output volume (and touches its pages for the
first time); with it the output is written over a fresh copy of the input, as the node's pipeline
does (`Engine.standardize(out=)`). Prints the best and the worst repeat.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.interface import SeriesGeometry
from engine.linear_filter import LinearFilterEngine, shipped_weights_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--over-input", action="store_true", help="write the output over the input (out=)"
    )
    args = parser.parse_args(argv)

    engine = LinearFilterEngine.from_file(shipped_weights_path())
    rng = np.random.default_rng(0)
    volume = rng.normal(-300.0, 400.0, (args.slices, args.size, args.size)).astype(np.float32)
    geometry = SeriesGeometry((0.703125, 0.703125), tuple(float(z) for z in range(args.slices)))
    engine.standardize(volume[:2], SeriesGeometry((0.703125, 0.703125), (0.0, 1.0)))  # warm-up

    times = []
    for _ in range(args.repeats):
        source = volume.copy() if args.over_input else volume
        start = time.perf_counter()
        engine.standardize(source, geometry, out=source if args.over_input else None)
        times.append(time.perf_counter() - start)
    best = min(times)
    output = "over the input" if args.over_input else "new output volume"
    print(
        f"linear-filter engine ({output}): {args.slices} slices {args.size}x{args.size} in "
        f"{best:.3f} s (best of {args.repeats}, worst {max(times):.3f} s) = "
        f"{args.slices / best:.1f} slices/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
