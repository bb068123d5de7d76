"""Reception benchmark: durable C-STORE receive rate of ltdiff-node beside real peers, one run.

N synthetic 512x512 CT instances (dicom_node.phantom, ~526 KB each) are sent by DCMTK's storescu
(TCP_NODELAY=1, as a modality would) over 1 association and over k concurrent associations (k
storescu processes, each a contiguous k-th of the files), R times, to each receiver:

- storescp:   DCMTK storescp --fork (a process per association), files to a folder, no fsync;
- orthanc:    Orthanc (Debian's /usr/sbin/Orthanc) on loopback, its defaults: an fsync per file,
              SQLite index;
- pynetdicom: a minimal pynetdicom C-STORE handler in its own process that writes and fsyncs
              each file (a reference for what pynetdicom itself costs);
- node:       ltdiff-node in its own process (dicom_node.demo.loopback_config, no destination):
              every instance fsynced to the spool, the spool directory fsynced and the database
              committed before Success. Processing never starts during a trial: the stable age is
              one hour and the node is stopped after each trial.

Every trial gets a fresh receiver (a resend of the same SOP Instance UIDs to a warm node would
be answered as duplicates without a write) and checks afterwards that it stored all N. The rate
is N / (first storescu started -> last storescu exited). Prints the median instances/s per
receiver and association count, the ratios node/Orthanc and node/storescp of those medians, and
the same ratios within each repeat (the two trials ran back to back, so drift between repeats
cancels out) with their median and range. A missing peer is reported and left out of the table.

`--load none,engine` runs every trial under each load, back to back: `engine` is a background
process doing what the node's engine process does during a job (benchmarks/engine_load.py: the
linear filter in a loop, at the engine's nice 10), `engine-idle` the same under SCHED_IDLE. Each
receiver's rate under a load is printed beside its idle rate (busy / idle within each run), so
what processing costs the node's reception can be read against what the same load costs
Orthanc and storescp on the same machine.

`--profile DIR` instruments the node process in its 1-association trials
(benchmarks/receive_profile.py): wall time per stage of the receive path per instance, written
under DIR and printed; `--cprofile` adds a cProfile per thread there (slows the node).

Usage: python benchmarks/bench_receive.py [--instances 300] [--repeats 3] [--associations 1,4]
       [--receivers storescp,orthanc,pynetdicom,node] [--load none,engine,engine-idle]
       [--profile DIR [--cprofile]]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast

import receive_profile
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.demo import loopback_config
from dicom_node.logs import configure_logging
from dicom_node.phantom import generate_phantom_series
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES, set_tcp_nodelay
from dicom_node.service import Node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the interop peers
from peer_support import dcmtk_env, orthanc_executable, start_orthanc
from tests_support import free_port

RECEIVERS = ("storescp", "orthanc", "pynetdicom", "node", "node-inprocess")
#: What a run measures unless --receivers says otherwise.
DEFAULT_RECEIVERS = RECEIVERS[:4]
LABELS = {
    "storescp": "DCMTK storescp (no fsync)",
    "orthanc": "Orthanc (fsync per file)",
    "pynetdicom": "pynetdicom handler + fsync",
    "node": "ltdiff-node",
    "node-inprocess": "ltdiff-node, receiver_processes = 0",
}
#: Ratios printed under the table: (numerator, denominator), for each load.
RATIOS = (("node", "orthanc"), ("node", "storescp"), ("node-inprocess", "orthanc"))
#: Background loads (--load): none, or the engine's work at its nice or under SCHED_IDLE.
LOADS = ("none", "engine", "engine-idle")
LOAD_LABELS = {"engine": "engine load (nice 10)", "engine-idle": "engine load (SCHED_IDLE)"}
STARTUP_TIMEOUT_S = 120


class PeerMissingError(RuntimeError):
    """A receiver's program is not installed: the receiver is left out of the table."""


class TrialError(RuntimeError):
    """A trial did not store every instance (or a sender failed): its rate is not counted."""


# ---- pure parts --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=_positive, default=300)
    parser.add_argument("--repeats", type=_positive, default=3)
    parser.add_argument(
        "--receivers",
        type=_receivers,
        default=DEFAULT_RECEIVERS,
        help=f"comma-separated subset of {','.join(RECEIVERS)} (default: "
        f"{','.join(DEFAULT_RECEIVERS)}; node-inprocess: the node with its associations in the "
        "node process, listener.receiver_processes = 0)",
    )
    parser.add_argument(
        "--associations",
        type=_associations,
        default=(1, 4),
        help="comma-separated counts of concurrent associations (default: 1,4)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile the node process, write under DIR (its 1-association trials run with "
        "receiver_processes = 0: the profile instruments the node process)",
    )
    parser.add_argument(
        "--load",
        type=_loads,
        default=("none",),
        help="comma-separated background loads, each trial run under each (default: none; "
        "engine: the engine's work at nice 10, engine-idle: the same under SCHED_IDLE)",
    )
    parser.add_argument("--cprofile", action="store_true", help="with --profile: cProfile too")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it")
    # Internal: the pynetdicom and node receivers run this script in a child process.
    parser.add_argument(
        "--serve", choices=("pynetdicom", "node", "node-inprocess"), help=argparse.SUPPRESS
    )
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is None and any(a > args.instances for a in args.associations):
        parser.error("--associations: more associations than instances")
    if args.cprofile and args.profile is None:
        parser.error("--cprofile needs --profile DIR")
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _choices(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Comma-separated names out of `known`, in `known`'s order (the table's), no repeats."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}(s) {','.join(unknown) or '(none)'}; choose from {','.join(known)}"
        )
    return tuple(n for n in known if n in names)


def _receivers(text: str) -> tuple[str, ...]:
    return _choices(text, RECEIVERS, "receiver")


def _loads(text: str) -> tuple[str, ...]:
    return _choices(text, LOADS, "load")


def trial_name(receiver: str, load: str) -> str:
    """The name a (receiver, load) pair's rates are kept under: the receiver's own without a
    load, `receiver+load` under one."""
    return receiver if load == "none" else f"{receiver}+{load}"


def label(name: str) -> str:
    receiver, _, load = name.partition("+")
    return LABELS[receiver] + (f", {LOAD_LABELS[load]}" if load else "")


def _associations(text: str) -> tuple[int, ...]:
    try:
        counts = sorted({_positive(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from exc
    if not counts:
        raise argparse.ArgumentTypeError("at least one association count")
    return tuple(counts)


def split_files(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """Contiguous, near-equal parts (the first ones one longer), none empty."""
    size, extra = divmod(len(files), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(files[start:end]))
        start = end
    return [p for p in out if p]


Key = tuple[str, int]  # (receiver, associations)


def medians(rates: dict[Key, list[float]]) -> dict[Key, float]:
    """Median rate per (receiver, associations) that has at least one successful trial."""
    return {key: statistics.median(values) for key, values in rates.items() if values}


def format_table(
    med: dict[Key, float],
    receivers: Sequence[str],
    associations: Sequence[int],
    *,
    skipped: dict[str, str] | None = None,
    loads: Sequence[str] = ("none",),
) -> str:
    """A Markdown table of median instances/s per receiver and load, then the ratios of RATIOS
    under each load and each receiver's busy / idle, where both exist."""
    heads = [f"{a} association{'s' if a > 1 else ''}" for a in associations]
    lines = [
        "| receiver | " + " | ".join(heads) + " |",
        "| --- | " + " | ".join("--:" for _ in heads) + " |",
    ]
    skipped = skipped or {}
    present = [name for name in receivers if name not in skipped]
    for name in present:
        for load in loads:
            row = trial_name(name, load)
            cells = [_rate(med.get((row, a))) for a in associations]
            lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    for num, den in _ratio_pairs(present, loads):
        cells = [_ratio(med.get((num, a)), med.get((den, a))) for a in associations]
        lines.append(f"| {num} / {den} | " + " | ".join(cells) + " |")
    lines.extend(f"skipped {name}: {why}" for name, why in skipped.items())
    return "\n".join(lines)


def _ratio_pairs(receivers: Sequence[str], loads: Sequence[str]) -> list[tuple[str, str]]:
    """RATIOS under each load, then each receiver under each load against itself without."""
    pairs = [
        (trial_name(num, load), trial_name(den, load))
        for load in loads
        for num, den in RATIOS
        if num in receivers and den in receivers
    ]
    if "none" in loads:
        pairs += [(trial_name(r, load), r) for r in receivers for load in loads if load != "none"]
    return pairs


RunKey = tuple[str, int, int]  # (receiver, associations, repeat)


def paired_ratios(runs: dict[RunKey, float], num: str, den: str, associations: int) -> list[float]:
    """num / den of each repeat in which both succeeded: the two trials ran back to back, so
    the machine's drift between repeats cancels out of each ratio."""
    return [
        rate / runs[(den, associations, repeat)]
        for (name, assoc, repeat), rate in sorted(runs.items(), key=lambda kv: kv[0][2])
        if name == num and assoc == associations and runs.get((den, associations, repeat))
    ]


def format_paired(
    runs: dict[RunKey, float],
    receivers: Sequence[str],
    associations: Sequence[int],
    loads: Sequence[str] = ("none",),
) -> str:
    """One line per ratio (`_ratio_pairs`) and association count: each repeat's ratio, and
    their median and range."""
    lines = []
    for num, den in _ratio_pairs(receivers, loads):
        for a in associations:
            ratios = paired_ratios(runs, num, den, a)
            if not ratios:
                continue
            each = " ".join(f"{r:.2f}" for r in ratios)
            lines.append(
                f"{num} / {den}, {a} association{'s' if a > 1 else ''}: per run {each}; "
                f"median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            )
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "failed" if value is None else f"{value:.0f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or not den else f"{num / den:.2f}x"


# ---- receivers ---------------------------------------------------------------------------------


@dataclass
class Running:
    """A started receiver: where to send, how many instances it holds, how to stop it."""

    port: int
    aet: str
    count: Callable[[], int]
    stop: Callable[[], None]
    pid: int | None = None  # the receiver's process, where known (its CPU: bench_turnaround)


def process_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds so far) of a process, from /proc/PID/stat
    (Linux); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _files_in(folder: Path, pattern: str) -> Callable[[], int]:
    return lambda: sum(1 for _ in folder.rglob(pattern))


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited at start-up: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {STARTUP_TIMEOUT_S} s")


def start_storescp(work: Path) -> Running:
    exe = shutil.which("storescp")
    if exe is None:
        raise PeerMissingError("storescp (DCMTK) is not installed: apt-get install dcmtk")
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    log = work / "storescp.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [exe, "--fork", "-aet", "STORESCP", "-od", str(out), "-fe", ".dcm", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
    try:
        _wait_for_port(port, proc, log)
    except BaseException:
        _terminate(proc)
        raise
    return Running(port, "STORESCP", _files_in(out, "*.dcm"), lambda: _terminate(proc))


def start_orthanc_receiver(work: Path) -> Running:
    exe = orthanc_executable()
    if exe is None:
        raise PeerMissingError("Orthanc is not installed: apt-get install orthanc")
    orthanc = start_orthanc(exe, work / "orthanc", STARTUP_TIMEOUT_S)
    return Running(
        orthanc.dicom_port,
        orthanc.aet,
        lambda: int(orthanc.rest("/statistics")["CountInstances"]),
        orthanc.stop,
        orthanc.process.pid,
    )


def _start_child(kind: str, work: Path, profile: Path | None, cprofile: bool) -> Running:
    """This script in --serve mode; it prints its port, and stops when its stdin closes."""
    folder = work / kind
    log = work / f"{kind}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--dir", str(folder)]
    if profile is not None:
        argv += ["--profile", str(profile), *(["--cprofile"] if cprofile else [])]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink)
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "PORT":
            raise RuntimeError(f"{kind} did not start: {log.read_text()[-2000:]}")
    except BaseException:  # Ctrl-C while it starts, too
        _terminate(proc)
        raise
    stdin = proc.stdin

    def stop() -> None:
        stdin.close()  # the child stops its receiver and exits
        _terminate_after(proc, 60)

    node = kind.startswith("node")
    pattern = "*/*.dcm" if node else "*.dcm"
    root = folder / "spool" if node else folder
    return Running(int(line[1]), "LTDIFF", _files_in(root, pattern), stop)


def _terminate_after(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _terminate(proc)


#: name -> start(work folder, profile folder or None, cprofile); only the node is profiled.
STARTERS: dict[str, Callable[[Path, Path | None, bool], Running]] = {
    "storescp": lambda work, _profile, _cprofile: start_storescp(work),
    "orthanc": lambda work, _profile, _cprofile: start_orthanc_receiver(work),
    "pynetdicom": lambda work, _profile, _cprofile: _start_child("pynetdicom", work, None, False),
    "node": lambda work, profile, cprofile: _start_child("node", work, profile, cprofile),
    "node-inprocess": lambda work, _profile, _cprofile: _start_child(
        "node-inprocess", work, None, False
    ),
}


# ---- the child receivers (--serve) --------------------------------------------------------------


def _serve(kind: str, folder: Path, profile: Path | None, cprofile: bool) -> int:
    """Run one receiver until stdin closes; print 'PORT <n>' once it listens."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (Ctrl-C reaches both)
    configure_logging("console", "warning")
    folder.mkdir(parents=True)
    finish = None
    if profile is not None:
        finish = receive_profile.install(profile, cprofile=cprofile)
    if kind.startswith("node"):
        # No destination, and a stable age far beyond any trial: no series is ever processed.
        # The profile instruments this process: its node receives in-process when profiled.
        inprocess = kind == "node-inprocess" or profile is not None
        listener = {"receiver_processes": 0} if inprocess else {}
        node = Node(
            loopback_config(folder, None, stable_age_s=3600.0, poll_interval_s=1.0, **listener)
        )
        node.start()
        port, stop = node.port, node.stop
    else:
        server = _pynetdicom_server(folder)
        port, stop = int(server.server_address[1]), server.shutdown
    print(f"PORT {port}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes it
    finally:
        stop()
        if finish is not None:
            finish()
    return 0


def _pynetdicom_server(folder: Path) -> ThreadedAssociationServer:
    """The reference: pynetdicom's own storage SCP, each file written and fsynced."""

    def store(event: evt.Event) -> int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        with (folder / f"{uid}.dcm").open("wb") as handle:
            handle.write(event.encoded_dataset())
            handle.flush()
            os.fsync(handle.fileno())
        return 0x0000

    ae = AE(ae_title="LTDIFF")
    ae.maximum_associations = 16
    ae.add_supported_context(CTImageStorage, ACCEPTED_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    if server is None:  # only with block=True
        raise RuntimeError("pynetdicom returned no server")
    return server


# ---- trials ------------------------------------------------------------------------------------


def send(storescu: str, running: Running, files: Sequence[Path], associations: int) -> float:
    """Send `files` over `associations` concurrent storescu processes; seconds taken."""
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for part in split_files(files, associations):
            argv = [storescu, "-aet", "BENCH", "-aec", running.aet, "127.0.0.1", str(running.port)]
            procs.append(
                subprocess.Popen(
                    [*argv, *map(str, part)],
                    env=dcmtk_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        errors = [p.communicate()[1] for p in procs]
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            _terminate(p, 5)
    failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode]
    if failed:
        raise TrialError(f"storescu failed: {failed[0].decode(errors='replace')[-500:]}")
    return elapsed


def run_trial(
    name: str,
    storescu: str,
    files: Sequence[Path],
    associations: int,
    work: Path,
    *,
    profile: Path | None = None,
    cprofile: bool = False,
    load: str = "none",
) -> tuple[float, float]:
    """(instances/s, CPU seconds the background load used during the send: 0 without one)."""
    from engine_load import start_engine_load  # noqa: PLC0415 - it imports this module

    work.mkdir(parents=True)
    running = STARTERS[name](work, profile, cprofile)
    try:
        background = None if load == "none" else start_engine_load(sched_idle=load != "engine")
        try:
            cpu_before = 0.0 if background is None else background.cpu_s()
            elapsed = send(storescu, running, files, associations)
            load_cpu = 0.0 if background is None else background.cpu_s() - cpu_before
        finally:
            if background is not None:
                background.stop()
        stored = running.count()
    finally:
        running.stop()
    if stored != len(files):
        raise TrialError(f"stored {stored} of {len(files)} instances")
    return len(files) / elapsed, load_cpu


def _on_sigterm(_signum: int, _frame: object) -> NoReturn:
    raise SystemExit(143)  # unwinds the finally blocks: receivers stopped, work folder removed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        return _serve(args.serve, args.dir, args.profile, args.cprofile)
    storescu = shutil.which("storescu")
    if storescu is None:
        print("storescu (DCMTK) is needed to send: apt-get install dcmtk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.keep or Path(tempfile.mkdtemp(prefix="ltdiff-bench-receive-"))
    try:
        t0 = time.monotonic()
        files = generate_phantom_series(work / "input", n_slices=args.instances, seed=7)
        mb = sum(p.stat().st_size for p in files) / len(files) / 1e3
        print(f"phantom: {len(files)} instances of {mb:.0f} KB in {time.monotonic() - t0:.1f} s")
        rates, skipped, failures, runs = _run_all(args, storescu, files, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmedian instances/s over {args.repeats} run(s) of {args.instances} instances "
        f"(storescu, TCP_NODELAY=1, loopback, {os.cpu_count()} CPUs):\n"
    )
    print(
        format_table(
            medians(rates), args.receivers, args.associations, skipped=skipped, loads=args.load
        )
    )
    present = [r for r in args.receivers if r not in skipped]
    paired = format_paired(runs, present, args.associations, args.load)
    if paired:
        print("\nratios within each run (trials back to back):")
        print(paired)
    if args.profile is not None:
        print()
        print(receive_profile.report(args.profile))
    return 1 if failures else 0


def _run_all(
    args: argparse.Namespace, storescu: str, files: list[Path], work: Path
) -> tuple[dict[Key, list[float]], dict[str, str], int, dict[RunKey, float]]:
    """Rates per (trial name, associations), receivers skipped (and why), failed trials, and
    the rate of each (trial name, associations, repeat) that succeeded; a trial name is the
    receiver's, with the load after a '+' (`trial_name`)."""
    rates: dict[Key, list[float]] = {
        (trial_name(r, load), a): []
        for r in args.receivers
        for load in args.load
        for a in args.associations
    }
    runs: dict[RunKey, float] = {}
    skipped: dict[str, str] = {}
    trial = failures = 0
    # Interleaved (repeat, associations, receiver, load) so drift on the machine hits all alike
    # and each receiver's loaded trial runs right after its unloaded one.
    for repeat in range(args.repeats):
        for assoc in args.associations:
            for receiver in args.receivers:
                for load in args.load:
                    if receiver in skipped:
                        continue
                    trial += 1
                    name = trial_name(receiver, load)
                    profile = args.profile if name == "node" and assoc == 1 else None
                    try:
                        rate, load_cpu = run_trial(
                            receiver,
                            storescu,
                            files,
                            assoc,
                            work / f"trial-{trial}",
                            profile=profile,
                            cprofile=args.cprofile,
                            load=load,
                        )
                    except PeerMissingError as exc:
                        skipped[receiver] = str(exc)
                        print(f"{receiver}: skipped, {exc}", file=sys.stderr)
                        continue
                    except (TrialError, RuntimeError) as exc:
                        print(f"{name} x{assoc} run {repeat + 1}: FAILED: {exc}", file=sys.stderr)
                        failures += 1
                        continue
                    finally:
                        shutil.rmtree(work / f"trial-{trial}", ignore_errors=True)
                    rates[(name, assoc)].append(rate)
                    runs[(name, assoc, repeat)] = rate
                    used = f" (the load used {load_cpu:.2f} s of CPU)" if load != "none" else ""
                    print(
                        f"{name:<10} {assoc} assoc run {repeat + 1}: {rate:6.0f} instances/s{used}"
                    )
    return rates, skipped, failures, runs


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # receivers stopped and work folder removed on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
