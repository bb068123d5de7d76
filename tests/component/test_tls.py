"""TLS on the listener and on export (PS3.15 Annex B style: a TLS-wrapped DICOM association)."""

import socket
import ssl
import threading
from types import SimpleNamespace

import pytest
from listener_support import (
    closed_by_peer,
    first_pdu_of_an_association_request,
    idle_connections,
    issue,
    recording,
    self_signed,
)
from tests_support import require_tool, wait_until

from dicom_node.config import DestinationConfig, TLSConfig, parse_config
from dicom_node.export import echo, send_paths


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


# ---- mutual TLS and admission of TLS connections (dicom_node/admission.py) -------------------

NEVER_S = 600.0  # no idle connection times out during a test that must not rely on it


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server and a client certificate signed by it, and a client of another CA (made
    once per module: key generation is the slow part of these tests)."""
    openssl = require_tool("openssl")
    tmp_path = tmp_path_factory.mktemp("pki")
    ca = self_signed(openssl, tmp_path, "ca", "Test CA")
    other_ca = self_signed(openssl, tmp_path, "other-ca", "Other CA")
    return SimpleNamespace(
        ca=ca,
        server=issue(openssl, tmp_path, "server", "localhost", ca),
        client=issue(openssl, tmp_path, "client", "pacs", ca),
        stranger=issue(openssl, tmp_path, "stranger", "pacs", other_ca),
    )


def _mutual_tls_node(start_node, pki, **listener):
    key, cert = pki.server
    tls = TLSConfig(
        enabled=True,
        certificate=cert,
        private_key=key,
        ca_certificates=pki.ca[1],
        require_client_certificate=True,
    )
    return start_node(tls=tls, **listener)


def _client(node, pki, identity: tuple | None) -> DestinationConfig:
    key, cert = identity if identity else (None, None)
    tls = TLSConfig(enabled=True, ca_certificates=pki.ca[1], certificate=cert, private_key=key)
    return _node_dest(node, tls)


def _client_context(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca[1]))
    ctx.load_cert_chain(str(pki.client[1]), str(pki.client[0]))
    return ctx


def test_mutual_tls_admits_only_ca_signed_clients_and_logs_failed_handshakes(start_node, pki):
    with recording() as log:
        node = _mutual_tls_node(start_node, pki)
        ok, what = echo(_client(node, pki, pki.client), "PACS")
        assert ok, what
        assert not echo(_client(node, pki, None), "PACS")[0], "no client certificate: refused"
        assert not echo(_client(node, pki, pki.stranger), "PACS")[0], "other CA: refused"
        wait_until(lambda: len(log.named("connection.tls_failed")) == 2, what="2 tls_failed")
    no_cert, stranger = log.named("connection.tls_failed")
    assert no_cert["address"] == stranger["address"] == "127.0.0.1"
    assert "CERTIFICATE" in no_cert["reason"].upper(), no_cert
    assert "UNKNOWN_CA" in stranger["reason"].upper() or "verif" in stranger["reason"], stranger


def test_idle_connections_do_not_block_the_tls_listener(start_node, pki):
    node = _mutual_tls_node(start_node, pki, association_request_timeout_s=NEVER_S)
    with idle_connections(node.port, 3):
        wait_until(lambda: node.server.pending_connections == 3, what="3 pending connections")
        ok, what = echo(_client(node, pki, pki.client), "PACS")
        assert ok, f"a TLS client with a valid certificate waited for idle connections: {what}"
        assert node.server.pending_connections == 3, "the echo got in while they were all open"


def test_idle_connection_on_the_tls_listener_is_closed_after_the_deadline_and_logged(
    start_node, pki
):
    with recording() as log:
        node = _mutual_tls_node(start_node, pki, association_request_timeout_s=0.5)
        with idle_connections(node.port, 1) as (idle,):
            assert closed_by_peer(idle)
        wait_until(lambda: log.named("connection.idle_timeout"), what="connection.idle_timeout")
    (line,) = log.named("connection.idle_timeout")
    assert line["address"] == "127.0.0.1"
    assert "TLS handshake" in line["reason"]


def test_port_check_on_the_tls_listener_is_logged_as_closed_not_as_a_failed_handshake(
    start_node, pki
):
    with recording() as log:
        node = _mutual_tls_node(start_node, pki)
        socket.create_connection(("127.0.0.1", node.port), timeout=30).close()
        wait_until(lambda: log.named("connection.closed"), what="connection.closed")
    assert "before a TLS handshake" in log.named("connection.closed")[0]["reason"]
    assert not log.named("connection.tls_failed")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_clients_are_refused_by_the_listener(start_node, pki):
    with recording() as log:
        node = _mutual_tls_node(start_node, pki)
        old = _client_context(pki)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as raw:
            with pytest.raises(ssl.SSLError):
                old.wrap_socket(raw, server_hostname="localhost")
        wait_until(lambda: log.named("connection.tls_failed"), what="connection.tls_failed")
    (line,) = log.named("connection.tls_failed")
    assert "PROTOCOL" in line["reason"].upper(), line


def test_address_outside_the_allow_list_is_refused_before_any_tls_handshake(start_node, pki):
    with recording() as log:
        node = _mutual_tls_node(start_node, pki, allowed_addresses=("192.0.2.0/24",))
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                _client_context(pki).wrap_socket(raw, server_hostname="localhost")
        wait_until(lambda: log.named("connection.refused"), what="connection.refused")
    assert log.named("connection.refused")[0]["address"] == "127.0.0.1"
    assert not log.named("connection.tls_failed"), "no handshake may start for that address"


def test_tls_association_request_arriving_in_pieces_is_admitted_once_complete(start_node, pki):
    rq = first_pdu_of_an_association_request()
    node = _mutual_tls_node(start_node, pki, association_request_timeout_s=NEVER_S)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as raw:
        with _client_context(pki).wrap_socket(raw, server_hostname="localhost") as s:
            for piece in (rq[:2], rq[2:9], rq[9:]):
                s.sendall(piece)
            assert s.recv(1) == b"\x02", "expected an A-ASSOCIATE-AC PDU (type 0x02)"


def test_node_stops_promptly_while_idle_connections_wait_on_the_tls_listener(start_node, pki):
    node = _mutual_tls_node(start_node, pki, association_request_timeout_s=NEVER_S)
    with idle_connections(node.port, 2):
        wait_until(lambda: node.server.pending_connections == 2, what="2 pending connections")
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        stopper.join(timeout=60)
        assert not stopper.is_alive(), "Node.stop() waited for an idle TLS connection"


def test_destination_tls_table_with_only_a_ca_file_connects_to_a_tls_listener(
    start_node, certificate
):
    key, cert = certificate
    node = start_node(tls=TLSConfig(enabled=True, certificate=cert, private_key=key))
    config = parse_config(
        {
            "destinations": [
                {
                    "name": "node",
                    "ae_title": "LTDIFF",
                    "host": "127.0.0.1",
                    "port": node.port,
                    "tls": {"enabled": True, "ca_certificates": str(cert)},
                }
            ]
        }
    )
    ok, what = echo(config.destination("node"), "PACS")
    assert ok, what
