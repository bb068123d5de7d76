"""Prometheus metrics and health probes of a node, served over HTTP (`[metrics]`).

- `NodeMetrics` owns one node's `CollectorRegistry` (never prometheus_client's global one, so
  several nodes in one process, as in the tests, keep their own counts) and the event metrics.
  Components get it and call one method where the event happens: the C-STORE handler
  (`instance_received`), admission and pynetdicom's rejection hook (`association_rejected`),
  the engine worker (`engine_processed`, `outside_envelope`) and the canonical line
  (`series_finished`). Nothing else in their logic changes.
- `StateCollector` computes, at scrape time, the gauges that mirror the database and the disk
  (jobs by state, the oldest queued job, dead letters, retries, free space) and the node's
  health and readiness. It reads with a read-only SQLite connection of its own
  (`store.read_queue_gauges`), which never waits for or blocks the node's writes.
- `MetricsServer` serves `/metrics`, `/healthz` and `/readyz` from a small `ThreadingHTTPServer`
  in a daemon thread. prometheus_client's own `start_http_server` answers every path with the
  metrics and has no place for health probes; its WSGI app would add wsgiref for three routes.
  This server binds in the caller's thread (a port in use is a start-up error naming the key),
  never does a reverse DNS lookup, times out idle clients, and stops with the node.

No label carries patient data: statuses, reasons, states, configured route, engine and
destination names, and the identity of the engine that ran (name, version, weights hash).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from socketserver import TCPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from dicom_node import __version__, statuses
from dicom_node.config import ConfigError, MetricsConfig, RouteRule
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.store import JobKind, JobState, check_database, read_queue_gauges
from engine.envelope_policy import OUTSIDE_STATUSES

log = get_logger("dicom_node.metrics")

# No `*_created` sample beside every counter and histogram: Prometheus would store each as a
# series of its own, and rates need none. (A process-wide setting of prometheus_client, which
# only the node uses in its process.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client 0.26

#: Processing time buckets, seconds: a small series on the GPU takes about a second, 300 slices
#: of LTDiff++ on two CPU cores about five minutes, and `jobs.timeout_s` is an hour by default.
PROCESSING_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

#: `status` of a stored copy of an instance the node already had (answered Success).
DUPLICATE = "duplicate"
_STATUS_NAMES = {
    value: name.lower()
    for name, value in vars(statuses).items()
    if name.isupper() and isinstance(value, int)
}
#: What the C-STORE handler answers, as `status` labels: success, duplicate, and the lower-case
#: name of each failure status in dicom_node/statuses.py that it returns.
INSTANCE_STATUSES = (
    "success",
    DUPLICATE,
    *(
        _STATUS_NAMES[code]
        for code in (
            statuses.OUT_OF_RESOURCES,
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            statuses.CANNOT_UNDERSTAND,
            statuses.CANNOT_UNDERSTAND_INVALID_UID,
            statuses.CANNOT_UNDERSTAND_UID_MISMATCH,
            statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED,
        )
    ),
)


def status_label(status: int) -> str:
    """`success`, `out_of_resources`, ...: the name of a status of dicom_node/statuses.py in
    lower case (`0x....` for a code it does not name)."""
    return _STATUS_NAMES.get(status, f"0x{status:04x}")


#: The outputs of the audit trail (`output` label of the dropped audit messages).
AUDIT_OUTPUTS = ("file", "syslog")


class RejectionReason(StrEnum):
    """Why a connection or association was turned away (`reason` label)."""

    ADDRESS_NOT_ALLOWED = "address_not_allowed"  # listener.allowed_addresses
    PENDING_LIMIT = "pending_limit"  # listener.max_pending_connections
    IDLE_TIMEOUT = "idle_timeout"  # no TLS handshake / A-ASSOCIATE-RQ in time
    TLS_FAILED = "tls_failed"  # failed TLS handshake (certificate, protocol)
    CALLING_AE_NOT_ALLOWED = "calling_ae_not_allowed"  # listener.allowed_calling_ae_titles
    CALLED_AE_NOT_RECOGNIZED = "called_ae_not_recognized"
    ASSOCIATION_LIMIT = "association_limit"  # listener.max_associations
    OTHER = "other"  # any other A-ASSOCIATE-RJ


#: A-ASSOCIATE-RJ (source, diagnostic) -> reason (PS3.8 9.3.4; pynetdicom's acceptor).
_RJ_REASONS = {
    (0x01, 0x03): RejectionReason.CALLING_AE_NOT_ALLOWED,
    (0x01, 0x07): RejectionReason.CALLED_AE_NOT_RECOGNIZED,
    (0x03, 0x02): RejectionReason.ASSOCIATION_LIMIT,
}


def rejection_reason(source: int | None, diagnostic: int | None) -> RejectionReason:
    """The reason of an A-ASSOCIATE-RJ the listener sent."""
    return _RJ_REASONS.get((source or 0, diagnostic or 0), RejectionReason.OTHER)


class NodeMetrics:
    """One node's registry and event metrics (module doc). Thread-safe: prometheus_client's
    metric objects lock their own values."""

    def __init__(self, routes: Sequence[RouteRule] = (), version: str = __version__) -> None:
        self.registry = CollectorRegistry()
        # Called before each exposition: applies what receiver processes reported (receivers.py)
        self.refresh: Callable[[], None] | None = None
        # time.monotonic() of the last instance received (any status), None before the first:
        # running jobs pause while reception is active (dicom_node/reception_first.py)
        self.last_instance_at: float | None = None
        ProcessCollector(registry=self.registry)  # process_* : CPU, resident memory, open files
        Info("ltdiff_node_build", "The running ltdiff-node.", registry=self.registry).info(
            {"version": version}
        )
        self.instances_received = Counter(
            "ltdiff_node_instances_received",
            "C-STORE requests answered by the listener, by outcome: success, duplicate (stored "
            "before, answered Success) or the failure status (dicom_node/statuses.py).",
            ["status"],
            registry=self.registry,
        )
        self.series_processed = Counter(
            "ltdiff_node_series_processed",
            "Jobs finished (the canonical series.done / series.failed line), by kind "
            "(standardize, forward) and status (done, failed).",
            ["kind", "status"],
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "ltdiff_node_processing_seconds",
            "Time to standardize one series in the engine process (decode, envelope check, "
            "engine, encode), by the engine that actually ran.",
            ["engine"],
            buckets=PROCESSING_BUCKETS,
            registry=self.registry,
        )
        self.association_rejections = Counter(
            "ltdiff_node_association_rejections",
            "Connections and associations the listener turned away, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.engine_fallbacks = Counter(
            "ltdiff_node_engine_fallbacks",
            "Series outside the validated envelope of their route's engine, by route, that "
            "engine and outcome (fallback: the fallback engine ran; outside-processed; "
            "outside-failed).",
            ["route", "engine", "outcome"],
            registry=self.registry,
        )
        self.audit_dropped = Counter(
            "ltdiff_node_audit_messages_dropped",
            "Audit messages ([audit]) an output never got, by output (file, syslog): its queue "
            "was full, the node stopped before they were delivered, or one was too large.",
            ["output"],
            registry=self.registry,
        )
        # Every known label value from the start, so rate() and increase() see the first event.
        for label in INSTANCE_STATUSES:
            self.instances_received.labels(label)
        for kind in JobKind:
            for state in (JobState.DONE, JobState.FAILED):
                self.series_processed.labels(kind.value, state.value)
        for reason in RejectionReason:
            self.association_rejections.labels(reason.value)
        for output in AUDIT_OUTPUTS:
            self.audit_dropped.labels(output)
        for route in routes:
            for outcome in sorted(OUTSIDE_STATUSES):
                self.engine_fallbacks.labels(route.name, route.engine, outcome.value)

    def instance_received(self, status: int, *, duplicate: bool = False) -> None:
        self.last_instance_at = time.monotonic()
        self.instances_received.labels(DUPLICATE if duplicate else status_label(status)).inc()

    def association_rejected(self, reason: RejectionReason) -> None:
        self.association_rejections.labels(reason.value).inc()

    def audit_messages_dropped(self, output: str, n: int = 1) -> None:
        self.audit_dropped.labels(output).inc(n)

    def engine_processed(self, summary: Mapping[str, Any]) -> None:
        """A series was standardized: its job summary names the engine that ran and the time."""
        ms, engine = summary.get("processing_ms"), summary.get("engine")
        if isinstance(ms, int | float) and isinstance(engine, str):
            self.processing_seconds.labels(engine).observe(ms / 1000.0)

    def outside_envelope(self, route: str | None, engine: str | None, outcome: str) -> None:
        self.engine_fallbacks.labels(route or "", engine or "", outcome).inc()

    def series_finished(self, kind: str, status: str) -> None:
        self.series_processed.labels(kind, status).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the text format the Accept header asks for (Prometheus text by
        default, OpenMetrics when asked): body and content type."""
        if self.refresh is not None:
            self.refresh()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# ---- health and readiness --------------------------------------------------------------------


class Phase(StrEnum):
    """Where the node is in its life (/readyz)."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Probe:
    """The answer of /healthz or /readyz: `ok`, and per check "ok" or what is wrong."""

    ok: bool
    status: str
    checks: Mapping[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(f"{name}: {what}" for name, what in self.checks.items() if what != "ok")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "checks": dict(self.checks)}
        if not self.ok:
            body["reason"] = self.reason
        return body


def probe_health(
    *,
    listener_serving: bool,
    threads: Sequence[threading.Thread],
    database_path: Path,
    receivers: str | None = None,
) -> Probe:
    """Healthy when the listener accepts connections, the database can be read and every
    thread of the node (scheduler, engine workers, exporters) is running; with receiver
    processes, `receivers` is "ok" or what is wrong with them."""
    checks = {"listener": "ok" if listener_serving else "not accepting connections"}
    if receivers is not None:
        checks["receivers"] = receivers
    try:
        check_database(database_path)
        checks["database"] = "ok"
    except sqlite3.Error as exc:
        checks["database"] = f"cannot be read ({safe_error_text(exc)})"
    stopped = [t.name for t in threads if not t.is_alive()]
    if not threads:
        checks["threads"] = "not started"
    else:
        checks["threads"] = f"not running: {', '.join(stopped)}" if stopped else "ok"
    ok = all(v == "ok" for v in checks.values())
    return Probe(ok, "ok" if ok else "unhealthy", checks)


def probe_readiness(phase: Phase, *, listener_serving: bool) -> Probe:
    """Ready once start-up is complete and the listener accepts associations; not while
    starting (engines loading), stopping or stopped."""
    if phase is not Phase.READY:
        why = {
            Phase.STARTING: "start-up is not complete",
            Phase.STOPPING: "the node is stopping",
            Phase.STOPPED: "the node has stopped",
        }[phase]
        return Probe(False, phase.value, {"phase": why})
    if not listener_serving:
        return Probe(False, "not_ready", {"listener": "not accepting connections"})
    return Probe(True, phase.value, {"phase": "ok", "listener": "ok"})


# ---- gauges computed at scrape time ------------------------------------------------------------


class StateCollector(Collector):
    """The gauges that mirror the database, the disk and the probes, read at each scrape."""

    def __init__(
        self,
        *,
        database_path: Path,
        state_dir: Path,
        destinations: Sequence[str],
        min_free_bytes: int,
        health: Callable[[], Probe],
        readiness: Callable[[], Probe],
    ) -> None:
        self.database_path = database_path
        self.state_dir = state_dir
        self.destinations = tuple(destinations)
        self.min_free_bytes = min_free_bytes
        self.health = health
        self.readiness = readiness
        self._database_error: str | None = None  # logged when it starts and when it ends

    def collect(self) -> Iterable[Metric]:
        yield from self._queue()
        with contextlib.suppress(OSError):  # a state dir that cannot be read: health says so
            free = shutil.disk_usage(self.state_dir).free
            yield GaugeMetricFamily(
                "ltdiff_node_disk_free_bytes",
                "Free space of the file system of node.state_dir (spool, outbox, database).",
                value=free,
            )
        yield GaugeMetricFamily(
            "ltdiff_node_disk_min_free_bytes",
            "listener.min_free_disk_mb in bytes: below it C-STORE answers Out of Resources "
            "(0xA700) and no job starts.",
            value=self.min_free_bytes,
        )
        yield GaugeMetricFamily(
            "ltdiff_node_healthy",
            "1 when /healthz answers 200 (listener, database and every thread alive), else 0.",
            value=int(self.health().ok),
        )
        yield GaugeMetricFamily(
            "ltdiff_node_ready",
            "1 when /readyz answers 200 (started, accepting associations), else 0.",
            value=int(self.readiness().ok),
        )

    def _queue(self) -> Iterable[Metric]:
        try:
            gauges = read_queue_gauges(self.database_path, self.destinations)
        except sqlite3.Error as exc:  # ltdiff_node_healthy is 0 then; the scrape still answers
            if self._database_error is None:
                self._database_error = safe_error_text(exc)
                log.warning("metrics.database_unreadable", error=self._database_error)
            return
        if self._database_error is not None:
            self._database_error = None
            log.info("metrics.database_readable")
        jobs = GaugeMetricFamily(
            "ltdiff_node_jobs",
            "Jobs by state: queued, waiting (queued, deferred until the disk has room), "
            "processing, exporting, done, failed, superseded.",
            labels=["state"],
        )
        for state, n in sorted(gauges.jobs.items()):
            jobs.add_metric([state], n)
        yield jobs
        oldest = gauges.oldest_queued_at
        yield GaugeMetricFamily(
            "ltdiff_node_queue_oldest_age_seconds",
            "Age of the oldest job waiting for an engine worker (queued or waiting); 0 when "
            "none is.",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )
        dead = GaugeMetricFamily(
            "ltdiff_node_export_dead_letters",
            "Instances given up after the destination's max_attempts (ltdiff-node status; "
            "ltdiff-node retry JOB), by configured destination.",
            labels=["destination"],
        )
        retrying = GaugeMetricFamily(
            "ltdiff_node_export_retrying",
            "Instances still to be sent after at least one failed attempt, by configured "
            "destination.",
            labels=["destination"],
        )
        for dest in self.destinations:
            dead.add_metric([dest], gauges.dead_letters.get(dest, 0))
            retrying.add_metric([dest], gauges.retrying.get(dest, 0))
        yield dead
        yield retrying


# ---- HTTP ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10  # seconds an idle or slow client may hold a handler thread

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        site = self.server.site
        try:
            if path == "/metrics":
                body, content_type = site.metrics.exposition(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, body, content_type, head)
            elif path in {"/healthz", "/readyz"}:
                probe = site.health() if path == "/healthz" else site.readiness()
                status = HTTPStatus.OK if probe.ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, json.dumps(probe.body()).encode(), "application/json", head)
            else:
                self._send(
                    HTTPStatus.NOT_FOUND,
                    b"ltdiff-node: /metrics, /healthz, /readyz\n",
                    "text/plain; charset=utf-8",
                    head,
                )
        except Exception:  # a defect in a probe or collector: answer 500, keep serving
            log.exception("metrics.request_failed", path=path)
            with contextlib.suppress(OSError):
                self._send(
                    HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain", head
                )

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def version_string(self) -> str:
        return "ltdiff-node"  # not the Python version

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus scrapes every few seconds."""


@dataclass(frozen=True)
class _Site:
    metrics: NodeMetrics
    health: Callable[[], Probe]
    readiness: Callable[[], Probe]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs never holds up the process
    site: _Site

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (it can hang)."""
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """/metrics, /healthz and /readyz on `[metrics] bind_address:port` (module doc)."""

    def __init__(
        self,
        cfg: MetricsConfig,
        metrics: NodeMetrics,
        *,
        health: Callable[[], Probe],
        readiness: Callable[[], Probe],
    ) -> None:
        """Bind and start serving in a daemon thread; ConfigError (naming the key) when the
        address cannot be bound."""
        server_class = _HTTPServer6 if ip_address(cfg.bind_address).version == 6 else _HTTPServer
        try:
            self._server = server_class((cfg.bind_address, cfg.port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port = {cfg.port}: cannot listen on {cfg.bind_address} port {cfg.port} "
                f"({exc.strerror or exc}); another service (or another ltdiff-node) uses it: "
                "choose another metrics.port, or set metrics.enabled = false"
            ) from exc
        self._server.site = _Site(metrics, health, readiness)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket (requests in flight finish on their own threads)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
