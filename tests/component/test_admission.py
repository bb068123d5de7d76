"""Connection admission on the plain-TCP listener (dicom_node/admission.py), with real pynetdicom
peers and raw sockets on loopback: connections that never send an association request must not
lock senders out, are closed after their deadline and logged, and never delay shutdown."""

import socket
import threading
import time

from listener_support import (
    closed_by_peer,
    first_pdu_of_an_association_request,
    idle_connections,
    recording,
)
from tests_support import wait_until

from dicom_node.config import DestinationConfig
from dicom_node.export import echo, send_paths

#: Long enough that no idle connection times out during a test that must not rely on it.
NEVER_S = 600.0


def _to(node) -> DestinationConfig:
    return DestinationConfig(name="node", ae_title="LTDIFF", host="127.0.0.1", port=node.port)


def test_idle_connections_beyond_max_associations_do_not_lock_senders_out(start_node, br40_series):
    node = start_node(max_associations=2, association_request_timeout_s=NEVER_S)
    with idle_connections(node.port, 6):
        wait_until(lambda: node.server.pending_connections == 6, what="6 pending connections")
        ok, what = echo(_to(node), "PACS")
        assert ok, f"C-ECHO failed while idle connections were open: {what}"
        result = send_paths(_to(node), "PACS", br40_series)
        assert len(result.sent) == len(br40_series), result.failed
        # the sender got in while every idle connection was still open (none timed out)
        assert node.server.pending_connections == 6


def test_idle_connection_is_closed_after_the_deadline_and_logged(start_node):
    with recording() as log:
        node = start_node(association_request_timeout_s=0.5)
        with idle_connections(node.port, 1) as (idle,):
            assert closed_by_peer(idle), "the node must close a connection that sends nothing"
        wait_until(lambda: log.named("connection.idle_timeout"), what="connection.idle_timeout")
    (line,) = log.named("connection.idle_timeout")
    assert line["address"] == "127.0.0.1"
    assert "A-ASSOCIATE-RQ" in line["reason"]
    wait_until(lambda: node.server.pending_connections == 0, what="no pending connection")


def test_partial_association_request_holds_no_slot_and_times_out_with_bytes_counted(start_node):
    with recording() as log:
        node = start_node(association_request_timeout_s=0.5, max_associations=1)
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
            s.sendall(bytes([0x01, 0x00, 0, 0, 0x01, 0x00]) + b"x" * 10)  # 256-byte PDU, 10 sent
            assert closed_by_peer(s)
        wait_until(lambda: log.named("connection.idle_timeout"), what="connection.idle_timeout")
    (line,) = log.named("connection.idle_timeout")
    assert line["received_bytes"] == 16


def test_association_request_arriving_in_pieces_is_admitted_once_complete(start_node):
    rq = first_pdu_of_an_association_request()
    node = start_node(association_request_timeout_s=NEVER_S)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
        s.sendall(rq[:3])
        wait_until(lambda: node.server.pending_connections == 1, what="a pending connection")
        s.sendall(rq[3:20])
        assert node.server.pending_connections == 1, "admitted before the request was complete"
        s.sendall(rq[20:])
        reply = s.recv(1)
    assert reply == b"\x02", "expected an A-ASSOCIATE-AC PDU (type 0x02)"


def test_connections_beyond_the_pending_cap_are_refused_and_logged(start_node):
    with recording() as log:
        node = start_node(max_pending_connections=2, association_request_timeout_s=NEVER_S)
        with idle_connections(node.port, 2):
            wait_until(lambda: node.server.pending_connections == 2, what="2 pending")
            with idle_connections(node.port, 1) as (third,):
                assert closed_by_peer(third)
    (line,) = log.named("connection.refused")
    assert line["address"] == "127.0.0.1"
    assert "waiting to associate" in line["reason"]


def test_source_address_outside_the_allowed_networks_is_refused_and_logged(start_node):
    with recording() as log:
        node = start_node(allowed_addresses=("192.0.2.0/24",))
        ok, _ = echo(_to(node), "PACS")
        assert not ok
    (line,) = log.named("connection.refused")
    assert line == line | {"address": "127.0.0.1", "reason": "source address not allowed"}


def test_loopback_network_in_cidr_form_is_allowed(start_node):
    node = start_node(allowed_addresses=("192.0.2.0/24", "127.0.0.0/8"))
    ok, what = echo(_to(node), "PACS")
    assert ok, what


def test_node_stops_promptly_while_idle_connections_are_open(start_node):
    node = start_node(association_request_timeout_s=NEVER_S)
    with idle_connections(node.port, 4):
        wait_until(lambda: node.server.pending_connections == 4, what="4 pending connections")
        started = time.monotonic()
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        stopper.join(timeout=60)
        assert not stopper.is_alive(), "Node.stop() waited for connections that send nothing"
    assert time.monotonic() - started < 30
