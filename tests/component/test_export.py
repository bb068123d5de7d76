"""The exporter against destinations that misbehave, on loopback: a node killed mid-export,
a destination that never answers one C-STORE, and pynetdicom's reactor racing for answers."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from tests_support import (
    free_port,
    node_config,
    serve,
    wait_until,
    write_series,
    write_site_config,
)

from dicom_node import export, statuses
from dicom_node.config import DestinationConfig
from dicom_node.export import send_paths
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.service import Node

#: The most instances a node killed mid-export sends twice (docs/OPERATIONS.md).
RESEND_BOUND = 16


class CountingDestination:
    """A storage SCP that counts what it stores and can hold one request (the `hold_request`-th
    C-STORE) unanswered until `release` is set. `store_held`: whether the held instance was
    stored before the hold (an answer lost on the way back) or not (a peer that hangs)."""

    def __init__(self, hold_request: int | None = None, *, store_held: bool = True) -> None:
        self.hold_request = hold_request
        self.store_held = store_held
        self.lock = threading.Lock()
        self.requests = 0
        self.deliveries: list[str] = []
        self.held = threading.Event()
        self.held_at = 0.0
        self.release = threading.Event()
        ae = AE(ae_title="COUNTER")
        ae.add_supported_context(CTImageStorage, ACCEPTED_TRANSFER_SYNTAXES)
        self.server: Any = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.requests += 1
            hold = self.requests == self.hold_request
            if not hold or self.store_held:
                self.deliveries.append(sop)
        if hold:
            self.held_at = time.time()
            self.held.set()
            self.release.wait(120)
        return statuses.SUCCESS

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def destination() -> Iterator[list[CountingDestination]]:
    made: list[CountingDestination] = []
    yield made
    for d in made:
        d.stop()


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _exports(db: Path) -> list[dict[str, Any]]:
    """The export rows, read as an operator's tool would: a separate read-only connection."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM exports ORDER BY id")]
    finally:
        con.close()


def _job_states(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT state FROM jobs")]
    finally:
        con.close()


def _to_node(node: Node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


# ---- the reactor race ----------------------------------------------------------------------


def test_answers_reach_send_c_store_even_when_the_reactor_polls_for_them(
    tmp_path, destination, monkeypatch
):
    """pynetdicom's association reactor polls the DIMSE queue without blocking; when it wins its
    pause race it takes the C-STORE answer and drops it ("Received unexpected C-STORE service
    message"), and send_c_store waits out the DIMSE timeout for an answer that came. A thread
    polling like the reactor on every loop makes that race certain: every answer must still
    reach send_c_store at once."""
    dest = CountingDestination()
    destination.append(dest)
    stolen: list[object] = []

    class RacingAE(AE):
        def associate(self, *args: Any, **kwargs: Any) -> Any:
            assoc = super().associate(*args, **kwargs)

            def poll_like_the_reactor() -> None:
                while assoc.is_established:
                    _, msg = assoc.dimse.get_msg(block=False)
                    if msg is not None:
                        stolen.append(msg)
                    time.sleep(0.0005)

            threading.Thread(target=poll_like_the_reactor, daemon=True).start()
            return assoc

    monkeypatch.setattr(export, "AE", RacingAE)
    series = write_series(tmp_path / "s", n_slices=10, size=32, uid_seed="race")
    to = DestinationConfig(
        name="d", ae_title="COUNTER", host="127.0.0.1", port=dest.port, dimse_timeout_s=5.0
    )
    t0 = time.monotonic()
    result = send_paths(to, "LTDIFF", series)
    elapsed = time.monotonic() - t0
    assert not result.failed, sorted({why for _, why in result.failed})
    assert len(result.sent) == len(series)
    assert stolen == [], "the polling thread took answers meant for send_c_store"
    assert elapsed < to.dimse_timeout_s, f"an answer was waited for until the timeout ({elapsed})"
    assert sorted(dest.deliveries) == sorted(_sop_uids(series)), "each instance once"


# ---- a destination that never answers one C-STORE -------------------------------------------


def test_unanswered_c_store_is_given_up_after_dimse_timeout_and_retried(
    tmp_path, destination, start_node
):
    dest = CountingDestination(hold_request=3, store_held=False)
    destination.append(dest)
    base = node_config(tmp_path / "state", dest.port)
    (archive,) = base.destinations
    timeout_s = 2.0
    to_dest = dataclasses.replace(
        archive, ae_title="COUNTER", dimse_timeout_s=timeout_s, backoff_initial_s=0.2
    )
    node = start_node(dataclasses.replace(base, destinations=(to_dest,)))
    series = write_series(tmp_path / "src", n_slices=8, size=32, uid_seed="hang")
    assert len(send_paths(_to_node(node), "PACS", series).sent) == len(series)

    assert dest.held.wait(60), "the export reached the held C-STORE"
    db = node.config.database_path

    def gave_up() -> list[dict[str, Any]]:
        return [e for e in _exports(db) if e["attempts"] >= 1]

    wait_until(gave_up, 30, "the unanswered instance counted as a failed attempt")
    (failed,) = gave_up()
    # next_attempt = time of giving up + backoff(1) = + 0.2 s
    gave_up_after = failed["next_attempt"] - to_dest.backoff_initial_s - dest.held_at
    assert timeout_s - 1.0 <= gave_up_after <= timeout_s + 8.0, gave_up_after
    assert "dimse_timeout_s" in failed["last_error"]
    assert failed["attempts"] == 1

    dest.release.set()
    wait_until(lambda: _job_states(db) == ["done"], 60, f"job done: {_job_states(db)}")
    exports = _exports(db)
    assert len(exports) == len(series)
    assert sorted(dest.deliveries) == sorted(e["sop_uid"] for e in exports), (
        "every instance delivered exactly once: the unanswered one was not stored by the peer"
    )
    assert [e["attempts"] for e in exports].count(0) == len(series) - 1, (
        "only the unanswered instance counts an attempt; the others went out on a new association"
    )


@pytest.fixture
def silent_host() -> Iterator[int]:
    """A port whose host never answers a connection attempt (its SYN is dropped), like a PACS
    that is switched off or behind a firewall that drops packets: a listening socket with a
    full accept queue, which Linux answers by dropping new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield port
    for sock in (*fillers, listener):
        sock.close()


def test_a_host_that_never_answers_fails_after_connect_timeout(silent_host, tmp_path):
    """Without a connect timeout the operating system's (about two minutes) would hold the
    destination's exporter on every attempt."""
    dest = DestinationConfig(
        name="silent", ae_title="SILENT", host="127.0.0.1", port=silent_host, connect_timeout_s=1.0
    )
    started = time.monotonic()
    ok, why = export.echo(dest, "LTDIFF")
    assert not ok, why
    series = write_series(tmp_path / "src", n_slices=2, size=16, uid_seed="silent")
    result = send_paths(dest, "LTDIFF", series)
    assert result.sent == [] and len(result.failed) == len(series), result
    assert time.monotonic() - started < 30.0, "two connection attempts of 1 s each"


# ---- kill -9 mid-export ------------------------------------------------------------------------


def test_node_killed_mid_export_resends_only_unrecorded_instances(tmp_path, destination):
    n, hold = 40, 20
    # The 20th C-STORE is stored but its answer is held until the node has been killed: the
    # node dies with 19 confirmed instances and one in flight.
    dest = CountingDestination(hold_request=hold, store_held=True)
    destination.append(dest)
    port = free_port()
    state = tmp_path / "state"
    cfg = write_site_config(
        tmp_path / "site.toml",
        state,
        port,
        f"""
[[destinations]]
name = "counter"
ae_title = "COUNTER"
host = "127.0.0.1"
port = {dest.port}
backoff_initial_s = 0.2
associations = 1  # the bound is per association: one, so the held request is the 20th
""",
    )
    log = tmp_path / "node.log"
    series = write_series(tmp_path / "src", n_slices=n, size=32, uid_seed="killed-export")
    proc = serve(cfg, log)
    try:
        to = DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=port)
        assert len(send_paths(to, "PACS", series).sent) == n
        assert dest.held.wait(120), f"export reached instance {hold}: {log.read_text()[-2000:]}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # power cut mid-export
        proc.wait(timeout=30)
    dest.release.set()  # the held answer goes to a dead connection
    db = state / "ltdiff-node.sqlite3"
    recorded = sum(e["state"] == "sent" for e in _exports(db))
    assert hold - RESEND_BOUND <= recorded <= hold - 1, (
        f"{recorded} confirmations recorded before the kill; at most {RESEND_BOUND - 1} "
        f"of the {hold - 1} confirmed may be missing"
    )

    proc = serve(cfg, log)
    try:
        wait_until(lambda: _job_states(db) == ["done"], 120, f"job done: {_job_states(db)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    exports = _exports(db)
    assert len(exports) == n
    assert set(dest.deliveries) == {e["sop_uid"] for e in exports}, "every instance arrived"
    assert len(dest.deliveries) == hold + (n - recorded), (
        "after the restart exactly the instances without a recorded confirmation were sent"
    )
    assert len(dest.deliveries) <= n + RESEND_BOUND
