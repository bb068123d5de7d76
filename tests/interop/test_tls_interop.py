"""Mutual TLS with DCMTK as the real peer: a modality with a certificate from the site's CA sends
a series over TLS while idle connections are open; one without a certificate is refused and the
failed handshake is logged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from listener_support import idle_connections, issue, recording, self_signed
from peer_support import dcmtk_env
from tests_support import require_tool, wait_until, write_series

from dicom_node.config import TLSConfig

pytestmark = pytest.mark.interop


def _dcmtk(tool: str, port: int, tls: list[str], files: list[Path] = ()):
    return subprocess.run(
        [
            tool,
            *tls,
            "-aet",
            "MODALITY",
            "-aec",
            "LTDIFF",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dcmtk_over_mutual_tls_stores_a_series_and_anonymous_tls_is_refused(
    tmp_path, start_node, storescu, echoscu
):
    openssl = require_tool("openssl")
    ca = self_signed(openssl, tmp_path, "ca", "Test CA")
    server_key, server_cert = issue(openssl, tmp_path, "server", "localhost", ca)
    client_key, client_cert = issue(openssl, tmp_path, "modality", "modality", ca)
    tls = TLSConfig(
        enabled=True,
        certificate=server_cert,
        private_key=server_key,
        ca_certificates=ca[1],
        require_client_certificate=True,
    )
    series = write_series(tmp_path / "src", n_slices=4, uid_seed="tls-interop")
    with recording() as log:
        node = start_node(tls=tls, association_request_timeout_s=600.0)
        with idle_connections(node.port, 3):
            wait_until(lambda: node.server.pending_connections == 3, what="3 pending")
            client = ["+tls", str(client_key), str(client_cert), "+cf", str(ca[1])]
            r = _dcmtk(storescu, node.port, client, series)
            assert r.returncode == 0, r.stderr
            anonymous = _dcmtk(echoscu, node.port, ["+tla", "+cf", str(ca[1])])
            assert anonymous.returncode != 0, "TLS without a client certificate must be refused"
        wait_until(lambda: log.named("connection.tls_failed"), what="connection.tls_failed")
    (series_row,) = node.store.receiving_series()
    assert series_row.n_instances == len(series)
    (failed,) = log.named("connection.tls_failed")
    assert failed["address"] == "127.0.0.1" and failed["reason"], failed
