"""Export benchmark: the exporter's send path against DCMTK storescu, to real peers, one run.

N synthetic 512 x 512 CT files (dicom_node.phantom, ~526 KB each, Explicit VR Little Endian)
are sent to a peer (one association unless said), R times, interleaved:

- node, direct:     `dicom_node.export.send_files` as the node runs it over plain TCP (the
                    C-STORE requests written to the socket by `dicom_node.store_request`);
- node, direct x2:  the same over two associations at once, every other file on each (what the
                    exporter does with `destinations.associations = 2`, its default);
- node, pynetdicom: the same call with pynetdicom's send path (`DIMSEServiceProvider.send_msg`,
                    one DUL hand-off per PDU), as TLS destinations use;
- storescu:         DCMTK's storescu (TCP_NODELAY=1) with the same files (the floor).

Peers: DCMTK storescp (no fsync: the sender's own cost shows) and Orthanc (Debian's, its
defaults: what a PACS takes). For the node it prints the wall time and the CPU time of this
process (exporter and DUL threads) per instance; for storescu the wall time; for every sender
the CPU time the peer process spent meanwhile (Linux: /proc/PID/stat; what the PACS's own work
costs a machine it shares with the node). Medians over the repeats, with min-max.

Usage: python benchmarks/bench_export.py [--instances 300] [--repeats 3] [--peers storescp,orthanc]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_receive import process_stat
from pydicom import dcmread

from dicom_node import export
from dicom_node.config import DestinationConfig
from dicom_node.phantom import generate_phantom_series
from dicom_node.store import ExportRow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the interop peers
from peer_support import dcmtk_env, orthanc_executable, start_orthanc
from tests_support import free_port, wait_until

SENDERS = ("node, direct", "node, direct x2", "node, pynetdicom", "storescu")


def _rows(files: list[Path]) -> list[ExportRow]:
    rows = []
    for i, path in enumerate(files):
        meta = dcmread(path, stop_before_pixels=True)
        rows.append(
            ExportRow(
                id=i,
                job_id=1,
                destination="peer",
                sop_uid=str(meta.SOPInstanceUID),
                sop_class_uid=str(meta.SOPClassUID),
                path=path,
                attempts=0,
                transfer_syntax=str(meta.file_meta.TransferSyntaxUID),
            )
        )
    return rows


def _send_node(
    dest: DestinationConfig, rows: list[ExportRow], *, direct: bool, associations: int = 1
) -> tuple[float, float]:
    """(wall s, CPU s of this process) to send `rows` with the exporter's send path, over
    `associations` associations at once (every n-th row on each)."""
    plain_socket = export._plain_socket
    if not direct:
        export._plain_socket = lambda _assoc: None  # type: ignore[assignment]
    results: list[export.SendResult] = []

    def send(part: list[ExportRow]) -> None:
        results.append(export.send_files(dest, "LTDIFF", part))

    try:
        cpu, wall = time.process_time(), time.perf_counter()
        lanes = [
            threading.Thread(target=send, args=(rows[k::associations],))
            for k in range(associations)
        ]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        export._plain_socket = plain_socket  # type: ignore[assignment]
    sent = sum(len(r.sent) for r in results)
    if sent != len(rows):
        raise RuntimeError(f"sent {sent} of {len(rows)}: {[r.failed[:2] for r in results]}")
    return wall, cpu


def _send_storescu(port: int, ae_title: str, folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aec", ae_title, "--scan-directories", "127.0.0.1", str(port), str(folder)],
        env=dcmtk_env(),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 once it is gone)."""
    stat = process_stat(pid)
    return 0.0 if stat is None else stat[1]


def _storescp(root: Path) -> tuple[int, int, Callable[[], None]]:
    port = free_port()
    out = root / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        probe = subprocess.run(
            ["echoscu", "127.0.0.1", str(port)],
            env=dcmtk_env(),
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    wait_until(listening, timeout=30)
    return port, proc.pid, proc.kill


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default="storescp,orthanc")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        folder = root / "files"
        files = sorted(generate_phantom_series(folder, n_slices=args.instances, size=512))
        rows = _rows(files)
        for peer in args.peers.split(","):
            if peer == "orthanc":
                exe = orthanc_executable()
                if exe is None:
                    print("orthanc: not installed, left out")
                    continue
                orthanc = start_orthanc(exe, root / "orthanc")
                port, ae_title, stop = orthanc.dicom_port, orthanc.aet, orthanc.stop
                peer_pid = orthanc.process.pid
            elif peer == "storescp":
                port, peer_pid, stop = _storescp(root)
                ae_title = "ANY-SCP"
            else:
                parser.error(f"unknown peer {peer!r}")
            dest = DestinationConfig(
                name="peer",
                ae_title=ae_title,
                host="127.0.0.1",
                port=port,
                dimse_timeout_s=60,
                network_timeout_s=60,
                association_close_delay_s=0,
            )
            wall: dict[str, list[float]] = {s: [] for s in SENDERS}
            cpu: dict[str, list[float]] = {s: [] for s in SENDERS[:3]}
            peer_cpu: dict[str, list[float]] = {s: [] for s in SENDERS}
            try:
                for _ in range(args.repeats):
                    for sender in SENDERS:
                        before = process_cpu_s(peer_pid)
                        if sender == "storescu":
                            wall[sender].append(_send_storescu(port, ae_title, folder))
                        else:
                            w, c = _send_node(
                                dest,
                                rows,
                                direct=sender != "node, pynetdicom",
                                associations=2 if sender == "node, direct x2" else 1,
                            )
                            wall[sender].append(w)
                            cpu[sender].append(c)
                        peer_cpu[sender].append(process_cpu_s(peer_pid) - before)
            finally:
                stop()
            n = args.instances
            print(f"\n{n} instances to {peer}, {args.repeats} repeats:")
            print(
                "| sender | wall s, median (min-max) | instances/s | node CPU ms/instance "
                f"| {peer} CPU ms/instance |"
            )
            print("| --- | --: | --: | --: | --: |")
            for sender in SENDERS:
                per = f"{statistics.median(cpu[sender]) / n * 1000:.2f}" if sender in cpu else "-"
                peer_per = f"{statistics.median(peer_cpu[sender]) / n * 1000:.2f}"
                rate = n / statistics.median(wall[sender])
                print(f"| {sender} | {_median(wall[sender])} | {rate:.0f} | {per} | {peer_per} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
