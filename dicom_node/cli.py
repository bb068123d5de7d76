"""`ltdiff-node` command line: serve, check-config, echo, status, retry, standardize, phantom,
train, demo. Every command is a function returning an exit code, so tests call them in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node import __version__
from dicom_node.config import (
    ConfigError,
    DestinationConfig,
    NodeConfig,
    RouteRule,
    check_runtime,
    load_config,
    validate_ae_title,
)
from dicom_node.logs import configure_logging, configure_process, get_logger
from engine.envelope_policy import OutsideEnvelope
from engine.interface import EngineError

log = get_logger("dicom_node.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # as argparse exits for a command line it cannot use
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE from sysexits.h: a package the command needs is missing
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: systemd shows it as a configuration error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="site configuration file (TOML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration value (repeatable), e.g. --set listener.port=11113",
    )


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config, args.overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import Node

    config = _config(args)
    configure_process(config.log_format, config.log_level)
    for warning in check_runtime(config):
        log.warning("config.warning", message=warning)
    Node(config).run_forever()
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicom_node.export import echo
    from engine.envelope import engine_envelope
    from engine.registry import load_engine

    config = _config(args)
    warnings = check_runtime(config)
    for eng in config.engines:
        engine = load_engine(eng.kind, eng.weights, eng.device, eng.options)
        envelope = engine_envelope(engine)
        print(
            f"engine {eng.name!r}: {engine.identity.short}; "
            + (
                f"validated envelope: {envelope.describe()}"
                if envelope is not None
                else "no validated envelope"
            ),
            file=sys.stderr,
        )
    for route in config.routes:
        print(f"route {route.name!r}: {_envelope_policy_text(route, config)}", file=sys.stderr)
    print(_metrics_text(config), file=sys.stderr)
    print(json.dumps(config.as_dict(), indent=2))
    for dest in config.destinations:
        ok, what = echo(dest, config.listener.ae_title)
        if not ok:
            warnings.append(
                f"destination {dest.name!r} ({dest.host}:{dest.port}) not reachable: {what}"
            )
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("configuration is valid", file=sys.stderr)
    return EXIT_OK


def _metrics_text(config: NodeConfig) -> str:
    """Where the node serves its metrics and health probes ([metrics])."""
    m = config.metrics
    if not m.enabled:
        return "metrics: disabled (metrics.enabled = false)"
    host = f"[{m.bind_address}]" if ":" in m.bind_address else m.bind_address
    return f"metrics: http://{host}:{m.port}/metrics, /healthz and /readyz"


def _envelope_policy_text(route: RouteRule, config: NodeConfig) -> str:
    """What a route does with a series outside its engine's validated envelope."""
    action = route.outside_envelope
    if action is OutsideEnvelope.FALLBACK:
        fallback = config.fallback_engine(route).name
        return f"engine {route.engine!r}; outside its validated envelope: fallback to {fallback!r}"
    if action is OutsideEnvelope.FAIL:
        return f"engine {route.engine!r}; outside its validated envelope: the job fails"
    return f"engine {route.engine!r}; outside its validated envelope: processed with a warning"


def _parse_destination(spec: str, config: NodeConfig) -> DestinationConfig:
    for d in config.destinations:
        if d.name == spec:
            return d
    if "@" in spec and ":" in spec:
        aet, hostport = spec.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return DestinationConfig(
            name="cli", ae_title=validate_ae_title(aet, "DEST"), host=host, port=int(port)
        )
    names = [d.name for d in config.destinations]
    raise ConfigError(f"DEST {spec!r}: not a configured destination {names} nor AET@host:port")


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.export import echo

    config = _config(args)
    dest = _parse_destination(args.destination, config)
    ok, what = echo(dest, config.listener.ae_title)
    print(f"{dest.ae_title}@{dest.host}:{dest.port}: {what}")
    return EXIT_OK if ok else EXIT_FAILURE


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.store import JobStore

    config = _config(args)
    if not config.database_path.exists():
        print(f"no database at {config.database_path}: the node has not run with this state_dir")
        return EXIT_FAILURE
    store = JobStore(config.database_path)
    try:
        report = store.status_report(limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"series:  {_counts(report['series'])}")
    print(f"jobs:    {_counts(report['jobs'])}")
    print(f"exports: {_counts(report['exports'])}")
    if report["retrying"]:
        print("retrying:")
        for r in report["retrying"]:
            print(
                f"  job {r['job_id']} -> {r['destination']}: {r['instances']} instance(s), "
                f"attempt {r['attempts']}, next at {_fmt_time(r['next_attempt'])}: "
                f"{r['last_error']}"
            )
    if report["waiting"]:
        print("waiting (retried by the node itself):")
        for w in report["waiting"]:
            print(f"  job {w['job_id']}: {w['reason']}; next try {_fmt_time(w['next_attempt'])}")
    minimum = config.listener.min_free_disk_mb
    try:
        free_mb = shutil.disk_usage(config.state_dir).free >> 20
        low = f": BELOW the minimum {minimum} MB, reception refuses (0xA700) and no job starts"
        print(
            f"disk:    {free_mb} MB free{low if free_mb < minimum else f' (minimum {minimum} MB)'}"
        )
    except OSError as exc:
        print(f"disk:    cannot read free space of {config.state_dir} ({exc.strerror})")
    if report["dead_letters"]:
        print("dead letters (ltdiff-node retry JOB):")
        for r in report["dead_letters"]:
            print(
                f"  job {r['job_id']} -> {r['destination']}: {r['instances']} instance(s): "
                f"{r['last_error']}"
            )
    print("recent jobs:")
    for j in report["recent_jobs"]:
        print(
            f"  #{j['id']:<5} {j['kind']:<11} {j['state']:<10} rule={j['rule'] or '-'} "
            f"in={j['n_instances']} out={j['n_out'] if j['n_out'] is not None else '-'} "
            f"series={j['series_uid']} created={_fmt_time(j['created_at'])}"
            + (f" engine-crashes={j['crashes']}" if j.get("crashes") else "")
            + (f" error={j['error']}" if j["error"] else "")
        )
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.store import JobStore

    config = _config(args)
    store = JobStore(config.database_path)
    try:
        print(store.retry_job(args.job))
    except KeyError:
        print(f"no job {args.job}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    return EXIT_OK


def cmd_standardize(args: argparse.Namespace) -> int:
    """Standardize the series of IN_DIR that the node's routes select (all CT series with
    --all); the decisions are dicom_node/offline.py, running them dicom_node/offline_runner.py."""
    from tqdm import tqdm

    from dicom_node.cluster import ClusterUnavailableError, install_hint, missing_package
    from dicom_node.offline import (
        JobOutcome,
        JobStatus,
        Overrides,
        PlannedJob,
        outcome_line,
        plan_jobs,
        scan_folder,
        total_line,
        worker_devices,
    )
    from dicom_node.offline_runner import run_plan

    on_cluster = args.scheduler is not None or args.local_cluster is not None
    if on_cluster:
        if sum(len(ds) for ds in args.device) > 1:
            print(
                "--device: one device with --scheduler or --local-cluster (a series on a GPU "
                "runs on the GPU its worker was given)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        missing = missing_package()
        if missing is not None:
            print(install_hint(missing, sys.executable), file=sys.stderr)
            return EXIT_UNAVAILABLE
    config = _config(args)
    # The lines per series are the report; the engines' info events would interleave with them.
    log_level = "debug" if config.log_level == "debug" else "warning"
    log_format = "console" if sys.stdout.isatty() else config.log_format
    configure_logging(log_format, log_level)
    if not args.input.is_dir():
        print(f"{args.input}: not a folder", file=sys.stderr)
        return EXIT_FAILURE
    started = time.monotonic()
    try:
        scan = scan_folder(args.input, exclude=args.output)
    except KeyboardInterrupt:
        print("interrupted while reading the headers; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    plan = plan_jobs(
        scan.series,
        config,
        Overrides(
            all_series=args.all,
            engine=args.engine,
            outside_envelope=(
                OutsideEnvelope(args.outside_envelope) if args.outside_envelope else None
            ),
            fallback_engine=args.fallback_engine,
        ),
    )
    if scan.ignored:
        print(scan.ignored_note())
    if not scan.series:
        print(f"no CT series found in {args.input}", file=sys.stderr)
        return EXIT_FAILURE
    for skipped in plan.skipped:
        print(skipped.line())
    wanted = [d for ds in args.device for d in ds]
    devices = wanted if on_cluster else worker_devices(wanted, args.jobs, len(plan.jobs))
    bar = tqdm(
        total=len(plan.jobs),
        unit="series",
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )

    finished: list[JobOutcome] = []

    def report(job: PlannedJob, outcome: JobOutcome) -> None:
        finished.append(outcome)
        bar.write(outcome_line(job, outcome), file=sys.stdout)
        bar.update(1)

    workers = len(devices)
    try:
        if on_cluster:
            from dicom_node.cluster_runner import ClusterTarget, run_plan_on_cluster

            device = wanted[0] if wanted else None
            target = ClusterTarget(args.scheduler, args.local_cluster or 0, device)
            workers = run_plan_on_cluster(
                plan.jobs,
                config,
                args.output,
                target,
                report,
                log_format=log_format,
                log_level=log_level,
            ).workers
        else:
            run_plan(
                plan.jobs,
                config,
                args.output,
                devices,
                report,
                log_format=log_format,
                log_level=log_level,
            )
    except KeyboardInterrupt:
        bar.close()
        print(
            f"interrupted: {len(finished)} of {len(plan.jobs)} series finished; unfinished "
            "output removed",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except ClusterUnavailableError as exc:
        print(f"{exc}; {len(finished)} of {len(plan.jobs)} series finished", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        bar.close()
    print(total_line(plan, finished, time.monotonic() - started, workers))
    return EXIT_FAILURE if any(o.status is JobStatus.FAILED for o in finished) else EXIT_OK


def _devices(value: str) -> tuple[str, ...]:
    from dicom_node.offline import parse_devices

    try:
        return parse_devices([value])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def _forward(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    return int(mod.main(argv))


def _forward_evaluate(argv: list[str]) -> int:
    """`evaluate` needs the `evaluate` extra: without it, say how to install it (no traceback)."""
    from evaluation.extra import install_hint, missing_packages

    missing = missing_packages()
    if missing:
        print(install_hint(missing, sys.executable), file=sys.stderr)
        return EXIT_UNAVAILABLE
    return _forward("evaluation.evaluate", argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltdiff-node",
        description="DICOM node that standardizes CT reconstruction kernels (Br40 -> Bl64-like).",
    )
    parser.add_argument("--version", action="version", version=f"ltdiff-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node (C-STORE SCP, engine workers, export)")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate and print the effective configuration")
    _add_config_args(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("echo", help="C-ECHO a destination (configured name or AET@host:port)")
    _add_config_args(p)
    p.add_argument("destination", metavar="DEST")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("status", help="jobs, retries and dead letters")
    _add_config_args(p)
    p.add_argument("--limit", type=int, default=20, help="recent jobs to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="retry a failed job or its dead-letter exports")
    _add_config_args(p)
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "standardize",
        help="offline: standardize the series of IN_DIR that the routes select into OUT_DIR",
        description="Standardize the CT series found in IN_DIR (files of several series may be "
        "mixed, in nested folders) as the node would: each series is routed by the configured "
        "[[routes]] (first match wins, exclusions, our own output never again); the route "
        "decides the engine and its policy outside the validated envelope. A series that "
        "matches no route is skipped with the reason (--all standardizes it anyway). Each "
        "derived series is written to OUT_DIR/<derived Series Instance UID>/.",
    )
    _add_config_args(p)
    p.add_argument("input", type=Path, metavar="IN_DIR")
    p.add_argument("output", type=Path, metavar="OUT_DIR")
    p.add_argument(
        "--all",
        action="store_true",
        help="also standardize the CT series that match no route (with --engine or the first "
        "engine); the node's own output is still skipped",
    )
    p.add_argument(
        "--engine",
        metavar="NAME",
        help="engine name from the configuration for every series (default: the route's; the "
        "first engine for series taken by --all)",
    )
    p.add_argument(
        "--device",
        type=_devices,
        action="append",
        default=[],
        metavar="DEV[,DEV...]",
        help="device(s) to run on (cpu, cuda, cuda:N; repeatable or a comma list): workers are "
        "dealt over them round-robin (default: each engine's configured device)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "-j",
        "--jobs",
        type=_positive,
        metavar="N",
        help="series run in parallel, each worker a process that loads its engines once "
        "(default: one per --device, else 1); the output is the same as with 1",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run each series as a task on the Dask distributed cluster whose scheduler is at "
        "ADDRESS (tcp://host:8786); IN_DIR, OUT_DIR and the engine weights must be at the same "
        "paths on every worker; the output is the same as a local run's (the 'cluster' extra; "
        "docs/CLUSTER.md)",
    )
    where.add_argument(
        "--local-cluster",
        type=_positive,
        metavar="N",
        help="start a Dask cluster of N worker processes on this machine and run each series as "
        "a task on it (the 'cluster' extra)",
    )
    p.add_argument(
        "--outside-envelope",
        choices=[a.value for a in OutsideEnvelope],
        help="a series outside the engine's validated envelope: run the fallback engine, fail "
        "it, or process it anyway with a warning (default: the route's outside_envelope; "
        "fallback for series taken by --all)",
    )
    p.add_argument(
        "--fallback-engine",
        metavar="NAME",
        help="engine name from the configuration to fall back to (default: the route's "
        "fallback_engine, else the built-in linear filter)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (there is none either when stderr is not a terminal)",
    )
    p.set_defaults(func=cmd_standardize)

    sub.add_parser(
        "phantom", help="write a synthetic phantom CT series (no patient data)", add_help=False
    )
    sub.add_parser(
        "train", help="fit engine weights from paired series (train linear ...)", add_help=False
    )
    sub.add_parser(
        "demo", help="end-to-end demo: node + archive + phantom series + PNG", add_help=False
    )
    sub.add_parser(
        "evaluate", help="radiomic feature agreement of engines on paired series", add_help=False
    )
    sub.add_parser(
        "bars", help="check an evaluated engine against the acceptance bars", add_help=False
    )
    return parser


_FORWARDED = {
    "phantom": "dicom_node.phantom",
    "demo": "dicom_node.demo",
    "bars": "evaluation.bars",
}
_TRAIN = {"linear": "training.fit_linear", "ltdiff": "training.train_ltdiff"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _FORWARDED:
        return _forward(_FORWARDED[argv[0]], argv[1:])
    if argv and argv[0] == "evaluate":
        return _forward_evaluate(argv[1:])
    if argv and argv[0] == "train":
        if len(argv) < 2 or argv[1] not in _TRAIN:
            print(f"usage: ltdiff-node train {{{','.join(_TRAIN)}}} ...", file=sys.stderr)
            return 2
        return _forward(_TRAIN[argv[1]], argv[2:])
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EngineError as exc:
        print(f"configuration error: engine cannot be loaded: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
