"""TLS on the listener and on export (PS3.15 Annex B style: a TLS-wrapped DICOM association)."""

import subprocess

import pytest
from tests_support import require_tool

from dicom_node.config import DestinationConfig, TLSConfig
from dicom_node.export import echo, send_paths


def self_signed(openssl: str, directory, name: str, cn: str) -> tuple:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
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
            f"/CN={cn}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


@pytest.fixture
def openssl():
    return require_tool("openssl")


@pytest.fixture
def certificate(tmp_path, openssl):
    return self_signed(openssl, tmp_path, "node", "localhost")


def _node_dest(node, tls: TLSConfig) -> DestinationConfig:
    return DestinationConfig(
        name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port, tls=tls
    )


def test_tls_listener_accepts_tls_peers_and_refuses_plain_ones(
    start_node, certificate, br40_series
):
    key, cert = certificate
    node = start_node(tls=TLSConfig(enabled=True, certificate=cert, private_key=key))
    tls_dest = _node_dest(node, TLSConfig(enabled=True, ca_certificates=cert))
    ok, what = echo(tls_dest, "PACS")
    assert ok, what
    assert len(send_paths(tls_dest, "PACS", br40_series).sent) == len(br40_series)
    plain = _node_dest(node, TLSConfig())
    ok, _ = echo(plain, "PACS")
    assert not ok, "a plain-TCP peer must not get an association on a TLS listener"


def test_tls_client_refuses_a_server_it_does_not_trust(start_node, certificate, tmp_path, openssl):
    key, cert = certificate
    node = start_node(tls=TLSConfig(enabled=True, certificate=cert, private_key=key))
    _, other = self_signed(openssl, tmp_path, "other", "other")
    dest = _node_dest(node, TLSConfig(enabled=True, ca_certificates=other))
    ok, _ = echo(dest, "PACS")
    assert not ok
