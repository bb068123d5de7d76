"""TLS on the listener and on export (PS3.15 Annex B style: a TLS-wrapped DICOM association)."""

import subprocess

import pytest
from tests_support import require_tool

from dicom_node.config import DestinationConfig, TLSConfig
from dicom_node.export import echo, send_paths


@pytest.fixture
def certificate(tmp_path):
    openssl = require_tool("openssl")
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def test_tls_listener_accepts_tls_peers_and_refuses_plain_ones(
    start_node, certificate, br40_series
):
    key, cert = certificate
    node = start_node(tls=TLSConfig(enabled=True, certificate=cert, private_key=key))
    tls_dest = DestinationConfig(
        name="node",
        ae_title="LTDIFF",
        host="127.0.0.1",
        port=node.port,
        tls=TLSConfig(enabled=True, ca_certificates=cert),
    )
    ok, what = echo(tls_dest, "PACS")
    assert ok, what
    assert len(send_paths(tls_dest, "PACS", br40_series).sent) == len(br40_series)
    plain = DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)
    ok, _ = echo(plain, "PACS")
    assert not ok, "a plain-TCP peer must not get an association on a TLS listener"


def test_tls_client_refuses_a_server_it_does_not_trust(start_node, certificate, tmp_path):
    key, cert = certificate
    node = start_node(tls=TLSConfig(enabled=True, certificate=cert, private_key=key))
    other = tmp_path / "other-ca.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(tmp_path / "o.key"),
            "-out",
            str(other),
            "-subj",
            "/CN=other",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    dest = DestinationConfig(
        name="node",
        ae_title="LTDIFF",
        host="127.0.0.1",
        port=node.port,
        tls=TLSConfig(enabled=True, ca_certificates=other),
    )
    ok, _ = echo(dest, "PACS")
    assert not ok
