"""Turnaround benchmark: a 300-slice series through the node (linear engine) into Orthanc, one run.

Each trial starts a fresh Orthanc (tests/peer_support.py, TCP_NODELAY=1, the PACS) and a fresh
node in its own process (dicom_node.demo.loopback_config, linear engine, destination = that
Orthanc, a short stable age so that the stable wait is known and excluded exactly), sends N
synthetic 512x512 CT instances (dicom_node.phantom, as bench_receive.py does) with DCMTK's
storescu (TCP_NODELAY=1) and times each stage from the node's own records (its database:
series.last_received and completed_at, jobs.started_at, the job summary's decode / engine /
encode / processing times, the exports' queue time and sent_at; its `export.batch` log lines)
and Orthanc's REST API (polled every 20 ms until it holds all N derived instances):

    last instance received (recorded by the node)
    -> series closed       (stable age + scheduler lag; the stable age itself is excluded)
    -> job started         (an engine worker claimed it)
    -> engine done         (read + decode, engine, build + encode in the engine process)
    -> derived written     (outbox files fsynced, exports queued in the database)
    -> export started      (the exporter's association)
    -> export confirmed    (the last C-STORE Success recorded)
    -> Orthanc has all N   (REST)

For reference, in the same run, DCMTK storescu sends the same derived files straight to a fresh
Orthanc over one association: the network/PACS floor; printed with the ratio node export /
storescu. With `--during-processing` (default on) one more trial per repeat measures reception
unaffected by processing: a second N-slice series sent while the first is processed, its rate
as a ratio to the first series' (idle) rate in the same trial.

`--baseline DIR` runs every trial also with the node of another checkout (DIR on PYTHONPATH,
e.g. `git archive COMMIT | tar -x -C DIR`), interleaved, so before/after is one run.

`--warm` sends another series through each node first and measures the second one: the steady
state of a node that has run a while. Without it the measured series is a fresh node's first,
whose engine process touches its memory for the first time (on this VM that alone costs about
1-2 s of a 300-slice job: page faults on first use).

Usage: python benchmarks/bench_turnaround.py [--slices 300] [--repeats 3] [--stable-age 1.0]
       [--poll-interval S] [--engine-nice N] [--no-during-processing] [--warm] [--baseline DIR]
       [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from bench_receive import (
    PeerMissingError,
    Running,
    _terminate,
    process_stat,
    send,
    start_orthanc_receiver,
)
from pydicom import dcmread

from dicom_node.config import AssemblyConfig
from dicom_node.demo import loopback_config
from dicom_node.logs import configure_logging
from dicom_node.phantom import generate_phantom_series
from dicom_node.service import Node

STARTUP_TIMEOUT_S = 120
TRIAL_TIMEOUT_S = 300
ORTHANC_POLL_S = 0.02
DB_NAME = "ltdiff-node.sqlite3"

#: (label, start mark, end mark) of the stage table, in time order; marks are keys of
#: `Marks.at`. The export may start while the engine process still writes (its chunks are
#: queued as they are written): the export rows under the table say how it overlapped.
STAGES = (
    ("series closed (less the stable age)", "received", "closed"),
    ("job claimed by a worker", "closed", "claimed"),
    ("engine process: read + decode", "claimed", "decoded"),
    ("engine process: engine", "decoded", "engine_done"),
    ("engine process: build + encode", "engine_done", "encoded"),
    ("engine process: write derived files", "encoded", "written_in_engine"),
    (
        "export after the engine process (result back, export ends)",
        "written_in_engine",
        "export_confirmed",
    ),
    ("Orthanc has all N (REST poll)", "export_confirmed", "orthanc_complete"),
)
#: The export's own rows: first export queued -> the exporter starts -> last confirmation.
EXPORT_STAGES = (
    ("export: first queued -> exporter starts", "queued", "export_started"),
    ("export: exporter starts -> last C-STORE confirmed", "export_started", "export_confirmed"),
)


# ---- the node child (--serve) ------------------------------------------------------------------


def _serve(
    folder: Path,
    orthanc_port: int,
    stable_age_s: float,
    poll_s: float | None,
    engine_nice: int | None,
) -> int:
    """Run a node until stdin closes; write its port to `folder/port` once it listens."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    configure_logging("json", "info")
    config = loopback_config(
        folder / "state",
        orthanc_port,
        stable_age_s=stable_age_s,
        poll_interval_s=AssemblyConfig.poll_interval_s if poll_s is None else poll_s,
    )
    config = dataclasses.replace(config, log_format="json", log_level="info")
    if engine_nice is not None:
        config = dataclasses.replace(
            config, jobs=dataclasses.replace(config.jobs, engine_nice=engine_nice)
        )
    node = Node(config)
    node.start()
    (folder / "port.tmp").write_text(str(node.port))
    (folder / "port.tmp").rename(folder / "port")
    try:
        sys.stdin.read()
    finally:
        node.stop()
    return 0


@dataclass
class NodeChild:
    port: int
    folder: Path
    proc: subprocess.Popen[bytes]

    @property
    def database(self) -> Path:
        return self.folder / "state" / DB_NAME

    @property
    def log(self) -> Path:
        return self.folder / "node.log"

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _terminate(self.proc)


def start_node(
    folder: Path, orthanc_port: int, args: argparse.Namespace, pythonpath: Path | None
) -> NodeChild:
    folder.mkdir(parents=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(folder)]
    argv += ["--orthanc-port", str(orthanc_port), "--stable-age", str(args.stable_age)]
    if args.poll_interval is not None:
        argv += ["--poll-interval", str(args.poll_interval)]
    if args.engine_nice is not None:
        argv += ["--engine-nice", str(args.engine_nice)]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    with (folder / "node.log").open("wb") as sink:
        # cwd: the engine processes (multiprocessing forkserver, `python -c`) have it on sys.path
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=sink, stderr=sink, env=env, cwd=pythonpath or folder
        )
    port_file = folder / "port"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc)
            log = (folder / "node.log").read_text()[-2000:]
            raise RuntimeError(f"the node did not start: {log}")
        time.sleep(0.05)
    return NodeChild(int(port_file.read_text()), folder, proc)


# ---- what the node recorded --------------------------------------------------------------------


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def job_state(database: Path, series_uid: str) -> str | None:
    with _db(database) as conn:
        row = conn.execute(
            "SELECT state FROM jobs WHERE series_uid=? ORDER BY id DESC LIMIT 1", (series_uid,)
        ).fetchone()
    return None if row is None else str(row["state"])


def log_events(log: Path, name: str) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            events.append(event)
    return events


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Marks:
    """Wall-clock times (time.time()) of each stage's end, from the node's records."""

    at: dict[str, float]
    derived: int
    stable_age_s: float
    #: seconds the exporter spent sending (its `export.batch` lines), waits for chunks excluded
    export_busy_s: float = 0.0
    job_id: int = 0

    def span(self, start: str, end: str) -> float | None:
        if start not in self.at or end not in self.at:
            return None
        less = self.stable_age_s if (start, end) == ("received", "closed") else 0.0
        return self.at[end] - self.at[start] - less

    @property
    def total(self) -> float:
        return self.at["orthanc_complete"] - self.at["received"] - self.stable_age_s

    @property
    def export_s(self) -> float:
        return self.export_busy_s or self.at["export_confirmed"] - self.at["export_started"]


def read_marks(
    child: NodeChild, series_uid: str, orthanc_complete: float, stable_age_s: float
) -> Marks:
    with _db(child.database) as conn:
        series = conn.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        job = conn.execute(
            "SELECT * FROM jobs WHERE series_uid=? ORDER BY id DESC LIMIT 1", (series_uid,)
        ).fetchone()
        exp = conn.execute(
            "SELECT COUNT(*) AS n, MIN(next_attempt) AS queued, MAX(sent_at) AS last, "
            "SUM(state='sent') AS sent FROM exports WHERE job_id=?",
            (job["id"],),
        ).fetchone()
    summary = json.loads(job["summary_json"] or "{}")
    at = {
        "received": float(series["last_received"]),
        "closed": float(series["completed_at"]),
        "claimed": float(job["started_at"]),
        "queued": float(exp["queued"]),
        "export_confirmed": float(exp["last"]),
        "orthanc_complete": orthanc_complete,
    }
    # The engine process's own stage times, laid end to end from the claim.
    t = at["claimed"]
    for key, ms in (
        ("decoded", "decode_ms"),
        ("engine_done", "engine_ms"),
        ("encoded", "encode_ms"),
    ):
        t += float(summary.get(ms, 0.0)) / 1000
        at[key] = t
    at["written_in_engine"] = at["claimed"] + float(summary.get("processing_ms", 0.0)) / 1000
    batches = [  # this series' batches: a warm-up series' went out before it was received
        e
        for e in log_events(child.log, "export.batch")
        if e.get("sent") and _epoch(e["timestamp"]) > at["received"]
    ]
    if batches:  # the first batch that sent anything: its log time less its duration
        first = batches[0]
        at["export_started"] = _epoch(first["timestamp"]) - float(first["seconds"])
    if at.get("export_started", 0) < at["queued"]:
        at["export_started"] = at["queued"]
    busy = sum(float(e["seconds"]) for e in batches)
    return Marks(at, int(exp["sent"] or 0), stable_age_s, busy, int(job["id"]))


# ---- trials ------------------------------------------------------------------------------------


class TrialError(RuntimeError):
    pass


def _wait(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TrialError(f"timed out waiting for {what}")
        time.sleep(poll)


def _series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@dataclass
class TurnaroundTrial:
    marks: Marks
    storescu_s: float  # storescu: the derived files straight to a fresh Orthanc


def turnaround_trial(
    storescu: str,
    files: Sequence[Path],
    work: Path,
    args: argparse.Namespace,
    pythonpath: Path | None,
    *,
    warm_up: Sequence[Path] = (),
) -> TurnaroundTrial:
    """One series through a fresh node into a fresh Orthanc. `warm_up`: another series sent
    through the same node first, waited for until Orthanc holds it, so that the measured one
    meets a warm engine process (its memory and the FFT's plans already in use)."""
    series_uid = _series_uid(files[0])
    orthanc = start_orthanc_receiver(work / "pacs")
    try:
        child = start_node(work / "node", orthanc.port, args, pythonpath)
        try:
            if warm_up:
                send(storescu, _to(child), warm_up, 1)
                _wait_for_orthanc(orthanc, len(warm_up))
            send(storescu, _to(child), files, 1)
            orthanc_complete = _wait_for_orthanc(orthanc, len(warm_up) + len(files))
            _wait(
                lambda: job_state(child.database, series_uid) in ("done", "failed"),
                TRIAL_TIMEOUT_S,
                "the job to settle",
            )
        finally:
            child.stop()
        marks = read_marks(child, series_uid, orthanc_complete, args.stable_age)
    finally:
        orthanc.stop()
    if marks.derived != len(files):
        raise TrialError(f"the node confirmed {marks.derived} of {len(files)} derived instances")
    derived = sorted((child.folder / "state" / "outbox" / str(marks.job_id)).glob("*.dcm"))
    reference = start_orthanc_receiver(work / "pacs-storescu")
    try:
        storescu_s = send(storescu, reference, derived, 1)
        if reference.count() != len(derived):
            raise TrialError("Orthanc did not store every file storescu sent")
    finally:
        reference.stop()
    return TurnaroundTrial(marks, storescu_s)


def _to(child: NodeChild) -> Running:
    return Running(child.port, "LTDIFF", lambda: 0, lambda: None)


def _wait_for_orthanc(orthanc: Running, n: int) -> float:
    """time.time() of the first poll at which Orthanc holds `n` instances."""
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while orthanc.count() < n:
        if time.monotonic() > deadline:
            raise TrialError(f"Orthanc holds {orthanc.count()} of {n} after {TRIAL_TIMEOUT_S} s")
        time.sleep(ORTHANC_POLL_S)
    return time.time()


@dataclass
class DuringTrial:
    idle_rate: float
    busy_rate: float
    overlap: float  # share of the second send during which the first job was still open
    #: CPU seconds each role spent during the second send (`cpu_by_role`)
    cpu_s: dict[str, float] = field(default_factory=dict)
    first_job_s: float = 0.0  # the first job, claimed -> finished
    paused_s: float = 0.0  # of which its engine process was paused for reception


CPU_ROLES = ("node process", "receiver processes", "engine processes", "Orthanc")


def _is_receiver(pid: int) -> bool:
    try:
        return b"dicom_node.receiver_process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def cpu_by_role(node_pid: int, orthanc_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the node process, of its receiver processes, of its other
    descendants (the fork server and the engine processes forked from it), and of Orthanc.
    Processes that have exited are not counted."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    node = stats.get(node_pid)
    cpu = dict.fromkeys(CPU_ROLES, 0.0)
    if node is None:
        return cpu
    cpu["node process"] = node[1]
    descendants, frontier = set(), {node_pid}
    while frontier:
        frontier = {pid for pid, st in stats.items() if st[0] in frontier} - descendants
        descendants |= frontier
    for pid in descendants:
        role = "receiver processes" if _is_receiver(pid) else "engine processes"
        cpu[role] += stats[pid][1]
    if orthanc_pid is not None and orthanc_pid in stats:
        cpu["Orthanc"] = stats[orthanc_pid][1]
    return cpu


def during_processing_trial(
    storescu: str,
    first: Sequence[Path],
    second: Sequence[Path],
    *,
    work: Path,
    args: argparse.Namespace,
    pythonpath: Path | None,
) -> DuringTrial:
    """The second series is sent as soon as the first one's job is processing."""
    series_uid = _series_uid(first[0])
    orthanc = start_orthanc_receiver(work / "pacs")
    try:
        child = start_node(work / "node", orthanc.port, args, pythonpath)
        try:
            idle_s = send(storescu, _to(child), first, 1)
            _wait(
                lambda: job_state(child.database, series_uid) == "processing",
                TRIAL_TIMEOUT_S,
                "the first job to start",
                poll=0.01,
            )
            before = cpu_by_role(child.proc.pid, orthanc.pid)
            t0 = time.time()
            busy_s = send(storescu, _to(child), second, 1)
            t1 = time.time()
            after = cpu_by_role(child.proc.pid, orthanc.pid)
            _wait(
                lambda: job_state(child.database, series_uid) in ("done", "failed"),
                TRIAL_TIMEOUT_S,
                "the first job to settle",
            )
        finally:
            child.stop()
        with _db(child.database) as conn:
            row = conn.execute(
                "SELECT started_at, finished_at, summary_json FROM jobs WHERE series_uid=?",
                (series_uid,),
            ).fetchone()
    finally:
        orthanc.stop()
    overlap = max(0.0, min(t1, float(row["finished_at"])) - t0) / (t1 - t0)
    spent = {role: after[role] - before[role] for role in CPU_ROLES}
    summary = json.loads(row["summary_json"] or "{}")
    return DuringTrial(
        len(first) / idle_s,
        len(second) / busy_s,
        overlap,
        spent,
        first_job_s=float(row["finished_at"]) - float(row["started_at"]),
        paused_s=float(summary.get("paused_for_reception_s", 0.0)),
    )


# ---- report ------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def report(
    trials: dict[str, list[TurnaroundTrial]], during: dict[str, list[DuringTrial]], n: int
) -> str:
    labels = list(trials)
    lines = [
        "| stage | " + " | ".join(f"{label} s, median (min-max)" for label in labels) + " |",
        "| --- | " + " | ".join("--:" for _ in labels) + " |",
    ]
    for name, start, end in STAGES + EXPORT_STAGES:
        cells = []
        for label in labels:
            spans = [t.marks.span(start, end) for t in trials[label]]
            cells.append(_stats([s for s in spans if s is not None]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows: list[tuple[str, Callable[[TurnaroundTrial], float]]] = [
        (
            "export: while the engine process still wrote",
            lambda t: max(0.0, t.marks.at["written_in_engine"] - t.marks.at["export_started"]),
        ),
        ("**turnaround, stable age excluded**", lambda t: t.marks.total),
        (f"node export of {n} derived instances (exporter busy)", lambda t: t.marks.export_s),
        (f"storescu, the same {n} files straight to Orthanc", lambda t: t.storescu_s),
    ]
    for name, value in rows:
        cells = [_stats([value(t) for t in trials[label]]) for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = [_stats([t.marks.export_s / t.storescu_s for t in trials[label]]) for label in labels]
    lines.append("| node export / storescu | " + " | ".join(ratios) + " |")
    for label, runs in during.items():
        if not runs:
            continue
        lines.append("")
        lines.append(
            f"{label}: reception while the first series is processed: "
            f"idle {_stats([r.idle_rate for r in runs])} inst/s, "
            f"busy {_stats([r.busy_rate for r in runs])} inst/s, "
            f"busy / idle {_stats([r.busy_rate / r.idle_rate for r in runs])}, "
            f"share of the second send overlapping the first job "
            f"{_stats([r.overlap for r in runs])}; CPU s during the second send: "
            + ", ".join(
                f"{role} {_stats([r.cpu_s.get(role, 0.0) for r in runs])}" for role in CPU_ROLES
            )
            + f"; the first job took {_stats([r.first_job_s for r in runs])} s, paused for "
            f"reception {_stats([r.paused_s for r in runs])} s of it"
        )
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stable-age", type=float, default=1.0, help="assembly.stable_age_s (excluded)"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        help=f"assembly.poll_interval_s (default: the shipped {AssemblyConfig.poll_interval_s})",
    )
    parser.add_argument(
        "--engine-nice",
        type=int,
        help="jobs.engine_nice (default: the config's, 10); 0 on a machine busy with other "
        "work, where a niced engine waits for it",
    )
    parser.add_argument(
        "--no-during-processing",
        dest="during",
        action="store_false",
        help="skip the reception-while-processing trials",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="send another series through each node first and measure the second: a node that "
        "has run a while (default: a fresh node's first series)",
    )
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR", help="also run the node of this checkout"
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--orthanc-port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _on_sigterm(_signum: int, _frame: object) -> NoReturn:
    raise SystemExit(143)  # unwinds the finally blocks: peers stopped, work folder removed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        return _serve(
            args.serve, args.orthanc_port, args.stable_age, args.poll_interval, args.engine_nice
        )
    signal.signal(signal.SIGTERM, _on_sigterm)
    storescu = shutil.which("storescu")
    if storescu is None:
        print("storescu (DCMTK) is needed to send: apt-get install dcmtk", file=sys.stderr)
        return 2
    nodes: dict[str, Path | None] = {"this checkout": None}
    if args.baseline is not None:
        nodes = {"baseline": args.baseline.resolve(), **nodes}
    work = args.keep or Path(tempfile.mkdtemp(prefix="ltdiff-bench-turnaround-"))
    trials: dict[str, list[TurnaroundTrial]] = {label: [] for label in nodes}
    during: dict[str, list[DuringTrial]] = {label: [] for label in nodes}
    failures = 0
    try:
        files = generate_phantom_series(work / "input", n_slices=args.slices, seed=7)
        second = (
            generate_phantom_series(work / "input2", n_slices=args.slices, seed=8)
            if args.during
            else []
        )
        warm_up = (
            generate_phantom_series(work / "input-warm", n_slices=args.slices, seed=9)
            if args.warm
            else []
        )
        trial = 0
        for repeat in range(args.repeats):
            for label, pythonpath in nodes.items():
                trial += 1
                folder = work / f"trial-{trial}"
                try:
                    result = turnaround_trial(
                        storescu, files, folder, args, pythonpath, warm_up=warm_up
                    )
                except (TrialError, RuntimeError) as exc:
                    print(f"{label} run {repeat + 1}: FAILED: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                except PeerMissingError as exc:
                    print(f"Orthanc is needed: {exc}", file=sys.stderr)
                    return 2
                finally:
                    if args.keep is None:
                        shutil.rmtree(folder, ignore_errors=True)
                trials[label].append(result)
                print(
                    f"{label} run {repeat + 1}: turnaround {result.marks.total:.2f} s "
                    f"(stable age {args.stable_age:g} s excluded), export "
                    f"{result.marks.export_s:.2f} s, storescu {result.storescu_s:.2f} s",
                    flush=True,
                )
                if not args.during:
                    continue
                trial += 1
                folder = work / f"trial-{trial}"
                try:
                    busy = during_processing_trial(
                        storescu, files, second, work=folder, args=args, pythonpath=pythonpath
                    )
                except (TrialError, RuntimeError) as exc:
                    print(f"{label} run {repeat + 1} (during): FAILED: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                finally:
                    if args.keep is None:
                        shutil.rmtree(folder, ignore_errors=True)
                during[label].append(busy)
                print(
                    f"{label} run {repeat + 1}: reception idle {busy.idle_rate:.0f}, while "
                    f"processing {busy.busy_rate:.0f} inst/s "
                    f"({busy.busy_rate / busy.idle_rate:.2f}x)",
                    flush=True,
                )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{args.slices}-slice series, linear engine, Orthanc as the PACS, {args.repeats} run(s), "
        f"stable age {args.stable_age:g} s excluded, {os.cpu_count()} CPUs, "
        f"{'a warm node (its second series)' if args.warm else 'a fresh node (its first)'}:\n"
    )
    print(report(trials, during, args.slices))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
