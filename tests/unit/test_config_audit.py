"""The [audit] configuration: off by default, errors name the key, check-config opens the file
and loads the syslog TLS files, and warns about unencrypted UDP."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import (
    AuditConfig,
    ConfigError,
    SyslogTransport,
    check_runtime,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_audit_is_off_by_default_and_the_shipped_file_says_so():
    assert parse_config({}).audit == AuditConfig()
    assert AuditConfig().enabled is False
    shipped = load_config(REPO / "config" / "ltdiff-node.toml")
    assert shipped.audit == AuditConfig()


def test_audit_outputs_are_parsed_with_transport_default_ports(tmp_path):
    cfg = parse_config(
        {
            "audit": {
                "enabled": True,
                "path": "audit/atna.log",
                "source_id": "CT-NODE-1",
                "enterprise_site_id": "HOSPITAL",
                "queue_size": 500,
                "syslog": {"host": "arr.hospital.example"},
            }
        },
        tmp_path,
    ).audit
    assert cfg.path == tmp_path / "audit" / "atna.log"
    assert (cfg.source_id, cfg.enterprise_site_id, cfg.queue_size) == ("CT-NODE-1", "HOSPITAL", 500)
    assert cfg.syslog is not None
    assert (cfg.syslog.transport, cfg.syslog.port) == (SyslogTransport.UDP, 514)
    assert not cfg.syslog.tls.enabled
    tls = parse_config(
        {"audit": {"enabled": True, "syslog": {"host": "arr", "transport": "tls"}}}
    ).audit.syslog
    assert tls is not None
    assert (tls.port, tls.tls.enabled) == (6514, True), "transport tls turns TLS on, port 6514"


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"enabled": True}, "audit.enabled = true: say where the messages go, audit.path"),
        ({"enabled": "yes"}, "audit.enabled = 'yes': expected true or false"),
        ({"path": ""}, "audit.path = '': expected a file path"),
        ({"source_id": " "}, "audit.source_id = ' ': expected a non-empty string"),
        ({"queue_size": 0}, "audit.queue_size = 0: expected an integer from 1"),
        ({"syslog": {"port": 514}}, "audit.syslog.host: required"),
        ({"syslog": {"host": "arr", "transport": "tcp"}}, "audit.syslog.transport = 'tcp'"),
        ({"syslog": {"host": "arr", "port": 0}}, "audit.syslog.port = 0"),
        (
            {"syslog": {"host": "arr", "transport": "tls", "tls": {"enabled": False}}},
            "audit.syslog.tls.enabled = false: transport = 'tls' needs TLS",
        ),
        (
            {"syslog": {"host": "arr", "tls": {"enabled": True}}},
            "audit.syslog.tls: TLS needs transport = 'tls'",
        ),
        (
            {"syslog": {"host": "arr", "transport": "tls", "tls": {"ca_certificates": "nope.pem"}}},
            "audit.syslog.tls.ca_certificates",
        ),
        ({"syslog": {"host": "arr", "facility": 4}}, "audit.syslog: unknown key(s) facility"),
        ({"pth": "x"}, "audit: unknown key(s) pth"),
    ],
)
def test_invalid_audit_settings_name_the_key(audit, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"audit": audit}, tmp_path)
    assert message in str(info.value)


def _runtime(tmp_path: Path, audit: dict[str, object]) -> list[str]:
    return check_runtime(
        parse_config({"node": {"state_dir": str(tmp_path / "state")}, "audit": audit}, tmp_path)
    )


def test_check_config_opens_the_audit_file_and_names_the_key_when_it_cannot(tmp_path):
    _runtime(tmp_path, {"enabled": True, "path": "audit.log"})
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match=r"audit\.path = .*cannot be opened for appending"):
        _runtime(tmp_path, {"enabled": True, "path": "no-such-dir/audit.log"})


def test_check_config_warns_that_udp_syslog_is_unencrypted(tmp_path):
    warnings = _runtime(tmp_path, {"enabled": True, "syslog": {"host": "127.0.0.1"}})
    assert any("audit.syslog.transport = 'udp'" in w and "unencrypted" in w for w in warnings)
    assert not any("audit" in w for w in _runtime(tmp_path, {"syslog": {"host": "127.0.0.1"}}))
