"""`ltdiff-node standardize IN_DIR OUT_DIR`: which series of a folder to standardize, and how.

The offline command follows the node's rules, in pure code testable without files or processes:

- `group_series`: the files of a folder (several series mixed, nested folders) grouped by Series
  Instance UID from their headers; files that are not CT images (not DICOM, no Series Instance
  UID, another modality, a non-image SOP class such as a dose report or a DICOMDIR) are counted
  by reason and left out;
- `plan_jobs`: each series routed by the node's own `dicom_node.routing.decide` (first match
  wins, exclusions, the loop guard); the matched route decides the engine and its policy outside
  the validated envelope (`outside_envelope`, `fallback_engine`), which `--engine`,
  `--outside-envelope` and `--fallback-engine` override; a series that matches no route is
  skipped with the reason, rule by rule, unless `--all` (then the route-less series run on
  `--engine` or the first engine). The loop guard holds even with `--all`;
- `worker_devices`: the device of each worker process (devices round-robin);
- the lines printed per series and the total.

Running the plan (engines, worker processes, Ctrl-C) is `dicom_node.offline_runner`. Lines are
for the operator's terminal: they show kernel names and series descriptions, never patient
names or identifiers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.config import BUILTIN_FALLBACK, ConfigError, EngineConfig, NodeConfig
from dicom_node.routing import RouteDecision, decide
from dicom_node.scp import routing_header
from engine.derived import is_ltdiff_output
from engine.dicom_facts import CT_SOP_CLASSES
from engine.envelope_policy import EnvelopeCheck, EnvelopeStatus, OutsideEnvelope

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
"""A device as `node.workers` spells it."""
NOT_DICOM = "not DICOM"


# ---- grouping ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one series found in the input folder.

    header: the routing attributes of its first file (as the node records the first instance).
    own_output: some file of it was made by ltdiff-node (the loop guard).
    number / description: Series Number and Series Description, for the printed lines ("" when
        absent).
    """

    series_uid: str
    paths: tuple[Path, ...]
    header: Mapping[str, str]
    own_output: bool
    number: str = ""
    description: str = ""

    @property
    def kernel(self) -> str:
        return self.header.get("ConvolutionKernel", "")

    def label(self) -> str:
        """'series 3 "Thorax 1.0 Br40d" (Br40d, 24 files)'."""
        text = f"series {self.number or '-'}"
        if self.description:
            text += f' "{self.description}"'
        kernel = f"{self.kernel}, " if self.kernel else ""
        return f"{text} ({kernel}{len(self.paths)} file{'s' if len(self.paths) != 1 else ''})"


@dataclass(frozen=True)
class FolderScan:
    """Series found, in a stable order (Series Number, then UID), and files left out by reason."""

    series: tuple[SeriesFiles, ...]
    ignored: Mapping[str, int] = field(default_factory=dict)

    def ignored_note(self) -> str:
        """One line counting the files left out ('' when none)."""
        total = sum(self.ignored.values())
        if not total:
            return ""
        parts = ", ".join(f"{why}: {n}" for why, n in sorted(self.ignored.items()))
        what = "file that is not a CT image" if total == 1 else "files that are not CT images"
        return f"ignored {total} {what} ({parts})"


def ignore_reason(ds: Dataset) -> str | None:
    """Why a file's header is not part of a CT series to standardize; None when it is."""
    if not ds.get("SeriesInstanceUID"):
        return "no Series Instance UID"
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        return f"Modality {modality or '(absent)'}"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in CT_SOP_CLASSES:
        return f"SOP class {UID(sop_class).name if sop_class else '(absent)'}"
    return None


def _series_order(s: SeriesFiles) -> tuple[int, str]:
    number = int(s.number) if s.number.lstrip("-").isdigit() else 1 << 31
    return number, s.series_uid


def group_series(headers: Iterable[tuple[Path, Dataset | None]]) -> FolderScan:
    """Group (path, header) pairs by Series Instance UID; a None header is a file that could not
    be read as DICOM. Paths are sorted within each series."""
    paths: dict[str, list[Path]] = defaultdict(list)
    first: dict[str, Dataset] = {}
    own: dict[str, bool] = defaultdict(bool)
    ignored: Counter[str] = Counter()
    for path, ds in sorted(headers, key=lambda pair: pair[0]):
        why = NOT_DICOM if ds is None else ignore_reason(ds)
        if ds is None or why is not None:
            ignored[why or NOT_DICOM] += 1
            continue
        uid = str(ds.SeriesInstanceUID)
        paths[uid].append(path)
        first.setdefault(uid, ds)
        own[uid] = own[uid] or is_ltdiff_output(ds)
    series = [
        SeriesFiles(
            series_uid=uid,
            paths=tuple(paths[uid]),
            header=routing_header(ds),
            own_output=own[uid],
            number=str(ds.get("SeriesNumber", "") or ""),
            description=str(ds.get("SeriesDescription", "") or "").strip(),
        )
        for uid, ds in first.items()
    ]
    return FolderScan(tuple(sorted(series, key=_series_order)), dict(ignored))


def read_headers(root: Path, exclude: Path | None = None) -> Iterator[tuple[Path, Dataset | None]]:
    """(path, header without pixel data) for every file under `root` (None: not readable as
    DICOM), skipping the folder `exclude` (the output folder when it lies inside the input)."""
    skip = exclude.resolve() if exclude is not None else None
    for path in sorted(root.rglob("*")):
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if not path.is_file():
            continue
        try:
            yield path, pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError):
            yield path, None


def scan_folder(root: Path, exclude: Path | None = None) -> FolderScan:
    """The series under `root` (I/O: reads every file's header)."""
    return group_series(read_headers(root, exclude))


# ---- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overrides:
    """What the command line changes of the configured rules.

    all_series: also standardize series that match no route (`--all`; not the loop guard).
    engine: `--engine NAME` for every series (None: the route's; for route-less series under
        `--all`, the first engine).
    outside_envelope / fallback_engine: `--outside-envelope`, `--fallback-engine` for every
        series (None: the route's; route-less series fall back to the built-in linear filter).
    """

    all_series: bool = False
    engine: str | None = None
    outside_envelope: OutsideEnvelope | None = None
    fallback_engine: str | None = None


@dataclass(frozen=True)
class PlannedJob:
    """One series to standardize: which route chose it (None: `--all`), which engine runs, its
    action outside the engine's validated envelope and the fallback engine."""

    index: int
    series: SeriesFiles
    route: str | None
    engine: EngineConfig
    outside_envelope: OutsideEnvelope
    fallback: EngineConfig


@dataclass(frozen=True)
class SkippedSeries:
    series: SeriesFiles
    reason: str

    def line(self) -> str:
        return f"{self.series.label()}: skipped: {self.reason}"


@dataclass(frozen=True)
class Plan:
    jobs: tuple[PlannedJob, ...]
    skipped: tuple[SkippedSeries, ...]


def skip_reason(decision: RouteDecision, n_routes: int) -> str:
    """Why a series is not standardized, for the operator: the loop guard, or every route's
    first failed condition ("no route matches: rule 'br40-to-bl64': ConvolutionKernel 'Bl64d'
    does not match ^Br40")."""
    if not decision.misses:
        if decision.reason.startswith("loop guard"):
            return f"{decision.reason}; it is never standardized again"
        return "no route matches: no routes are configured" if not n_routes else decision.reason
    by_rule: dict[str, list[str]] = defaultdict(list)
    for miss in decision.misses:
        by_rule[miss.rule].append(miss.describe())
    return "no route matches: " + "; ".join(
        f"rule {rule!r}: {', '.join(why)}" for rule, why in by_rule.items()
    )


def _engine(config: NodeConfig, name: str, option: str) -> EngineConfig:
    try:
        return config.engine(name)
    except KeyError:
        names = [e.name for e in config.engines]
        raise ConfigError(f"{option} {name!r}: no such engine; configured: {names}") from None


def plan_jobs(
    series: Sequence[SeriesFiles], config: NodeConfig, overrides: Overrides = Overrides()
) -> Plan:
    """Route every series as the node would (module docstring). Raises ConfigError for an
    engine name the configuration does not have."""
    forced_engine = (
        _engine(config, overrides.engine, "--engine") if overrides.engine is not None else None
    )
    forced_fallback = (
        _engine(config, overrides.fallback_engine, "--fallback-engine")
        if overrides.fallback_engine is not None
        else None
    )
    jobs: list[PlannedJob] = []
    skipped: list[SkippedSeries] = []
    for s in series:
        decision = decide(s.header, config.routes, own_output=s.own_output)
        route = decision.rule
        if route is None and (s.own_output or not overrides.all_series):
            skipped.append(SkippedSeries(s, skip_reason(decision, len(config.routes))))
            continue
        if route is not None:
            engine = forced_engine or _engine(config, route.engine, f"route {route.name!r} engine")
            action = overrides.outside_envelope or route.outside_envelope
            fallback = forced_fallback or config.fallback_engine(route)
        else:
            engine = forced_engine or config.engines[0]
            action = overrides.outside_envelope or OutsideEnvelope.FALLBACK
            fallback = forced_fallback or BUILTIN_FALLBACK
        if forced_fallback is not None and forced_fallback.name == engine.name:
            raise ConfigError(
                f"--fallback-engine {forced_fallback.name!r}: is the engine itself"
                + (f" (route {route.name!r})" if route is not None else "")
            )
        jobs.append(
            PlannedJob(
                index=len(jobs) + 1,
                series=s,
                route=route.name if route is not None else None,
                engine=engine,
                outside_envelope=action,
                fallback=fallback,
            )
        )
    return Plan(tuple(jobs), tuple(skipped))


def parse_devices(values: Iterable[str]) -> tuple[str, ...]:
    """`--device` values (repeatable, each a comma list) as one tuple, checked like
    `node.workers`. Raises ValueError naming a bad entry."""
    devices: list[str] = []
    for value in values:
        for item in value.split(","):
            device = item.strip()
            if not DEVICE_PATTERN.fullmatch(device):
                raise ValueError(f"{device!r} is not 'cpu', 'cuda' or 'cuda:N'")
            devices.append(device)
    return tuple(devices)


def worker_devices(
    devices: Sequence[str], jobs: int | None, n_series: int
) -> tuple[str | None, ...]:
    """The device of each worker: `jobs` workers (default: one per device, else one), the
    devices dealt round-robin, no more workers than series (at least one). None: each engine
    on its configured device."""
    wanted = jobs if jobs is not None else max(1, len(devices))
    count = max(1, min(wanted, n_series))
    if not devices:
        return (None,) * count
    return tuple(devices[i % len(devices)] for i in range(count))


# ---- outcomes and lines --------------------------------------------------------------------------


class JobStatus(StrEnum):
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class JobOutcome:
    """What running a PlannedJob gave (made by dicom_node.offline_runner; picklable).

    engine: the short identity of the engine that ran (the fallback when it ran).
    envelope: the envelope check (None: not reached). engine_unavailable: the job's engine
    could not be loaded (a configuration error: the run stops).
    """

    index: int
    status: JobStatus
    seconds: float
    device: str
    out_dir: Path | None = None
    n_slices: int = 0
    engine: str = ""
    envelope: EnvelopeCheck | None = None
    error: str = ""
    engine_unavailable: bool = False


def envelope_text(check: EnvelopeCheck | None) -> str:
    """What the envelope check decided, in words."""
    if check is None:
        return "envelope not checked"
    if check.status is EnvelopeStatus.FALLBACK:
        return (
            f"outside the validated envelope of {check.checked.short}: "
            f"{'; '.join(check.violations)}; fallback engine ran"
        )
    if check.status is EnvelopeStatus.OUTSIDE_PROCESSED:
        return "WARNING: processed outside the validated envelope: " + "; ".join(check.violations)
    return f"envelope {check.status.value}"


def outcome_line(job: PlannedJob, outcome: JobOutcome) -> str:
    """The one line printed for a series that ran (or failed)."""
    head = job.series.label()
    if outcome.status is JobStatus.FAILED:
        return f"{head}: FAILED: {outcome.error}"
    route = f"route {job.route}" if job.route is not None else "--all, no route"
    return (
        f"{head}: {outcome.n_slices} slices by {outcome.engine} on {outcome.device} "
        f"({route}; {envelope_text(outcome.envelope)}) -> {outcome.out_dir} "
        f"in {outcome.seconds:.1f} s"
    )


def total_line(plan: Plan, outcomes: Sequence[JobOutcome], seconds: float, workers: int) -> str:
    done = [o for o in outcomes if o.status is JobStatus.DONE]
    failed = len(outcomes) - len(done)
    n = len(plan.jobs) + len(plan.skipped)
    unfinished = len(plan.jobs) - len(outcomes)
    return (
        f"total: {n} series: {len(done)} standardized, {len(plan.skipped)} skipped, "
        f"{failed} failed"
        + (f", {unfinished} not run" if unfinished else "")
        + f"; {sum(o.n_slices for o in done)} slices written in {seconds:.1f} s"
        + f" ({workers} worker{'s' if workers != 1 else ''})"
    )
