"""`ltdiff-node` command line: serve, check-config, echo, status, retry, standardize, phantom,
train, demo. Every command is a function returning an exit code, so tests call them in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dicom_node import __version__
from dicom_node.config import (
    BUILTIN_FALLBACK,
    ConfigError,
    DestinationConfig,
    EngineConfig,
    NodeConfig,
    RouteRule,
    check_runtime,
    load_config,
    validate_ae_title,
)
from dicom_node.logs import configure_logging, configure_process, get_logger, safe_error_text
from engine.envelope_policy import OutsideEnvelope, OutsideEnvelopeError
from engine.interface import EngineError

log = get_logger("dicom_node.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: systemd shows it as a configuration error


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


def _engine_config(config: NodeConfig, name: str | None, option: str) -> EngineConfig:
    """The [engines.NAME] table `name` (the first engine when None)."""
    if name is None:
        return config.engines[0]
    try:
        return config.engine(name)
    except KeyError:
        names = [e.name for e in config.engines]
        raise ConfigError(f"{option} {name!r}: no such engine; configured: {names}") from None


def cmd_standardize(args: argparse.Namespace) -> int:
    import pydicom

    from dicom_node.engine_host import derived_options
    from engine.envelope_policy import EnvelopePolicy, EnvelopeStatus
    from engine.interface import Engine
    from engine.pipeline import standardize_series, write_series
    from engine.registry import load_engine

    config = _config(args)
    configure_logging("console" if sys.stdout.isatty() else config.log_format, config.log_level)
    device = args.device
    eng_cfg = _engine_config(config, args.engine, "--engine")
    engine = load_engine(eng_cfg.kind, eng_cfg.weights, device or eng_cfg.device, eng_cfg.options)
    fallback_cfg = (
        _engine_config(config, args.fallback_engine, "--fallback-engine")
        if args.fallback_engine
        else BUILTIN_FALLBACK
    )
    if args.fallback_engine and fallback_cfg.name == eng_cfg.name:
        raise ConfigError(f"--fallback-engine {args.fallback_engine!r}: is the engine itself")
    loaded: list[Engine] = []

    def fallback() -> Engine:
        if not loaded:
            ec = fallback_cfg
            loaded.append(load_engine(ec.kind, ec.weights, device or ec.device, ec.options))
        return loaded[0]

    policy = EnvelopePolicy(OutsideEnvelope(args.outside_envelope), fallback)
    by_series: dict[str, list[Path]] = defaultdict(list)
    skipped = 0
    for p in sorted(x for x in args.input.rglob("*") if x.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            by_series[str(ds.SeriesInstanceUID)].append(p)
        except (pydicom.errors.InvalidDicomError, AttributeError, OSError):
            skipped += 1
    if not by_series:
        print(f"no DICOM series found in {args.input}", file=sys.stderr)
        return EXIT_FAILURE
    failures = 0
    for series_uid, paths in by_series.items():
        t0 = time.monotonic()
        try:
            result = standardize_series(paths, engine, derived_options(config), envelope=policy)
        except OutsideEnvelopeError as exc:
            failures += 1
            print(f"series {series_uid}: FAILED: {exc}", file=sys.stderr)
            continue
        except (ValueError, RuntimeError) as exc:
            failures += 1
            print(f"series {series_uid}: FAILED: {safe_error_text(exc)}", file=sys.stderr)
            continue
        out = args.output / result.series_instance_uid
        out.mkdir(parents=True, exist_ok=True)
        write_series(result.datasets, out)
        check = result.envelope
        why = ""
        if check is not None and check.status is EnvelopeStatus.FALLBACK:
            why = (
                f"; outside the validated envelope of {check.checked.short}: "
                f"{'; '.join(check.violations)}; fallback engine ran"
            )
        elif check is not None and check.status is EnvelopeStatus.OUTSIDE_PROCESSED:
            why = (
                "; WARNING: processed outside the validated envelope: "
                f"{'; '.join(check.violations)}"
            )
        elif check is not None:
            why = f"; envelope {check.status.value}"
        print(
            f"series {series_uid}: {len(result.datasets)} image(s) -> {out} "
            f"({result.identity.short}, {time.monotonic() - t0:.1f} s{why})"
        )
    if skipped:
        print(f"{skipped} non-DICOM file(s) ignored", file=sys.stderr)
    return EXIT_FAILURE if failures else EXIT_OK


def _forward(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    return int(mod.main(argv))


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

    p = sub.add_parser("standardize", help="offline: standardize the series in IN_DIR into OUT_DIR")
    _add_config_args(p)
    p.add_argument("input", type=Path, metavar="IN_DIR")
    p.add_argument("output", type=Path, metavar="OUT_DIR")
    p.add_argument("--engine", help="engine name from the configuration (default: the first)")
    p.add_argument("--device", help="override the engine's device (cpu, cuda, cuda:N)")
    p.add_argument(
        "--outside-envelope",
        choices=[a.value for a in OutsideEnvelope],
        default=OutsideEnvelope.FALLBACK.value,
        help="a series outside the engine's validated envelope: run the fallback engine, fail "
        "it, or process it anyway with a warning (default: %(default)s)",
    )
    p.add_argument(
        "--fallback-engine",
        metavar="NAME",
        help="engine name from the configuration to fall back to (default: the built-in linear "
        "filter)",
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
    "evaluate": "training.evaluate",
    "bars": "training.bars",
}
_TRAIN = {"linear": "training.fit_linear", "ltdiff": "training.train_ltdiff"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _FORWARDED:
        return _forward(_FORWARDED[argv[0]], argv[1:])
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
