"""Engine work in a child process, so that no job can take the node down.

Each engine worker (one per configured device) owns one long-lived child process, the *engine
process*. The child loads the engines once and runs jobs one at a time: read and decode the
series, run the engine, build the derived series, write it to the outbox (in chunks, each
reported to the parent once durable, so its export can start: EngineProgress). The parent (the
worker thread in the node) sends a job over a pipe and waits for the answer, watching the child:

- its resident memory (`jobs.memory_max_mb`): above the limit the child is killed;
- its run time per job (`jobs.timeout_s`): past it the child is killed;
- its life: a child that dies (killed by the kernel, a crash in native code) is noticed at once;
- the node's stop: the child is stopped and the job is released for the next start.

A job whose child had to be killed or died is an `EngineCrash`; the worker counts it and fails
the job after `jobs.max_attempts` crashes (store.record_crash). The child is started again for
the next job. Reception, the scheduler and the exporters never share memory with the engine.

Children are forked from multiprocessing's fork server: a small single-threaded process started
once, which imports the engine modules ahead of time, so a child starts in milliseconds, and
forks no thread state of the node (pynetdicom's association threads, SQLite) into it. A child
dies with the fork server, which dies with the node.

For programs that embed `dicom_node.service.Node` (the CLI, the demo, the benchmarks, tests):
as with any multiprocessing start method other than fork, a child re-imports the main module
under the name `__mp_main__`, so a script must start the node under
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.config import BUILTIN_FALLBACK, EngineConfig, NodeConfig
from dicom_node.logs import configure_process, get_logger, safe_error_text
from dicom_node.reception_first import LastInstanceAt, PauseAction, ReceptionPause
from engine.cpu_threads import share_cpus
from engine.derived import DerivedSeriesOptions
from engine.envelope_policy import (
    OUTSIDE_STATUSES,
    EnvelopePolicy,
    EnvelopeStatus,
    OutsideEnvelope,
    OutsideEnvelopeError,
)
from engine.interface import Engine, EngineError
from engine.pipeline import prepare_series, write_series
from engine.read_ahead import ReadAhead
from engine.registry import LINEAR_FILTER_KIND, EngineOptions, load_engine

log = get_logger("dicom_node.engine_host")

#: errno values that mean "no space left": the job waits for space instead of failing.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_POLL_S = 0.1
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def derived_options(config: NodeConfig) -> DerivedSeriesOptions:
    return DerivedSeriesOptions(
        series_description_prefix=config.derived.series_description_prefix,
        series_number_offset=config.derived.series_number_offset,
    )


# ---- messages between the worker and its engine process ----------------------------------------


@dataclass(frozen=True)
class EngineJob:
    job_id: int
    engine: str  # name of an [engines.NAME] table
    paths: tuple[str, ...]
    out_dir: str
    route: str | None = None  # the routing rule's name (for the logs)
    outside_envelope: OutsideEnvelope = OutsideEnvelope.FALLBACK  # the route's policy
    fallback_engine: str | None = None  # [engines.NAME]; None: the built-in linear filter
    series_uid: str = ""  # the source series (what was read ahead is used only for it)


@dataclass(frozen=True)
class ReadAheadHint:
    """Files of a series still being received that will probably be this engine's next job:
    the engine process reads and decodes them while it is idle (engine.read_ahead), and stops
    for the next message. No answer is sent. `paths` None: forget what was read ahead."""

    series_uid: str
    paths: tuple[str, ...] | None


@dataclass(frozen=True)
class EngineResult:
    """The derived series is in the outbox."""

    #: (SOP Instance UID, SOP Class UID, path, transfer syntax the file was written in)
    outputs: tuple[tuple[str, str, str, str], ...]
    derived_series_uid: str
    summary: dict[str, Any] = field(default_factory=dict)


class FailureKind(StrEnum):
    INPUT = "input"  # the series cannot be standardized (bad input, engine refused): fail the job
    DISK_FULL = "disk-full"  # no space to write the output: the job waits and retries


@dataclass(frozen=True)
class EngineFailure:
    kind: FailureKind
    reason: str
    # The envelope check when the series was refused for being outside the validated envelope
    # (EnvelopeCheck.as_log()); empty otherwise.
    envelope: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCrash:
    """The engine process died or was killed while running the job."""

    reason: str


@dataclass(frozen=True)
class EngineInterrupted:
    """The node is stopping; the job was not finished."""


EngineOutcome = EngineResult | EngineFailure | EngineCrash | EngineInterrupted

#: (SOP Instance UID, SOP Class UID, path, transfer syntax) of one written derived file.
OutputFile = tuple[str, str, str, str]


@dataclass(frozen=True)
class EngineProgress:
    """Derived files already written (fsynced, directory too) while the job goes on: the
    worker queues their export at once, so the exporter sends while the rest is written."""

    outputs: tuple[OutputFile, ...]


#: Derived files are written, and reported to the worker, in chunks of this many.
WRITE_CHUNK = 32


# ---- the child side ------------------------------------------------------------------------------


class EngineCache:
    """Engines are loaded once per (kind, weights, options, device) and reused across jobs (in
    the engine process, which runs one job at a time)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._engines: dict[tuple[str, Path | None, EngineOptions, str], Engine] = {}

    def preload(self, device: str) -> None:
        """Load every engine a route uses, and the fallback engine of every route that falls
        back outside the envelope, so that a missing or incompatible weights file stops start-up
        (EngineError) instead of failing the first series."""
        for name in sorted({route.engine for route in self.config.routes}):
            self.get(name, device)
        for route in self.config.routes:
            if route.outside_envelope is OutsideEnvelope.FALLBACK:
                self.load(self.config.fallback_engine(route), device)

    def get(self, name: str, device: str) -> Engine:
        """The engine of the [engines.NAME] table `name`."""
        return self.load(self.config.engine(name), device)

    def fallback(self, name: str | None, device: str) -> Engine:
        """A route's fallback engine: [engines.NAME], or the built-in linear filter for None."""
        if name is None:
            return self.load(BUILTIN_FALLBACK, device)
        return self.get(name, device)

    def load(self, ec: EngineConfig, device: str) -> Engine:
        """The engine of a configuration; one that loads the same weights with the same options
        is shared (the built-in fallback and a default [engines.linear] are one engine)."""
        key = (ec.kind, ec.weights, ec.options, device)
        if key not in self._engines:
            self._engines[key] = load_engine(ec.kind, ec.weights, device, ec.options)
            log.info(
                "engine.loaded",
                engine=ec.name,
                kind=ec.kind,
                device=device,
                identity=self._engines[key].identity.short,
            )
        return self._engines[key]


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, is "no space left on device".
    pydicom re-raises write errors as a new OSError without errno (tag_in_exception), so the
    chain is followed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def run_job(
    job: EngineJob,
    engines: EngineCache,
    config: NodeConfig,
    device: str,
    *,
    on_written: Callable[[tuple[OutputFile, ...]], None] | None = None,
    read_ahead: ReadAhead | None = None,
) -> EngineResult | EngineFailure:
    """Standardize one series into `job.out_dir`. Never raises for a job's own problems.
    `read_ahead`: files of the series the engine process read while it was idle.

    The derived series is built and written in chunks of WRITE_CHUNK files; `on_written` hears
    each chunk but the last once it is durable (the last comes with the EngineResult), so the
    first chunks are exported while later ones are still built."""
    t0 = time.monotonic()
    out_dir = Path(job.out_dir)
    outputs: list[OutputFile] = []
    clipped = 0
    build_s = 0.0
    try:
        if not job.paths:
            raise ValueError("the series has no stored instances")
        policy = EnvelopePolicy(
            job.outside_envelope, lambda: engines.fallback(job.fallback_engine, device)
        )
        prepared = prepare_series(
            job.paths,
            engines.get(job.engine, device),
            derived_options(config),
            envelope=policy,
            read_ahead=read_ahead,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        builder = prepared.builder
        for start in range(0, builder.n_slices, WRITE_CHUNK):
            building = time.perf_counter()
            chunk, chunk_clipped = builder.build_range(start, start + WRITE_CHUNK)
            build_s += time.perf_counter() - building
            clipped += chunk_clipped
            written = _output_files(chunk, write_series(chunk, out_dir))
            outputs.extend(written)
            if on_written is not None and start + WRITE_CHUNK < builder.n_slices:
                on_written(written)
    except Exception as exc:
        if is_disk_full(exc):
            shutil.rmtree(out_dir, ignore_errors=True)
            return EngineFailure(
                FailureKind.DISK_FULL, f"disk full writing the output to {out_dir.parent}"
            )
        if isinstance(exc, OutsideEnvelopeError):
            return EngineFailure(FailureKind.INPUT, safe_error_text(exc), exc.check.as_log())
        if not isinstance(exc, ValueError | RuntimeError):
            log.error("job.engine_error", job=job.job_id, exc_info=True)
        return EngineFailure(FailureKind.INPUT, safe_error_text(exc))
    ran = prepared.identity
    summary: dict[str, Any] = {
        "slices_in": len(job.paths),
        "slices_out": len(outputs),
        "engine": ran.short,
        "kernel_in": ran.source_kernel,
        "kernel_out": ran.target_kernel,
        "clipped_pixels": int(clipped),
        "decode_ms": round(prepared.timings.decode_ms, 1),
        "read_ahead_files": read_ahead.taken if read_ahead is not None else 0,
        "engine_ms": round(prepared.timings.engine_ms, 1),
        "encode_ms": round(build_s * 1000.0, 1),
        "processing_ms": round((time.monotonic() - t0) * 1000, 1),
        "device": device,
        "notes": list(prepared.notes),
    }
    if prepared.envelope is not None:
        summary.update(prepared.envelope.as_log())
        summary["envelope_ms"] = round(prepared.timings.envelope_ms, 1)
    return EngineResult(tuple(outputs), prepared.series_instance_uid, summary)


def _output_files(datasets: Sequence[Dataset], paths: Sequence[Path]) -> tuple[OutputFile, ...]:
    return tuple(
        (str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(p), str(ds.file_meta.TransferSyntaxUID))
        for ds, p in zip(datasets, paths, strict=True)
    )


MEASUREMENT_LOG_KEYS = (
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "matrix",
    "source_kernel",
    "noise_hu",
)
"""The measurement fields of a job's summary (engine.envelope.SeriesMeasurement.as_log)."""
ENVELOPE_LOG_KEYS = ("envelope", "envelope_violations", *MEASUREMENT_LOG_KEYS)
"""What the canonical line (series.done / series.failed) reports of the envelope check."""


def outside_envelope_fields(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of the `engine.outside_envelope` warning from a job's envelope check (its
    summary, or EngineFailure.envelope); None when the series was not outside the envelope."""
    if envelope.get("envelope") not in OUTSIDE_STATUSES:
        return None
    fields: dict[str, Any] = {
        "action": envelope.get("envelope_action"),
        "outcome": envelope.get("envelope"),
        "engine": envelope.get("envelope_engine"),
        "violations": envelope.get("envelope_violations", []),
    }
    if envelope.get("envelope") != EnvelopeStatus.OUTSIDE_FAILED.value:
        fields["ran_engine"] = envelope.get("engine")
    if "fallback_violations" in envelope:
        fields["fallback_violations"] = envelope["fallback_violations"]
    fields.update({k: envelope[k] for k in MEASUREMENT_LOG_KEYS if k in envelope})
    return fields


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the fork server) exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prefer_as_oom_victim() -> None:
    """If the kernel must kill a process at the service's memory limit, let it be this one: the
    node notices and retries the job; killing the node would stop reception."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("500")


def _release_free_memory() -> None:
    """Hand the memory a finished job freed back to the system: glibc keeps freed heap memory
    in its arenas (the FFT and decode buffers of a 300-slice series: some 100-400 MB), which
    would count against the next job's `jobs.memory_max_mb`. Linux with glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _yield_cpu_to_reception(increment: int) -> None:
    """Lower this process's CPU priority by `increment` (jobs.engine_nice): when reception and an
    engine both want the cores, the kernel serves the associations first, and the engine still
    gets every cycle reception leaves idle."""
    if increment > 0:
        with contextlib.suppress(OSError):
            os.nice(increment)


def _child_main(conn: Connection, config: NodeConfig, device: str) -> None:
    """The engine process: load the engines, then run jobs until told to stop."""
    _die_with_parent()
    _prefer_as_oom_victim()
    _yield_cpu_to_reception(config.jobs.engine_nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the node, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    configure_process(config.log_format, config.log_level)
    engines = EngineCache(config)
    try:
        engines.preload(device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops start-up
        conn.send(("failed", safe_error_text(exc)))
        return
    if device == "cpu":
        share_cpus(sum(1 for d in config.workers if d == "cpu"))
    conn.send(("ready", os.getpid()))
    read_ahead = ReadAhead(config.jobs.read_ahead_bytes)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if isinstance(message, ReadAheadHint):
            _read_ahead(read_ahead, message, conn)
            continue
        job = message

        def progress(outputs: tuple[OutputFile, ...]) -> None:
            conn.send(EngineProgress(outputs))

        taken_from = read_ahead if read_ahead.series_key == job.series_uid else None
        conn.send(run_job(job, engines, config, device, on_written=progress, read_ahead=taken_from))
        read_ahead.clear()
        _release_free_memory()  # before the next job is read, after the answer went out


def _read_ahead(read_ahead: ReadAhead, hint: ReadAheadHint, conn: Connection) -> None:
    """Read the hinted files until done, or until the next message (a job) arrives."""
    if hint.paths is None:
        read_ahead.clear()
        return
    started = time.perf_counter()
    added = read_ahead.read(hint.series_uid, hint.paths, interrupted=conn.poll)
    if added:
        log.debug(
            "engine.read_ahead",
            series_uid=hint.series_uid,
            files=added,
            held=len(read_ahead),
            held_mb=read_ahead.bytes_held >> 20,
            seconds=round(time.perf_counter() - started, 3),
        )


# ---- the parent side -----------------------------------------------------------------------------

_context_lock = threading.Lock()


NUMPY_HUGEPAGE_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"
"""numpy asks the kernel for transparent huge pages for its large arrays (madvise) unless this
environment variable is "0" when numpy is imported."""


def engine_process_environment() -> None:
    """Set what the engine processes inherit, before the fork server that starts them does:
    numpy's large arrays on small pages (NUMPY_MADVISE_HUGEPAGE=0) unless the node's own
    environment sets the variable. Every job writes a fresh series volume (315 MB for 300
    slices); with huge pages its first touch took 0.08 s by the median but 0.6 s one time in
    ten and up to 1.7 s on the development machine, with small pages 0.17 s and at most 0.26 s
    (`benchmarks/bench_first_touch.py`): a little more by the median, never the long stall.
    It is set in this process's environment, so the node's other children (receiver processes)
    inherit it too; none of them holds large arrays."""
    os.environ.setdefault(NUMPY_HUGEPAGE_VARIABLE, "0")


def _context(config: NodeConfig) -> multiprocessing.context.ForkServerContext:
    """The fork-server context; the server preloads the engine modules, torch among them (the
    learned engines run in it and the linear filter does its FFTs with it). The preload list and
    the environment (`engine_process_environment`) are fixed when the server first starts."""
    engine_process_environment()
    ctx = multiprocessing.get_context("forkserver")
    with _context_lock:
        modules = ["dicom_node.engine_host", "torch"]
        if any(e.kind != LINEAR_FILTER_KIND for e in config.engines):
            modules += ["engine.ltdiff.engine"]
        ctx.set_forkserver_preload(modules)
    return ctx


def resident_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux /proc), None when it is gone."""
    try:
        with Path(f"/proc/{pid}/status").open() as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return 0


class EngineProcess:
    """One worker's engine process: started on demand, watched while it runs a job."""

    def __init__(
        self,
        config: NodeConfig,
        device: str,
        name: str,
        last_instance_at: LastInstanceAt | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.name = name
        # When the node last received an instance: a running job pauses while reception is
        # active (dicom_node/reception_first.py); None: never pauses.
        self.last_instance_at = last_instance_at
        self._proc: Any = None  # multiprocessing.Process of the fork-server context
        self._conn: Connection | None = None
        self._stopped = False  # the engine process is paused (SIGSTOP) for reception
        self.peak_rss = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def start(self, stop: threading.Event | None = None, timeout_s: float = 600.0) -> None:
        """Start the child and wait until its engines are loaded. Raises EngineError when they
        cannot be loaded (bad weights) or the child does not come up."""
        self.close()
        ctx = _context(self.config)
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=_child_main,
            args=(child_conn, self.config, self.device),
            name=f"ltdiff-engine-{self.name}",
            daemon=True,
        )
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, parent_conn
        deadline = time.monotonic() + timeout_s
        while not parent_conn.poll(_POLL_S):
            if not proc.is_alive():
                self.close()
                raise EngineError(f"the engine process exited at start (exit code {proc.exitcode})")
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                self.close()
                raise EngineError("the engine process did not load its engines in time")
        try:
            kind, detail = parent_conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise EngineError(f"the engine process exited at start ({exc})") from exc
        if kind != "ready":
            self.close()
            raise EngineError(str(detail))
        log.info("engine_process.started", worker=self.name, pid=proc.pid, device=self.device)

    def run(
        self,
        job: EngineJob,
        stop: threading.Event,
        on_written: Callable[[tuple[OutputFile, ...]], None] | None = None,
    ) -> EngineOutcome:
        """Run one job in the child; start the child first if needed (EngineError if it
        cannot start). `on_written` hears the chunks of output the child reports as written
        before its result."""
        if self._proc is None or not self._proc.is_alive():
            self.start(stop)
        proc, conn = self._proc, self._conn
        if conn is None:
            raise EngineError("the engine process has no connection")
        limit = self.config.jobs.memory_max_mb << 20
        started = time.monotonic()
        self.peak_rss = 0
        pause = ReceptionPause(self.config.jobs.reception_first_s)
        try:
            conn.send(job)
        except OSError:
            return self._crashed(f"the engine process is gone (exit code {proc.exitcode})")
        try:
            outcome = self._watch(
                job,
                proc=proc,
                conn=conn,
                stop=stop,
                on_written=on_written,
                started=started,
                limit=limit,
                pause=pause,
            )
        finally:
            self._continue()  # a result can come in just before a pause
        if isinstance(outcome, EngineResult) and pause.pauses:
            # processing_ms (wall time in the engine process) includes these pauses
            outcome.summary["paused_for_reception_s"] = round(pause.paused_s(time.monotonic()), 3)
        return outcome

    def _watch(
        self,
        job: EngineJob,
        *,
        proc: Any,
        conn: Connection,
        stop: threading.Event,
        on_written: Callable[[tuple[OutputFile, ...]], None] | None,
        started: float,
        limit: int,
        pause: ReceptionPause,
    ) -> EngineOutcome:
        while True:
            self._pause_for_reception(pause, job, conn)
            try:
                if self._stopped:
                    # Never read from a stopped engine process: a message it was writing may
                    # be incomplete, and recv() would wait for the rest, which cannot come
                    # until this thread continues the process.
                    stop.wait(_POLL_S)
                elif conn.poll(_POLL_S):
                    message: EngineResult | EngineFailure | EngineProgress = conn.recv()
                    if not isinstance(message, EngineProgress):
                        return message
                    if on_written is not None:
                        on_written(message.outputs)
                    continue
            except (EOFError, OSError):
                proc.join(_STOP_GRACE_S)
                return self._crashed(_exit_reason(proc.exitcode))
            if not proc.is_alive():
                return self._crashed(_exit_reason(proc.exitcode))
            rss = resident_bytes(proc.pid) or 0
            self.peak_rss = max(self.peak_rss, rss)
            if limit and rss > limit:
                self._kill()
                return self._crashed(
                    f"engine process killed: resident memory {rss >> 20} MB above "
                    f"jobs.memory_max_mb = {limit >> 20}"
                )
            now = time.monotonic()
            # The time paused for reception does not count against jobs.timeout_s.
            if now - started - pause.paused_s(now) > self.config.jobs.timeout_s:
                self._kill()
                return self._crashed(
                    f"engine process killed: the job ran longer than jobs.timeout_s = "
                    f"{self.config.jobs.timeout_s:g} s"
                )
            if stop.is_set():
                self._kill()
                self._forget()
                return EngineInterrupted()

    def _pause_for_reception(self, pause: ReceptionPause, job: EngineJob, conn: Connection) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) the engine process as `pause` says; never stop
        it while a message from it waits to be read (it may be the result, or half of it)."""
        if self.last_instance_at is None or pause.budget_s <= 0:
            return
        if not self._stopped and conn.poll(0):
            return
        action = pause.update(time.monotonic(), self.last_instance_at())
        if action is PauseAction.PAUSE:
            self._signal(signal.SIGSTOP)
            self._stopped = True
            log.debug("engine_process.paused_for_reception", worker=self.name, job=job.job_id)
        elif action is PauseAction.RESUME:
            self._continue()

    def _signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signum)

    def _continue(self) -> None:
        """Continue a paused engine process (before it is told to stop, killed or asked)."""
        if self._stopped and self._proc is not None:
            self._signal(signal.SIGCONT)
        self._stopped = False

    def hint_read_ahead(self, hint: ReadAheadHint) -> bool:
        """Between jobs: pass the engine process files to read ahead (no answer comes back).
        False when there is no running engine process to take it."""
        proc, conn = self._proc, self._conn
        if proc is None or conn is None or not proc.is_alive():
            return False
        try:
            conn.send(hint)
        except OSError:
            return False
        return True

    def _crashed(self, reason: str) -> EngineCrash:
        self._kill()
        self._forget()
        return EngineCrash(reason)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or not proc.is_alive():
            return
        self._continue()
        proc.terminate()
        proc.join(_STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join(_STOP_GRACE_S)

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        """Stop the child: ask it to exit, then terminate it if it does not."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        self._continue()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
        proc.join(1.0)
        self._kill()
        self._forget()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"engine process died: {name}{hint}"
    return f"engine process died: exit code {exitcode}"
