"""Where the time of `standardize_series` goes outside the engine, on a long 512 x 512 series.

Writes a synthetic series (default 300 slices, Explicit VR Little Endian, 12-bit storage like the
scanners') to a temporary folder, then times each stage alone, per slice: read + decode
(`load_series`), the envelope measurement (`measure_loaded`, the noise level on up to 16
slices), the build of the derived series (`build_derived_series`, no encoding), the encoding
alone (`SeriesEncoder`, in memory, of a freshly built series) and writing the files
(`write_series`: encoding, writing, fsync; not part of `standardize_series`): wall time and this
process's CPU time (on a busy machine the CPU time is the steadier figure; writing also waits
for fsync). `--repeats R` runs each stage R times and prints the minimum and the median. With
`--profile STAGE` it prints the cProfile of that stage instead.

Before / after on one machine: run this script alternately with `PYTHONPATH` set to each
checkout (`git archive COMMIT | tar -x -C DIR`); the script imports `engine` from there.

Run: `.venv/bin/python benchmarks/profile_pipeline.py [--slices 300] [--repeats R]
[--profile build]`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite

from engine.derived import build_derived_series
from engine.envelope_policy import measure_loaded
from engine.interface import EngineIdentity
from engine.part10_writer import SeriesEncoder
from engine.pipeline import write_series
from engine.series_io import load_series
from engine.synthetic import make_ct_series, phantom_slice

IDENTITY = EngineIdentity("profile", "0", "0" * 64, "Br40d", "Bl64d")


def _series(tmp: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = np.stack([phantom_slice(size, size, k / max(n - 1, 1)) for k in range(0, n, 10)])
    volume = np.repeat(base, 10, axis=0)[:n] + rng.normal(0.0, 12.0, (n, size, size))
    paths = []
    datasets = make_ct_series(n, size, size, "Br40d", volume_hu=volume.astype(np.float32))
    for ds in datasets:
        path = tmp / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _timed(
    label: str,
    n: int,
    fn: Callable[[Any], Any],
    profile: bool,
    *,
    repeats: int = 1,
    prepare: Callable[[], Any] = lambda: None,
) -> Any:
    """Run `fn(prepare())` `repeats` times (`prepare` untimed) and print wall and CPU time per
    slice: the one run, or the minimum and median of several. Returns the last result."""
    if profile:
        profiler = cProfile.Profile()
        result = profiler.runcall(fn, prepare())
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return result
    walls, cpus = [], []
    for _ in range(repeats):
        argument = prepare()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn(argument)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    if repeats == 1:
        print(
            f"{label:28} {walls[0]:7.2f} s  {1000.0 * walls[0] / n:7.2f} ms/slice  "
            f"CPU {1000.0 * cpus[0] / n:7.2f} ms/slice"
        )
    else:
        wall_ms = [1000.0 * w / n for w in (min(walls), statistics.median(walls))]
        cpu_ms = [1000.0 * c / n for c in (min(cpus), statistics.median(cpus))]
        print(
            f"{label:28} {wall_ms[0]:7.2f} / {wall_ms[1]:7.2f} ms/slice  "
            f"CPU {cpu_ms[0]:7.2f} / {cpu_ms[1]:7.2f} ms/slice  (min / median of {repeats})"
        )
    return result


def _encode_all(datasets: list[Any]) -> None:
    """What `write_series` does but the files: the encoding, as one encoder per series."""
    encoder = SeriesEncoder()
    for ds in datasets:
        encoder.encode_pieces(ds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", choices=("load", "envelope", "build", "encode", "write"))
    args = parser.parse_args(argv)
    n, repeats = args.slices, max(1, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ltdiff-profile-") as tmp:
        (Path(tmp) / "in").mkdir()
        paths = _series(Path(tmp) / "in", n, args.size)
        print(f"{n} slices of {args.size} x {args.size}")
        loaded = _timed(
            "read + decode",
            n,
            lambda _: load_series(paths),
            args.profile == "load",
            repeats=repeats,
        )
        _timed(
            "envelope measurement",
            n,
            lambda _: measure_loaded(loaded),
            args.profile == "envelope",
            repeats=repeats,
        )
        output = loaded.volume_hu + np.float32(1.0)

        def build() -> Any:
            return build_derived_series(loaded, output, IDENTITY)

        _timed("build", n, lambda _: build(), args.profile == "build", repeats=repeats)
        # Encoding decodes the elements it copies, so each encoding gets a freshly built series.
        _timed(
            "encode only (no files)",
            n,
            lambda fresh: _encode_all(fresh.datasets),
            args.profile == "encode",
            repeats=repeats,
            prepare=build,
        )
        _timed(
            "write (not in the pipeline)",
            n,
            lambda fresh: write_series(fresh.datasets, Path(tmp) / "out"),
            args.profile == "write",
            repeats=repeats,
            prepare=build,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
