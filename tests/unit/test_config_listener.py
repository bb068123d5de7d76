"""Listener configuration: allow-list entries that can match, admission limits, and TLS files
that are loaded (not just found) before the node starts."""

import os
import re
import shutil

import pytest
from listener_support import encrypt_key, self_signed

from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.config import ConfigError, check_runtime, parse_config, receiver_process_count


def _listener(**kw):
    return parse_config({"listener": kw}).listener


def test_allowed_addresses_accept_networks_in_cidr_form_and_single_addresses():
    listener = _listener(allowed_addresses=["127.0.0.0/8", "10.1.2.3", "2001:db8::/32"])
    assert listener.allowed_addresses == ("127.0.0.0/8", "10.1.2.3/32", "2001:db8::/32")


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("localhost", "not an IP address or a network in CIDR form"),
        ("pacs.example.org", "host names are not resolved"),
        ("10.1.2.3/8", "host bits are set (the network is 10.0.0.0/8)"),
        ("::ffff:10.1.2.3", "write it in its IPv4 form"),
        ("10.0.0.0/33", "not an IP address or a network in CIDR form"),
    ],
)
def test_allowed_addresses_that_can_never_match_are_config_errors(entry, why):
    with pytest.raises(ConfigError, match=re.escape(f"listener.allowed_addresses: {entry!r}: ")):
        _listener(allowed_addresses=[entry])
    with pytest.raises(ConfigError, match=re.escape(why)):
        _listener(allowed_addresses=[entry])


def test_admission_limits_have_defaults_and_are_validated():
    listener = _listener()
    assert listener.association_request_timeout_s == 10.0
    assert listener.max_pending_connections == 32
    with pytest.raises(ConfigError, match=r"listener\.association_request_timeout_s = 0"):
        _listener(association_request_timeout_s=0)
    with pytest.raises(ConfigError, match=r"listener\.max_pending_connections = 0"):
        _listener(max_pending_connections=0)


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def openssl():
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl is not installed")
    return path


@pytest.fixture
def pair(tmp_path, openssl):
    return self_signed(openssl, tmp_path, "node", "localhost")


def _dest(tls):
    return {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "tls": tls}


def _tls_config(tmp_path, listener_tls=None, dest_tls=None):
    data = {"node": {"state_dir": str(tmp_path / "state")}}
    if listener_tls is not None:
        data["listener"] = {"tls": {"enabled": True, **listener_tls}}
    if dest_tls is not None:
        data["destinations"] = [_dest({"enabled": True, **dest_tls})]
    return parse_config(data)


def test_destination_tls_needs_only_a_ca_file(tmp_path, pair):
    _, cert = pair
    config = _tls_config(tmp_path, dest_tls={"ca_certificates": str(cert)})
    assert config.destinations[0].tls.certificate is None
    check_runtime(config)


def test_destination_client_certificate_needs_its_key(tmp_path, pair):
    _, cert = pair
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls\.private_key = None"):
        _tls_config(tmp_path, dest_tls={"certificate": str(cert)})


def test_listener_tls_files_that_load_pass(tmp_path, pair):
    key, cert = pair
    config = _tls_config(tmp_path, {"certificate": str(cert), "private_key": str(key)})
    assert check_runtime(config) is not None


def test_key_of_another_certificate_is_a_config_error(tmp_path, pair, openssl):
    _, cert = pair
    other_key, _ = self_signed(openssl, tmp_path, "other", "other")
    config = _tls_config(tmp_path, {"certificate": str(cert), "private_key": str(other_key)})
    with pytest.raises(ConfigError, match=r"listener\.tls\.private_key = .*does not belong"):
        check_runtime(config)


def test_encrypted_key_is_a_config_error_and_never_prompts(tmp_path, pair, openssl):
    key, cert = pair
    encrypted = encrypt_key(openssl, key, tmp_path / "encrypted.key")
    config = _tls_config(tmp_path, {"certificate": str(cert), "private_key": str(encrypted)})
    # without a password callback OpenSSL asks on the terminal (start-up hangs when there is
    # one) or reports a PEM error that does not say "encrypted" (when there is none)
    with pytest.raises(ConfigError, match=r"listener\.tls\.private_key = .*encrypted"):
        check_runtime(config)


@pytest.mark.parametrize("field", ["certificate", "private_key", "ca_certificates"])
def test_garbage_tls_file_is_a_config_error_naming_the_key(tmp_path, pair, field):
    key, cert = pair
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    files = {"certificate": str(cert), "private_key": str(key), "ca_certificates": str(cert)}
    files[field] = str(garbage)
    config = _tls_config(tmp_path, {**files, "require_client_certificate": True})
    with pytest.raises(ConfigError, match=re.escape(f"listener.tls.{field} = {garbage}")):
        check_runtime(config)


def test_garbage_ca_file_of_a_destination_is_a_config_error(tmp_path):
    garbage = tmp_path / "ca.pem"
    garbage.write_text("junk\n")
    config = _tls_config(tmp_path, dest_tls={"ca_certificates": str(garbage)})
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls\.ca_certificates = "):
        check_runtime(config)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file regardless of mode"
)
def test_key_the_service_user_cannot_read_is_a_config_error(tmp_path, pair):
    key, cert = pair
    key.chmod(0o000)
    config = _tls_config(tmp_path, {"certificate": str(cert), "private_key": str(key)})
    with pytest.raises(ConfigError, match=r"listener\.tls\.private_key = .*cannot be read"):
        check_runtime(config)


def test_ca_file_without_required_client_certificates_is_a_warning(tmp_path, pair):
    key, cert = pair
    tls = {"certificate": str(cert), "private_key": str(key), "ca_certificates": str(cert)}
    warnings = check_runtime(_tls_config(tmp_path, tls))
    assert any("require_client_certificate = false" in w for w in warnings), warnings


def test_check_config_and_serve_exit_78_on_a_mismatched_key(tmp_path, pair, openssl, capsys):
    _, cert = pair
    other_key, _ = self_signed(openssl, tmp_path, "other", "other")
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[listener.tls]\nenabled = true\ncertificate = "{cert}"\nprivate_key = "{other_key}"\n'
    )
    assert main(["check-config", "-c", str(cfg)]) == EXIT_CONFIG
    assert "listener.tls.private_key" in capsys.readouterr().err
    assert main(["serve", "-c", str(cfg)]) == EXIT_CONFIG


def test_receiver_processes_default_to_auto_and_accept_a_count():
    assert _listener().receiver_processes == "auto"
    assert _listener(receiver_processes="auto").receiver_processes == "auto"
    assert _listener(receiver_processes=0).receiver_processes == 0
    assert _listener(receiver_processes=3).receiver_processes == 3


@pytest.mark.parametrize("value", [-1, 65, "four", "AUTO", True, 2.0])
def test_receiver_processes_out_of_range_or_not_a_count_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"listener\.receiver_processes = .*expected \"auto\""):
        _listener(receiver_processes=value)


@pytest.mark.parametrize(
    ("setting", "cpus", "expected"),
    [
        ("auto", 1, 0),  # one core: the associations stay in the main process
        ("auto", 2, 2),
        ("auto", 16, 4),  # capped: beyond it the disk and the database limit, not the CPU
        (0, 8, 0),
        (1, 8, 0),  # one receiver process would only add a hop
        (3, 1, 3),  # an explicit count is taken as it is
    ],
)
def test_receiver_process_count_resolves_auto_to_the_usable_cores_capped(setting, cpus, expected):
    assert receiver_process_count(setting, cpus) == expected
