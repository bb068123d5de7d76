"""Metrics and health (issue 10, item 1): the [metrics] table, the scrape-time collector read
from a real database, the probes, the event metrics and the example alert rules."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node import statuses
from dicom_node import store as store_module
from dicom_node.config import (
    ConfigError,
    MetricsConfig,
    RouteRule,
    check_runtime,
    load_config,
    parse_config,
)
from dicom_node.metrics import (
    INSTANCE_STATUSES,
    MetricsServer,
    NodeMetrics,
    Phase,
    Probe,
    RejectionReason,
    StateCollector,
    probe_health,
    probe_readiness,
    rejection_reason,
    status_label,
)
from dicom_node.store import ExportRow, InstanceRecord, JobKind, JobStore, read_queue_gauges

REPO = Path(__file__).resolve().parents[2]


# ---- configuration ---------------------------------------------------------------------------


def test_metrics_are_on_by_default_on_loopback_port_9464():
    assert parse_config({}).metrics == MetricsConfig(True, "127.0.0.1", 9464)
    shipped = load_config(REPO / "config" / "ltdiff-node.toml")
    assert shipped.metrics == MetricsConfig(), "config/ltdiff-node.toml documents the defaults"
    assert parse_config({}).as_dict()["metrics"] == {
        "enabled": True,
        "bind_address": "127.0.0.1",
        "port": 9464,
    }


def test_metrics_table_is_parsed():
    cfg = parse_config({"metrics": {"enabled": False, "bind_address": "::", "port": 9100}})
    assert cfg.metrics == MetricsConfig(enabled=False, bind_address="::", port=9100)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"port": 0}, "metrics.port = 0: expected an integer from 1 to 65535"),
        ({"port": "9464"}, "metrics.port = '9464'"),
        ({"enabled": "yes"}, "metrics.enabled = 'yes': expected true or false"),
        ({"bind_address": "localhost"}, "metrics.bind_address = 'localhost': expected an IP"),
        ({"bind_address": "10.0.0.0/8"}, "metrics.bind_address = '10.0.0.0/8'"),
        ({"path": "/metrics"}, "metrics: unknown key(s) path"),
    ],
)
def test_invalid_metrics_values_name_the_key(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"metrics": table})


def test_metrics_on_a_network_address_is_a_warning(tmp_path):
    node = {"state_dir": str(tmp_path / "state")}
    exposed = parse_config({"node": node, "metrics": {"bind_address": "0.0.0.0"}})
    assert any("metrics.bind_address = '0.0.0.0'" in w for w in check_runtime(exposed))
    local = parse_config({"node": node})
    assert not any("metrics" in w for w in check_runtime(local))


# ---- event metrics ---------------------------------------------------------------------------


def test_status_labels_are_the_names_in_statuses_py():
    assert status_label(statuses.SUCCESS) == "success"
    assert status_label(statuses.OUT_OF_RESOURCES) == "out_of_resources"
    assert status_label(statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED) == (
        "cannot_understand_limit_exceeded"
    )
    assert status_label(0xC999) == "0xc999"
    assert len(set(INSTANCE_STATUSES)) == len(INSTANCE_STATUSES)


def test_a_rejection_maps_to_its_reason():
    assert rejection_reason(0x01, 0x03) is RejectionReason.CALLING_AE_NOT_ALLOWED
    assert rejection_reason(0x03, 0x02) is RejectionReason.ASSOCIATION_LIMIT
    assert rejection_reason(0x02, 0x02) is RejectionReason.OTHER
    assert rejection_reason(None, None) is RejectionReason.OTHER


def _value(metrics: NodeMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_event_metrics_count_into_the_nodes_own_registry():
    route = RouteRule("r1", "learned", (), (("Modality", "^CT$"),))
    one, other = NodeMetrics([route]), NodeMetrics()
    one.instance_received(statuses.SUCCESS)
    one.instance_received(statuses.SUCCESS, duplicate=True)
    one.instance_received(statuses.CANNOT_UNDERSTAND_INVALID_UID)
    one.association_rejected(RejectionReason.TLS_FAILED)
    one.series_finished("standardize", "done")
    one.outside_envelope("r1", "learned", "fallback")
    one.engine_processed({"engine": "linear-filter 0.1.0 w:abc", "processing_ms": 1500.0})
    one.engine_processed({"forwarded": True})  # no engine ran: nothing observed
    total = "ltdiff_node_instances_received_total"
    assert _value(one, total, status="success") == 1
    assert _value(one, total, status="duplicate") == 1
    assert _value(one, total, status="cannot_understand_invalid_uid") == 1
    assert _value(one, total, status="out_of_resources") == 0, "known statuses start at 0"
    assert _value(other, total, status="success") == 0, "registries are per node"
    assert _value(one, "ltdiff_node_association_rejections_total", reason="tls_failed") == 1
    assert _value(one, "ltdiff_node_series_processed_total", kind="standardize", status="done") == (
        1
    )
    fallbacks = "ltdiff_node_engine_fallbacks_total"
    assert _value(one, fallbacks, route="r1", engine="learned", outcome="fallback") == 1
    assert _value(one, fallbacks, route="r1", engine="learned", outcome="outside-failed") == 0
    hist = {"engine": "linear-filter 0.1.0 w:abc"}
    assert _value(one, "ltdiff_node_processing_seconds_count", **hist) == 1
    assert _value(one, "ltdiff_node_processing_seconds_sum", **hist) == 1.5
    assert _value(one, "ltdiff_node_processing_seconds_bucket", le="1.0", **hist) == 0
    assert _value(one, "ltdiff_node_processing_seconds_bucket", le="2.0", **hist) == 1
    assert b"_created" not in generate_latest(one.registry)


# ---- the collector, from a database with known jobs ---------------------------------------------


def _rec(sop: str, series: str) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        series_uid=series,
        study_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/spool/{series}/{sop}.dcm"),
        size_bytes=10,
        calling_ae="PACS",
        header={"Modality": "CT"},
        own_output=False,
        expected_count=None,
    )


def _job(store: JobStore, series: str, created: float) -> int:
    store.record_instance(_rec(f"{series}.1", series), now=created - 10)
    job = store.complete_series(
        series,
        0,
        job_kind=JobKind.STANDARDIZE,
        rule="r",
        engine="linear",
        destinations=("pacs", "lab"),
        now=created,
    )
    assert job is not None
    return job


def _known_store(path: Path, now: float) -> None:
    """Jobs 1-7: 2 queued (the older created 600 s ago), 1 waiting for disk (created 5000 s
    ago), 1 processing, 1 exporting with 2 dead letters and 1 retrying instance for "pacs",
    1 done, 1 failed."""
    store = JobStore(path)
    try:
        created = (600, 30, 5000, 20, 20, 20, 20)
        ids = [_job(store, f"9.{i}", now - age) for i, age in enumerate(created, 1)]
        assert ids == [1, 2, 3, 4, 5, 6, 7]
        claimed = [store.claim_job("w", (JobKind.STANDARDIZE,), now=now) for _ in ids]
        assert [j.id for j in claimed if j] == ids
        store.release_job(1)
        store.release_job(2)
        store.defer_job(3, "disk full", now + 60)
        outputs = [(f"8.{i}", "1.2.840.10008.5.1.4.1.1.2", Path(f"/o/{i}")) for i in range(3)]
        store.start_export(5, outputs, ("pacs",), derived_series_uid="8", summary={})
        rows = [
            ExportRow(i + 1, 5, "pacs", sop, cls, p, 0) for i, (sop, cls, p) in enumerate(outputs)
        ]
        store.mark_export_failed(rows[:2], "refused", max_attempts=1, backoff=lambda a: 1, now=now)
        store.mark_export_failed(rows[2:], "refused", max_attempts=5, backoff=lambda a: 1, now=now)
        store.start_export(6, [], (), derived_series_uid="7", summary={})
        store.fail_job(7, "bad input")
    finally:
        store.close()


def _scrape(collector: StateCollector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _collector(tmp_path: Path, **kwargs: Any) -> StateCollector:
    ok = Probe(True, "ok", {"listener": "ok"})
    return StateCollector(
        database_path=kwargs.get("database_path", tmp_path / "db.sqlite3"),
        state_dir=tmp_path,
        destinations=("pacs", "lab"),
        min_free_bytes=1024 << 20,
        health=kwargs.get("health", lambda: ok),
        readiness=lambda: Probe(False, "starting", {"phase": "start-up is not complete"}),
    )


def test_collector_reports_jobs_queue_age_and_export_backlog_from_the_database(tmp_path):
    now = time.time()
    _known_store(tmp_path / "db.sqlite3", now)
    m = _scrape(_collector(tmp_path))
    jobs = {dict(k)["state"]: v for k, v in m["ltdiff_node_jobs"].items()}
    assert jobs == {
        "queued": 2,
        "waiting": 1,
        "processing": 1,
        "exporting": 1,
        "done": 1,
        "failed": 1,
        "superseded": 0,
    }
    (age,) = m["ltdiff_node_queue_oldest_age_seconds"].values()
    assert 5000 <= age < 5000 + 120, "the oldest queued job, deferred ones included"
    dead = {dict(k)["destination"]: v for k, v in m["ltdiff_node_export_dead_letters"].items()}
    retrying = {dict(k)["destination"]: v for k, v in m["ltdiff_node_export_retrying"].items()}
    assert dead == {"pacs": 2, "lab": 0}
    assert retrying == {"pacs": 1, "lab": 0}
    (free,) = m["ltdiff_node_disk_free_bytes"].values()
    assert free > 0
    assert m["ltdiff_node_disk_min_free_bytes"] == {(): 1024 << 20}
    assert m["ltdiff_node_healthy"] == {(): 1.0}
    assert m["ltdiff_node_ready"] == {(): 0.0}


def test_collector_without_a_readable_database_still_answers(tmp_path):
    unhealthy = Probe(False, "unhealthy", {"database": "cannot be read"})
    m = _scrape(
        _collector(tmp_path, database_path=tmp_path / "none.sqlite3", health=lambda: unhealthy)
    )
    assert "ltdiff_node_jobs" not in m
    assert m["ltdiff_node_healthy"] == {(): 0.0}
    assert "ltdiff_node_disk_free_bytes" in m


def test_queue_gauges_read_from_indexes_only(tmp_path, monkeypatch):
    """Bounded cost: no query of a scrape scans a table (the job and export history grow)."""
    path = tmp_path / "db.sqlite3"
    _known_store(path, time.time())
    statements: list[str] = []
    real = store_module._read_only

    def traced(db: Path, timeout_s: float) -> sqlite3.Connection:
        conn = real(db, timeout_s)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(store_module, "_read_only", traced)
    read_queue_gauges(path, ["pacs"])
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 4, statements
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for sql in selects:
            plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert all("INDEX" in step for step in plan), f"{sql}: {plan}"


# ---- probes ------------------------------------------------------------------------------------


def test_health_names_what_is_not_alive(tmp_path):
    JobStore(tmp_path / "db.sqlite3").close()
    alive = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    alive.start()
    dead = threading.Thread(target=lambda: None, name="engine-cpu-0")
    dead.start()
    dead.join()
    good = probe_health(
        listener_serving=True, threads=[alive], database_path=tmp_path / "db.sqlite3"
    )
    assert good.ok and good.body() == {
        "status": "ok",
        "checks": {"listener": "ok", "database": "ok", "threads": "ok"},
    }
    bad = probe_health(
        listener_serving=False, threads=[alive, dead], database_path=tmp_path / "gone.sqlite3"
    )
    assert not bad.ok and bad.status == "unhealthy"
    assert bad.checks["threads"] == "not running: engine-cpu-0"
    assert bad.checks["listener"] == "not accepting connections"
    assert bad.checks["database"].startswith("cannot be read")
    assert "threads: not running: engine-cpu-0" in bad.body()["reason"]


def test_ready_only_between_start_up_and_stop():
    assert probe_readiness(Phase.READY, listener_serving=True).ok
    for phase in (Phase.STARTING, Phase.STOPPING, Phase.STOPPED):
        probe = probe_readiness(phase, listener_serving=True)
        assert not probe.ok and probe.status == phase.value and probe.body()["reason"]
    assert not probe_readiness(Phase.READY, listener_serving=False).ok


# ---- the HTTP server ---------------------------------------------------------------------------


def _get(url: str, **headers: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_server_routes_probes_and_formats_and_a_port_in_use_is_a_config_error():
    metrics = NodeMetrics()
    server = MetricsServer(
        MetricsConfig(port=0),
        metrics,
        health=lambda: Probe(False, "unhealthy", {"threads": "not running: scheduler"}),
        readiness=lambda: Probe(True, "ready", {"phase": "ok"}),
    )
    base = server.url.removesuffix("/metrics")
    try:
        status, ctype, body = _get(server.url)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert b"ltdiff_node_instances_received_total" in body
        status, ctype, body = _get(server.url, Accept="application/openmetrics-text")
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, ctype, body = _get(base + "/healthz")
        assert (status, ctype) == (503, "application/json")
        assert json.loads(body)["reason"] == "threads: not running: scheduler"
        status, _, body = _get(base + "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert _get(base + "/")[0] == 404
        with pytest.raises(
            ConfigError,
            match=r"metrics\.port = \d+: cannot listen on 127\.0\.0\.1 port \d+ \(.*in use",
        ):
            MetricsServer(
                MetricsConfig(port=server.port),
                metrics,
                health=lambda: Probe(True, "ok"),
                readiness=lambda: Probe(True, "ready"),
            )
    finally:
        server.close()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port), 2),
    ):
        pass  # closed with the node


# ---- the example alert rules --------------------------------------------------------------------


def _scalar(text: str) -> Any:
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"unterminated quoted scalar: {text}")
        return text[1:-1].replace("''", "'")
    if text.startswith('"'):
        return json.loads(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text in {"true", "false"}:
        return text == "true"
    if text[0] in "{[&*!|>%@`" or ": " in text or " #" in text:
        raise ValueError(f"not in the YAML subset this loader reads: {text}")
    return text


def load_yaml_subset(text: str) -> Any:
    """A tiny YAML reader for block mappings and sequences with plain or quoted scalars (what
    the alert rules use; PyYAML is not a dependency). Raises ValueError on anything else."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise ValueError(f"tab in indentation: {raw!r}")
            lines.append([len(raw) - len(raw.lstrip(" ")), stripped])

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                rest = lines[i][1][2:]
                if re.match(r"^[A-Za-z_][\w-]*:( |$)", rest):
                    lines[i] = [indent + 2, rest]  # the item is a mapping at the dash's column
                    item, i = block(i, indent + 2)
                else:
                    item, i = _scalar(rest), i + 1
                items.append(item)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            match = re.fullmatch(r"([A-Za-z_][\w-]*):(?: (.*))?", lines[i][1])
            if match is None:
                raise ValueError(f"line {lines[i][1]!r}: expected 'key: value'")
            key, value = match.groups()
            if key in mapping:
                raise ValueError(f"duplicate key {key}")
            i += 1
            if value is not None:
                mapping[key] = _scalar(value)
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key], i = block(i, lines[i][0])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
        return mapping, i

    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unexpected indentation at {lines[end][1]!r}")
    return value


def test_yaml_subset_loader_reads_and_refuses():
    assert load_yaml_subset("a:\n  - b: 1\n    c: 'x ''y'''\n  - plain text\nd: true\n") == {
        "a": [{"b": 1, "c": "x 'y'"}, "plain text"],
        "d": True,
    }
    for bad in ("a: {b: 1}\n", "a: 1\n   b: 2\n", "a: 'open\n", "a: 1\na: 2\n"):
        with pytest.raises(ValueError):  # noqa: PT011 - any of the loader's refusals
            load_yaml_subset(bad)


def _exported_names(tmp_path: Path) -> set[str]:
    """Every sample name a node exposes (event metrics and the collector's gauges)."""
    JobStore(tmp_path / "db.sqlite3").close()
    metrics = NodeMetrics()
    metrics.engine_processed({"engine": "e", "processing_ms": 1.0})
    metrics.registry.register(_collector(tmp_path))
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_alert_rules_are_a_prometheus_rule_file_on_metrics_the_node_exports(tmp_path):
    text = (REPO / "config" / "prometheus-alerts.yml").read_text()
    rules_file = load_yaml_subset(text)
    try:  # a real YAML parser, where one is installed, reads the same document
        from ruamel.yaml import YAML
    except ImportError:
        pass
    else:
        assert YAML(typ="safe").load(text) == rules_file
    assert set(rules_file) == {"groups"}
    exported = _exported_names(tmp_path)
    alerts: dict[str, str] = {}
    for group in rules_file["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            assert rule["alert"] not in alerts, f"duplicate alert {rule['alert']}"
            assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert {"summary", "description"} <= set(rule["annotations"])
            assert all(isinstance(v, str) for v in rule["annotations"].values())
            used = set(re.findall(r"\bltdiff_node_\w+", rule["expr"]))
            assert used <= exported, f"{rule['alert']}: not exported: {used - exported}"
            alerts[rule["alert"]] = rule["expr"]
    exprs = " ".join(alerts.values())
    for needed in (
        "ltdiff_node_export_dead_letters",
        "ltdiff_node_queue_oldest_age_seconds",
        "ltdiff_node_disk_free_bytes",
        "ltdiff_node_healthy",
        'up{job="ltdiff-node"}',
    ):
        assert needed in exprs, f"an alert on {needed}"


def test_every_instance_received_marks_when_reception_was_last_active() -> None:
    """Running jobs pause while reception is active (dicom_node/reception_first.py): any
    instance counts, a refused or duplicate one too."""
    metrics = NodeMetrics()
    assert metrics.last_instance_at is None
    for status, duplicate in ((statuses.OUT_OF_RESOURCES, False), (statuses.SUCCESS, True)):
        before = time.monotonic()
        metrics.instance_received(status, duplicate=duplicate)
        assert metrics.last_instance_at is not None
        assert before <= metrics.last_instance_at <= time.monotonic()
