"""DICOM TLS (PS3.15 Annex B, BCP 195): ``ssl.SSLContext`` objects for the listener and for export.

Both sides require TLS 1.2 or newer. The listener presents ``cert_file``/``key_file`` and, with
``require_client_cert``, demands a client certificate signed by ``ca_file``. Export verifies the
destination's certificate against ``ca_file`` (host name included) and presents its own
certificate when one is configured (mutual TLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config import TLSSettings
from dicom_node.errors import PermanentError


class TLSConfigError(PermanentError):
    """The TLS configuration is incomplete or its files cannot be read."""


def _check_file(path: Path | None, key: str) -> Path:
    if path is None:
        raise TLSConfigError(f"TLS is enabled but '{key}' is not set")
    if not Path(path).is_file():
        raise TLSConfigError(f"'{key}': file {path} does not exist")
    return Path(path)


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The listener's context, or ``None`` when ``tls.enabled`` is false.

    Raises
    ------
    TLSConfigError
        A required file is not set, missing, or not a valid PEM certificate/key pair.
    """
    if not isinstance(tls, TLSSettings):
        raise TypeError('Argument "tls" must be a TLSSettings.')
    if not tls.enabled:
        return None
    cert = _check_file(tls.cert_file, "listener.tls.cert_file")
    key = _check_file(tls.key_file, "listener.tls.key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=_check_file(tls.ca_file, "listener.tls.ca_file"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"listener TLS certificate/key: {exc}") from exc
    if tls.require_client_cert:
        if tls.ca_file is None:
            raise TLSConfigError("'listener.tls.require_client_cert' needs 'listener.tls.ca_file'")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The export side's context, or ``None`` when ``tls.enabled`` is false.

    With ``ca_file`` only that CA verifies the destination (a hospital CA: a certificate from any public CA
    must not pass for the PACS); without it, the system trust store.

    Raises
    ------
    TLSConfigError
        A configured file is missing or invalid, or only one of cert/key is set.
    """
    if not isinstance(tls, TLSSettings):
        raise TypeError('Argument "tls" must be a TLSSettings.')
    if not tls.enabled:
        return None
    try:
        if tls.ca_file is not None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=_check_file(tls.ca_file, "export.tls.ca_file"))
        else:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if (tls.cert_file is None) != (tls.key_file is None):
            raise TLSConfigError("'export.tls.cert_file' and 'export.tls.key_file' must be set together")
        if tls.cert_file is not None:
            ctx.load_cert_chain(certfile=_check_file(tls.cert_file, "export.tls.cert_file"),
                                keyfile=_check_file(tls.key_file, "export.tls.key_file"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"export TLS certificate/key: {exc}") from exc
    return ctx
