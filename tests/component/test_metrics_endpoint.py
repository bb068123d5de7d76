"""The metrics and health endpoints of a real node on loopback (issue 10, item 1): a phantom
series through the node shows up in /metrics, /healthz and /readyz follow the node's state, and
a metrics port in use stops start-up with the key named."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from tests_support import node_config, wait_until, write_site_config

from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.config import ConfigError, DestinationConfig, MetricsConfig
from dicom_node.export import send_paths
from dicom_node.phantom import PATIENT_ID, PATIENT_NAME, generate_phantom_series
from dicom_node.receivers import DispatchingServer
from dicom_node.service import Node
from dicom_node.worker import EngineWorker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _probe(node: Node, path: str) -> tuple[int, dict[str, Any]]:
    assert node.metrics_server is not None
    status, body = _get(node.metrics_server.url.replace("/metrics", path))
    return status, json.loads(body)


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(node: Node) -> tuple[str, Samples]:
    assert node.metrics_server is not None
    status, body = _get(node.metrics_server.url)
    assert status == 200, body
    return body.decode(), _samples(body.decode())


def _receivers(node: Node) -> dict[str, str]:
    """The check /healthz adds when the associations run in receiver processes."""
    return {"receivers": "ok"} if isinstance(node.server, DispatchingServer) else {}


def _to(node: Node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


def test_a_phantom_series_shows_in_metrics_with_its_engine_and_no_patient_data(
    start_node, archive, tmp_path
):
    node = start_node(dest_port=archive.port)
    paths = generate_phantom_series(tmp_path / "phantom", n_slices=4, size=64)
    assert not send_paths(_to(node), "PACS", paths).failed
    assert not send_paths(_to(node), "PACS", paths[:1]).failed  # a copy: a duplicate

    done = ("ltdiff_node_series_processed_total", (("kind", "standardize"), ("status", "done")))
    wait_until(lambda: _scrape(node)[1].get(done) == 1, 60, "the series done in /metrics")
    wait_until(lambda: archive.received == len(paths), 30, "the derived series in the archive")
    text, m = _scrape(node)

    received = "ltdiff_node_instances_received_total"
    assert m[received, (("status", "success"),)] == len(paths)
    assert m[received, (("status", "duplicate"),)] == 1
    assert m[received, (("status", "out_of_resources"),)] == 0
    (engine,) = {
        dict(labels)["engine"]
        for name, labels in m
        if name == "ltdiff_node_processing_seconds_count" and m[name, labels] == 1
    }
    assert engine.startswith("linear-filter "), engine  # the identity of the engine that ran
    inf = (("engine", engine), ("le", "+Inf"))
    assert m["ltdiff_node_processing_seconds_bucket", inf] == 1
    assert m["ltdiff_node_jobs", (("state", "done"),)] == 1
    assert m["ltdiff_node_jobs", (("state", "queued"),)] == 0
    assert m["ltdiff_node_queue_oldest_age_seconds", ()] == 0
    assert m["ltdiff_node_export_dead_letters", (("destination", "archive"),)] == 0
    assert m["ltdiff_node_export_retrying", (("destination", "archive"),)] == 0
    assert m["ltdiff_node_disk_free_bytes", ()] > 0
    assert m["ltdiff_node_healthy", ()] == 1 and m["ltdiff_node_ready", ()] == 1
    assert m["process_resident_memory_bytes", ()] > 0

    source = dcmread(paths[0], stop_before_pixels=True)
    for phi in (PATIENT_NAME, PATIENT_ID, *PATIENT_NAME.split("^")):
        assert phi not in text, f"{phi!r} in /metrics"
    for uid in (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID):
        assert uid not in text, "no study, series or instance UID in /metrics"

    assert _probe(node, "/healthz") == (
        200,
        {
            "status": "ok",
            "checks": {"listener": "ok", "database": "ok", "threads": "ok", **_receivers(node)},
        },
    )
    assert _probe(node, "/readyz")[0] == 200


class _WorkerDefect(BaseException):
    """A defect the worker's loop does not catch: its thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_is_503_with_the_reason_when_the_database_or_a_worker_thread_is_gone(
    start_node, tmp_path
):
    node = start_node()
    assert _probe(node, "/healthz")[0] == 200

    # The database file disappears (a clean-up gone wrong, an unmounted volume): a restart
    # would start from an empty database, so the node is unhealthy until it is back.
    db = node.config.database_path
    moved = db.with_name("moved.sqlite3")
    db.rename(moved)
    try:
        status, body = _probe(node, "/healthz")
        assert status == 503 and body["status"] == "unhealthy"
        assert body["checks"]["database"].startswith("cannot be read"), body
        assert body["reason"].startswith("database: cannot be read")
        m = _scrape(node)[1]
        assert m["ltdiff_node_healthy", ()] == 0
        assert ("ltdiff_node_jobs", (("state", "done"),)) not in m
    finally:
        moved.rename(db)
    assert _probe(node, "/healthz")[0] == 200

    (worker,) = [t for t in node.threads if isinstance(t, EngineWorker)]

    def defect() -> None:
        raise _WorkerDefect

    worker._run_once = defect  # type: ignore[method-assign]
    worker.wake.set()
    wait_until(lambda: not worker.is_alive(), 30, "the worker thread to end")
    status, body = _probe(node, "/healthz")
    assert status == 503
    assert body["checks"] == {
        "listener": "ok",
        "database": "ok",
        "threads": f"not running: {worker.name}",
        **_receivers(node),
    }
    assert _scrape(node)[1]["ltdiff_node_healthy", ()] == 0
    assert _probe(node, "/readyz")[0] == 200, "reception still works: the node is ready"


def test_readyz_is_503_while_the_engines_load_and_200_once_started(tmp_path, monkeypatch):
    loaded = threading.Event()
    start_engine = EngineWorker.start_engine

    def slow_start(self: EngineWorker) -> None:
        loaded.wait(60)
        start_engine(self)

    monkeypatch.setattr(EngineWorker, "start_engine", slow_start)
    node = Node(node_config(tmp_path / "state", None))
    starting = threading.Thread(target=node.start, name="test-start", daemon=True)
    starting.start()
    try:
        wait_until(lambda: node.metrics_server is not None, 30, "the metrics server")
        assert _probe(node, "/readyz") == (
            503,
            {
                "status": "starting",
                "checks": {"phase": "start-up is not complete"},
                "reason": "phase: start-up is not complete",
            },
        )
        status, body = _probe(node, "/healthz")
        assert status == 503 and body["checks"]["listener"] == "not accepting connections"
        assert _scrape(node)[1]["ltdiff_node_ready", ()] == 0
        loaded.set()
        starting.join(60)
        assert _probe(node, "/readyz") == (
            200,
            {"status": "ready", "checks": {"phase": "ok", "listener": "ok"}},
        )
    finally:
        loaded.set()
        starting.join(60)
        url = node.metrics_server.url if node.metrics_server else None
        node.stop()
    assert node.metrics_server is None
    assert url is not None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_rejected_connections_and_associations_are_counted_by_reason(start_node):
    node = start_node(allowed_calling_ae_titles=("PACS",), association_request_timeout_s=0.3)
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
    assert assoc.is_rejected
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as idle:
        assert idle.recv(1) == b"", "closed by the node at association_request_timeout_s"

    rejections = "ltdiff_node_association_rejections_total"

    def counted() -> bool:
        m = _scrape(node)[1]
        return (
            m[rejections, (("reason", "calling_ae_not_allowed"),)] == 1
            and m[rejections, (("reason", "idle_timeout"),)] == 1
        )

    wait_until(counted, 30, "both rejections counted")
    assert _scrape(node)[1][rejections, (("reason", "association_limit"),)] == 0


def test_a_metrics_port_in_use_stops_start_up_with_the_key_named(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = dataclasses.replace(
            node_config(tmp_path / "state", None), metrics=MetricsConfig(port=port)
        )
        node = Node(config)
        with pytest.raises(ConfigError, match=rf"metrics\.port = {port}: cannot listen"):
            node.start()
        assert node.server is None and not node.threads, "nothing was started"

        # `ltdiff-node serve`: a configuration error, exit 78 (systemd does not loop on it)
        site = write_site_config(tmp_path / "site.toml", tmp_path / "cli", 11112, metrics_port=port)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert main(["serve", "-c", str(site)]) == EXIT_CONFIG
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert f"configuration error: metrics.port = {port}: cannot listen on 127.0.0.1" in err
    assert "metrics.enabled = false" in err


def test_metrics_can_be_disabled(start_node, tmp_path: Path):
    config = dataclasses.replace(
        node_config(tmp_path / "state", None), metrics=MetricsConfig(enabled=False)
    )
    node = start_node(config)
    assert node.metrics_server is None
    assert node.health().ok and node.readiness().ok


def test_check_config_shows_the_metrics_section(tmp_path, capsys):
    site = write_site_config(tmp_path / "site.toml", tmp_path / "state", 11112, metrics_port=9100)
    assert main(["check-config", "-c", str(site)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["metrics"] == {
        "enabled": True,
        "bind_address": "127.0.0.1",
        "port": 9100,
    }
    assert "metrics: http://127.0.0.1:9100/metrics, /healthz and /readyz" in err
