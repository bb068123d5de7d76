"""How well does the pixel-only noise level (engine/noise_level.py) track the true noise?

For every subject folder under the given roots that holds a `truth.json` (the simulated kernel
pairs), read the source-kernel series the way the node does (`engine.series_io.load_series`),
measure its noise level with `measure_noise_hu`, and print it beside the noise SD the simulator
measured in the heart blood pool (`truth.json` -> noise_measured). The ratio should be nearly
constant across pixel spacings and doses: the engine is conditioned on this figure and the
validated envelope is stated in it.

    python benchmarks/noise_level_check.py \
        ../shared/data/kernel-pairs/train ../shared/data/kernel-pairs/wide
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread

from engine.noise_level import measure_noise_hu
from engine.series_io import load_series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="folders of subject folders")
    parser.add_argument("--kernel", default="Br40d", help="ConvolutionKernel of the source series")
    parser.add_argument("--truth-key", default="Br40", help="key in truth.json noise_measured")
    args = parser.parse_args(argv)
    print("| subject | pixel (mm) | measured (HU) | heart pool SD (HU) | ratio | ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for root in args.roots:
        for folder in sorted(p for p in root.iterdir() if (p / "truth.json").is_file()):
            paths = [
                p
                for p in folder.glob("*.dcm")
                if str(dcmread(p, stop_before_pixels=True).get("ConvolutionKernel", ""))
                == args.kernel
            ]
            if not paths:
                continue
            loaded = load_series(paths)
            spacing = float(np.mean(loaded.geometry.pixel_spacing_mm))
            started = time.perf_counter()
            measured = measure_noise_hu(loaded.volume_hu, spacing)
            elapsed_ms = (time.perf_counter() - started) * 1000
            truth = json.loads((folder / "truth.json").read_text())
            reference = float(truth["noise_measured"][args.truth_key]["sd_hu"])
            ratio = measured / reference if measured is not None else float("nan")
            ratios.append(ratio)
            shown = f"{measured:.1f}" if measured is not None else "none"
            print(
                f"| {folder.name} | {spacing:.3f} | {shown} | {reference:.1f} | {ratio:.2f} "
                f"| {elapsed_ms:.0f} |"
            )
    if ratios:
        print(
            f"\nratio measured / heart pool: median {statistics.median(ratios):.2f}, "
            f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} series"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
