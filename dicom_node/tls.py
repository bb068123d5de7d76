"""TLS contexts for the listener and the exporters, built from a `TLSConfig`.

The same function builds the context that `serve` uses and the one `check-config` (through
`config.check_runtime`) loads to validate the files, so what passes validation is what runs.
Every failure names the file it is about (`TLSSetupError.field`). A password-protected private
key is refused: OpenSSL would otherwise prompt for the password on the terminal.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module at run time; the type is enough here
    from dicom_node.config import TLSConfig

#: Oldest protocol either side speaks (TLS 1.0 and 1.1 are refused).
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class TLSSetupError(ValueError):
    """A TLS file cannot be used; `field` is the TLSConfig field it came from."""

    def __init__(self, field: str, path: Path | None, message: str) -> None:
        super().__init__(f"{field} = {path}: {message}")
        self.field = field
        self.path = path
        self.message = message


class _EncryptedKeyError(Exception):
    """Raised by the password callback: the private key is encrypted."""


def _refuse_password() -> bytes:
    raise _EncryptedKeyError


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def _check_readable(field: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TLSSetupError(field, path, f"cannot be read by this user ({exc.strerror})") from exc


def _check_certificate_file(path: Path) -> None:
    """Fail unless the file holds at least one PEM certificate (parsed, not just present)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise TLSSetupError(
            "certificate", path, f"no PEM certificate in this file ({_reason(exc)})"
        ) from exc


def make_ssl_context(tls: TLSConfig, server_side: bool) -> ssl.SSLContext:
    """The context for one side of a TLS association; raises TLSSetupError naming the file.

    Server side: `ca_certificates` is the only trust anchor for client certificates, which are
    required when `require_client_certificate` is set. Client side: `ca_certificates` (or the
    system's store when absent) verifies the peer; a client certificate is optional.
    """
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    ca = tls.ca_certificates
    if ca is not None:
        _check_readable("ca_certificates", ca)
        try:
            # cafile given: only this file is trusted, not the system's store
            ctx = ssl.create_default_context(purpose, cafile=str(ca))
        except ssl.SSLError as exc:
            raise TLSSetupError(
                "ca_certificates", ca, f"no usable PEM CA certificate ({_reason(exc)})"
            ) from exc
    else:
        ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = MINIMUM_TLS_VERSION
    if tls.certificate is not None and tls.private_key is not None:
        _check_readable("certificate", tls.certificate)
        _check_readable("private_key", tls.private_key)
        _check_certificate_file(tls.certificate)
        try:
            ctx.load_cert_chain(
                str(tls.certificate), str(tls.private_key), password=_refuse_password
            )
        except _EncryptedKeyError as exc:
            raise TLSSetupError(
                "private_key",
                tls.private_key,
                "the key is encrypted (password-protected); the node cannot ask for a "
                "password: use an unencrypted key readable only by the service user",
            ) from exc
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                message = f"does not belong to the certificate {tls.certificate}"
            else:
                message = f"not a usable PEM private key ({_reason(exc)})"
            raise TLSSetupError("private_key", tls.private_key, message) from exc
    if server_side:
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx
