"""Where the node's receive path spends its time: instrumentation for bench_receive.py --profile.

Installed in the node's process before the node starts (`install`), it wraps the functions an
instance passes through between its first P-DATA PDU and its C-STORE response with wall-clock
timers and, with `cprofile`, starts a cProfile per thread. At exit (`finish`) it writes, per
process, `stages-<pid>.json` (total seconds and calls per stage) and `<thread>-<pid>.pstats`.
`report` sums the stage files of a folder into a per-instance table.

Threads of one association (pynetdicom 3.0, made event-driven by dicom_node/reactor.py): the
DUL thread reads each PDU from the socket and assembles the DIMSE message (`_read_pdu_data`,
`receive_primitive`); the association thread waits for complete messages and runs the handler
and the response (`_serve_request`). Stages nest (the handler is inside `_serve_request`, the
spool write inside the handler); the report says which.

Wall time under a wrapper includes waiting for the GIL. cProfile slows Python code several
times: take the stage table from a run without it, and the pstats for finding the functions
inside a stage. Compare the profiled trial's rate with an unprofiled one.
"""

from __future__ import annotations

import cProfile
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (stage, owner, attribute, parent stage or "" for a top-level stage, meaning)
_STAGES: list[tuple[str, str, str, str, str]] = [
    (
        "pdu_read",
        "dicom_node.reactor:EventDrivenDUL",
        "_read_pdu_data",
        "",
        "DUL thread: socket reads of one PDU (recv_into one buffer) and its decode",
    ),
    (
        "dimse_assembly",
        "dicom_node.dimse_guard:GuardedDIMSEProvider",
        "receive_primitive",
        "",
        "DUL thread (state machine): PDVs appended to the message; command set decoded, guard",
    ),
    (
        "serve_request",
        "pynetdicom.association:Association",
        "_serve_request",
        "",
        "association thread: C-STORE service: handler, then the response",
    ),
    (
        "handler",
        "dicom_node.scp:StoreHandler",
        "__call__",
        "serve_request",
        "the node's C-STORE handler (everything below)",
    ),
    (
        "read_header",
        "dicom_node.scp",
        "read_header",
        "handler",
        "bound the dataset (scan_structure) and decode the header with pydicom",
    ),
    ("describe", "dicom_node.scp", "_describe", "handler", "routing attributes from the header"),
    ("has_instance", "dicom_node.store:JobStore", "has_instance", "handler", "duplicate check"),
    (
        "file_header",
        "dicom_node.part10",
        "file_header",
        "handler",
        "preamble and file meta encoded (written with the dataset buffer by one writev)",
    ),
    (
        "spool_store",
        "dicom_node.spool:Spool",
        "store",
        "handler",
        "durable spool write (everything below + link + unlink)",
    ),
    (
        "write_temporary",
        "engine.durable",
        "write_temporary",
        "spool_store",
        "open, write, fsync of the temporary file",
    ),
    ("fsync", "os", "fsync", "", "every os.fsync (file and directory)"),
    (
        "fsync_directory",
        "engine.durable",
        "fsync_directory",
        "spool_store",
        "open + fsync + close of the series directory",
    ),
    (
        "record_instance",
        "dicom_node.store:JobStore",
        "record_instance",
        "handler",
        "SQLite transaction (lock wait, statements, COMMIT with synchronous=FULL)",
    ),
    (
        "send_response",
        "dicom_node.reactor:EventDrivenAssociation",
        "_send_msg",
        "serve_request",
        "encode the C-STORE-RSP (dicom_node/dimse_response.py) and queue it for the DUL thread",
    ),
]

_lock = threading.Lock()
_totals: dict[str, list[float]] = {}
#: Wall and process CPU clocks at the first handler call's start and the last one's end.
_span: dict[str, float] = {}
_profiles: dict[str, cProfile.Profile] = {}


def _resolve(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    __import__(module_name)
    obj: Any = sys.modules[module_name]
    return getattr(obj, attr) if attr else obj


def _timed(stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        if stage == "handler" and not _span:
            _span.update(wall0=t0, cpu0=time.process_time())
        try:
            return func(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            with _lock:
                entry = _totals.setdefault(stage, [0.0, 0])
                entry[0] += t1 - t0
                entry[1] += 1
                if stage == "handler":
                    _span.update(wall1=t1, cpu1=time.process_time(), calls=entry[1])

    return wrapper


def _start_thread_profile(*_args: object) -> None:
    """threading.setprofile hook: the first event of a new thread starts its own cProfile."""
    profile = cProfile.Profile()
    with _lock:
        _profiles[f"{threading.current_thread().name}-{threading.get_ident()}"] = profile
    profile.enable()  # replaces this hook for the thread


def install(out_dir: Path, *, cprofile: bool = False) -> Callable[[], None]:
    """Wrap the stages (and with `cprofile` profile new threads); returns the function that
    writes the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stage, owner, attr, _parent, _meaning in _STAGES:
        target = _resolve(owner)
        setattr(target, attr, _timed(stage, getattr(target, attr)))
    if cprofile:
        threading.setprofile(_start_thread_profile)

    def finish() -> None:
        if cprofile:
            threading.setprofile(None)
        pid = os.getpid()
        with _lock:
            totals = {k: list(v) for k, v in _totals.items()}
            profiles = dict(_profiles)
        data = {"stages": totals, "span": dict(_span)}
        (out_dir / f"stages-{pid}.json").write_text(json.dumps(data, indent=1))
        for name, profile in profiles.items():
            profile.disable()  # only stops the calling thread's; the others have ended
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            profile.dump_stats(out_dir / f"{safe}-{pid}.pstats")

    return finish


def report(out_dir: Path) -> str:
    """The stage table summed over the stage files under `out_dir`, per stored instance."""
    totals: dict[str, list[float]] = {}
    cycle = [0.0, 0.0, 0]  # wall s, process CPU s, intervals between first and last handler
    for path in sorted(out_dir.glob("stages-*.json")):
        data = json.loads(path.read_text())
        for stage, (seconds, calls) in data["stages"].items():
            entry = totals.setdefault(stage, [0.0, 0])
            entry[0] += seconds
            entry[1] += calls
        span = data["span"]
        if span.get("calls", 0) > 1:
            cycle[0] += span["wall1"] - span["wall0"]
            cycle[1] += span["cpu1"] - span["cpu0"]
            cycle[2] += span["calls"] - 1
    instances = int(totals.get("record_instance", [0.0, 0])[1])
    if not instances:
        return f"profile: no instance recorded under {out_dir}"
    lines = [
        f"node receive path, wall time per instance ({instances} instances; stages nest as "
        f"'inside' says; under --cprofile the Python stages are inflated, pstats in {out_dir}):",
    ]
    if cycle[2]:
        lines.append(
            f"cycle (first handler start to last handler end, per instance): wall "
            f"{1e3 * cycle[0] / cycle[2]:.2f} ms, node process CPU (all threads) "
            f"{1e3 * cycle[1] / cycle[2]:.2f} ms"
        )
    lines += [
        "| stage | inside | ms/instance | calls/instance | what |",
        "| --- | --- | --: | --: | --- |",
    ]
    for stage, _owner, _attr, parent, meaning in _STAGES:
        seconds, calls = totals.get(stage, [0.0, 0])
        lines.append(
            f"| {stage} | {parent or '-'} | {1e3 * seconds / instances:.2f} | "
            f"{calls / instances:.1f} | {meaning} |"
        )
    return "\n".join(lines)
