"""`ltdiff-node demo`: the whole path on one machine, with no patient data and no ../shared.

The engine is LTDiff++ when its weights are installed with the package, else the linear filter
(`--engine` chooses). The learned engine runs on CUDA when PyTorch sees a GPU, else on the CPU
(`--device` chooses).

1. writes a synthetic Br40d phantom series (the same generator hospital IT uses);
2. starts an embedded destination archive (a storage SCP writing to a folder) standing in for
   the PACS, and the node itself, on loopback ports chosen by the OS;
3. sends the series to the node with C-STORE, as a PACS auto-route would;
4. waits for the standardized series to arrive in the archive;
5. writes a side-by-side PNG (lung and soft-tissue windows) and prints what happened.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from dicom_node.archive import FolderArchive
from dicom_node.config import (
    AssemblyConfig,
    DestinationConfig,
    EngineConfig,
    ListenerConfig,
    MetricsConfig,
    NodeConfig,
    RouteRule,
)
from dicom_node.export import send_paths
from dicom_node.logs import configure_logging
from dicom_node.phantom import generate_phantom_series
from dicom_node.service import Node
from dicom_node.store import JobState
from engine.interface import EngineError
from engine.pixels import dataset_to_hu
from engine.registry import KNOWN_ENGINE_KINDS, LINEAR_FILTER_KIND, LTDIFF_KIND

WINDOWS = (("lung", -600.0, 1500.0), ("soft tissue", 40.0, 400.0))
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def loopback_config(
    state_dir: Path,
    archive_port: int | None,
    *,
    stable_age_s: float,
    poll_interval_s: float = 0.2,
    max_attempts: int = 3,
    backoff_initial_s: float = 1.0,
    backoff_max_s: float = 900.0,
    device: str = "cpu",
    engine_kind: str = "linear-filter",
    **listener: Any,
) -> NodeConfig:
    """A node on an OS-chosen loopback port that standardizes Br40 CT series with an engine of
    `engine_kind` (its shipped weights) and sends them to one archive on loopback (the demo, the
    tests and the benchmarks). Its metrics endpoint, too, is on a loopback port the OS
    chooses (`node.metrics_server.url`)."""
    dests = (
        (
            DestinationConfig(
                name="archive",
                ae_title="ARCHIVE",
                host="127.0.0.1",
                port=archive_port,
                max_attempts=max_attempts,
                backoff_initial_s=backoff_initial_s,
                backoff_max_s=backoff_max_s,
            ),
        )
        if archive_port
        else ()
    )
    return NodeConfig(
        state_dir=state_dir,
        log_format="console",
        log_level="warning",
        listener=ListenerConfig(
            ae_title="LTDIFF", bind_address="127.0.0.1", port=0, min_free_disk_mb=0, **listener
        ),
        assembly=AssemblyConfig(stable_age_s=stable_age_s, poll_interval_s=poll_interval_s),
        routes=(
            RouteRule(
                name="br40-to-bl64",
                engine="standardize",
                destinations=tuple(d.name for d in dests),
                match=(("Modality", "^CT$"), ("ConvolutionKernel", "^Br40")),
                exclude=(("ImageType", "LOCALIZER"),),
            ),
        ),
        engines=(EngineConfig(name="standardize", kind=engine_kind, device=device),),
        workers=(device,),
        destinations=dests,
        metrics=MetricsConfig(port=0),
    )


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((hu - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)


def side_by_side_png(source: Path, derived: Path, out: Path) -> Path:
    """Rows: lung and soft-tissue windows; columns: Br40 input, standardized output."""
    a = dataset_to_hu(pydicom.dcmread(source))
    b = dataset_to_hu(pydicom.dcmread(derived))
    h, w = a.shape
    label_h = 18
    canvas = Image.new("L", (2 * w, 2 * (h + label_h)), color=0)
    draw = ImageDraw.Draw(canvas)
    for row, (name, c, wd) in enumerate(WINDOWS):
        y = row * (h + label_h)
        for col, (img, title) in enumerate(((a, "input Br40d"), (b, "standardized (Bl64d-like)"))):
            canvas.paste(Image.fromarray(_window(img, c, wd)), (col * w, y + label_h))
            draw.text((col * w + 4, y + 3), f"{title} - {name} window C{c:g}/W{wd:g}", fill=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def demo_engine_kind(choice: str) -> str:
    """The engine kind the demo runs: `choice`, or for "auto" LTDiff++ when its weights are
    installed with the package and the linear filter otherwise."""
    if choice != "auto":
        return choice
    from engine.ltdiff.weights import shipped_weights_path  # noqa: PLC0415 (imports torch)

    try:
        shipped_weights_path()
    except EngineError:
        return LINEAR_FILTER_KIND
    return LTDIFF_KIND


def device_choice(value: str) -> str:
    """argparse type of `--device`: the spelling only (whether the device exists is checked by
    `demo_device`, which needs torch)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not {DEVICE_CHOICES}")
    return value


def demo_device(choice: str, engine_kind: str) -> str:
    """The device of the demo node's engine worker: `choice`, checked to exist, or for "auto"
    CUDA when PyTorch sees a GPU and the engine is a learned one (the linear filter runs on the
    CPU whatever the device), else the CPU. Raises EngineError for a CUDA device that is not
    there, before any server starts."""
    if choice == "cpu" or (choice == "auto" and engine_kind == LINEAR_FILTER_KIND):
        return "cpu"
    import torch  # noqa: PLC0415 (only a learned engine or a CUDA device needs torch)

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise EngineError(f"device {choice!r} asked for, but PyTorch sees no CUDA device")
    index = int(choice.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise EngineError(
            f"device {choice!r} asked for, but PyTorch sees {torch.cuda.device_count()} CUDA "
            "device(s)"
        )
    return choice


def run_demo(
    out_dir: Path,
    n_slices: int,
    stable_age_s: float,
    timeout_s: float,
    engine_kind: str = LINEAR_FILTER_KIND,
    *,
    device: str = "cpu",
) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    input_dir = out_dir / "input-br40d"
    paths = generate_phantom_series(input_dir, n_slices=n_slices, kernel="Br40d", seed=1)
    src = pydicom.dcmread(paths[0], stop_before_pixels=True)
    print(f"1. wrote a {n_slices}-slice synthetic Br40d phantom series to {input_dir}")

    archive = FolderArchive(out_dir / "archive", ae_title="ARCHIVE").start()
    config = loopback_config(
        out_dir / "node-state",
        archive.port,
        stable_age_s=stable_age_s,
        engine_kind=engine_kind,
        device=device,
    )
    node = Node(config)
    node.start()
    print(
        f"2. node LTDIFF listening on 127.0.0.1:{node.port}, engine {engine_kind!r} on "
        f"{device!r}; archive "
        f"ARCHIVE on 127.0.0.1:{archive.port} (folder {archive.root})"
    )
    try:
        t0 = time.monotonic()
        result = send_paths(
            DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port),
            "DEMO_PACS",
            paths,
        )
        send_s = time.monotonic() - t0
        if result.failed:
            print(f"   sending failed for {len(result.failed)} instance(s): {result.failed[0][1]}")
            return 1
        print(
            f"3. sent {len(result.sent)} instances with C-STORE in {send_s:.2f} s "
            f"({len(result.sent) / send_s:.0f} instances/s); the node answered Success to each"
        )
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            report = node.store.status_report(limit=5)
            jobs = report["recent_jobs"]
            job = jobs[0] if jobs else None
            if job and job["state"] in (JobState.DONE.value, JobState.FAILED.value):
                break
            time.sleep(0.2)
        turnaround = time.monotonic() - t0
        if job is None or job["state"] != JobState.DONE.value:
            state = job["state"] if job else "no job created"
            err = job["error"] if job else ""
            print(f"   the series did not come back in {timeout_s:.0f} s: {state} {err}")
            return 1
        derived_uid = job["derived_series_uid"]
        received = archive.series_files(derived_uid)
        print(
            f"4. standardized series {derived_uid} arrived in the archive: {len(received)} "
            f"images, {turnaround:.1f} s after the first C-STORE (stable age {stable_age_s:g} s)"
        )
        ran = node.store.job_outcome(int(job["id"]))["summary"]
        seconds = {k: ran.get(f"{k}_ms", 0.0) / 1000 for k in ("decode", "engine", "encode")}
        print(
            f"   the engine worker on {ran.get('device')!r}: decode {seconds['decode']:.2f} s, "
            f"engine {seconds['engine']:.2f} s, encode {seconds['encode']:.2f} s"
        )
        mid = len(paths) // 2
        src_by_pos = {}
        for p in paths:
            d = pydicom.dcmread(p, stop_before_pixels=True)
            src_by_pos[round(float(d.ImagePositionPatient[2]), 3)] = p
        der = sorted(
            received,
            key=lambda p: float(
                pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]
            ),
        )[mid]
        der_ds = pydicom.dcmread(der, stop_before_pixels=True)
        src_path = src_by_pos[round(float(der_ds.ImagePositionPatient[2]), 3)]
        png = side_by_side_png(src_path, der, out_dir / "demo-side-by-side.png")
        print(f"5. side-by-side picture: {png}")
        print("   derived series headers:")
        print(f"     SeriesDescription     {der_ds.SeriesDescription!s}")
        print(f"     SeriesNumber          {der_ds.SeriesNumber} (source {src.SeriesNumber})")
        image_type = "\\".join(der_ds.ImageType)
        print(f"     ImageType             {image_type}")
        print(f"     DerivationDescription {der_ds.DerivationDescription}")
        print(
            f"     ConvolutionKernel     {der_ds.get('ConvolutionKernel', '')} (unchanged: "
            "the pixels come from a Br40d reconstruction)"
        )
        print(
            f"     same StudyInstanceUID {der_ds.StudyInstanceUID == src.StudyInstanceUID}, "
            f"new SeriesInstanceUID {der_ds.SeriesInstanceUID != src.SeriesInstanceUID}"
        )
        print(f"done in {time.monotonic() - t_start:.1f} s; node state in {config.state_dir}")
        return 0
    finally:
        node.stop()
        archive.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ltdiff-node demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="folder for the phantom, the archive, the node state and the PNG",
    )
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument(
        "--stable-age",
        type=float,
        default=2.0,
        help="seconds without a new instance before a series counts as complete",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--engine",
        choices=("auto", *KNOWN_ENGINE_KINDS),
        default="auto",
        help="engine kind with its shipped weights; auto: ltdiff when its weights are installed, "
        "else linear-filter",
    )
    parser.add_argument(
        "--device",
        type=device_choice,
        default="auto",
        metavar="{auto,cpu,cuda,cuda:N}",
        help="the engine worker's device; auto: cuda when PyTorch sees a GPU and the engine is a "
        "learned one, else cpu",
    )
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    engine_kind = demo_engine_kind(args.engine)
    try:
        device = demo_device(args.device, engine_kind)
    except EngineError as exc:
        print(f"ltdiff-node demo: {exc}", file=sys.stderr)
        return 1
    return run_demo(
        args.out, args.slices, args.stable_age, args.timeout, engine_kind, device=device
    )


if __name__ == "__main__":
    sys.exit(main())
