"""Admission rules of the listener that need no socket: allow-list matching, how much of a first
PDU to wait for, and the throttle of repeated refusal lines."""

from ipaddress import ip_network

import pytest

from dicom_node.admission import (
    FIRST_PDU_WINDOW,
    PDU_HEADER_BYTES,
    _Throttle,
    address_allowed,
    first_pdu_bytes,
    peer_ip,
)

NETWORKS = (ip_network("10.1.0.0/16"), ip_network("192.0.2.7/32"), ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.200.3", True),
        ("10.2.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped peer on a dual-stack socket
        ("::ffff:10.9.2.3", False),
        ("fe80::1%eth0", False),
        ("not-an-address", False),
    ],
)
def test_peer_addresses_match_networks_in_cidr_form(host, allowed):
    assert address_allowed(host, NETWORKS) is allowed


def test_no_networks_allows_any_address():
    assert address_allowed("203.0.113.9", ())


def test_ipv4_mapped_peer_is_seen_as_ipv4():
    assert str(peer_ip("::ffff:192.0.2.7")) == "192.0.2.7"


def test_first_pdu_is_awaited_whole_up_to_the_window():
    small = bytes([0x01, 0x00]) + (300).to_bytes(4, "big")
    assert first_pdu_bytes(small) == PDU_HEADER_BYTES + 300
    huge = bytes([0x01, 0x00]) + (2**32 - 1).to_bytes(4, "big")
    assert first_pdu_bytes(huge) == PDU_HEADER_BYTES + FIRST_PDU_WINDOW


def test_refusal_lines_are_throttled_per_reason_and_count_what_was_left_out():
    throttle = _Throttle(interval_s=3600)
    assert throttle("address") == 0
    assert throttle("address") is None
    assert throttle("address") is None
    assert throttle("too many") == 0, "another reason has its own budget"
    throttle.interval_s = 0
    assert throttle("address") == 2
