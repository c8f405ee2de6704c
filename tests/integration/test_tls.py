"""DICOM TLS: dcmtk ``storescu +tls`` against the node's listener, and export to ``storescp +tls``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import ExportSettings, Peer, TLSSettings
from dicom_node.errors import DestinationUnreachable
from dicom_node.export import send
from dicom_node.tls import TLSConfigError, client_context, server_context
from inference.phantom import make_dicom
from tests.fixtures.peers import Listener, StoreSCP, TLSFiles, echoscu, storescu

pytestmark = pytest.mark.integration


def _listener_tls(tls: TLSFiles, require_client_cert: bool) -> dict[str, object]:
    return {"enabled": True, "cert_file": str(tls.server_cert), "key_file": str(tls.server_key),
            "ca_file": str(tls.ca_cert), "require_client_cert": require_client_cert}


def _client_tls(tls: TLSFiles) -> list[str]:
    return ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_storescu_tls_to_listener(node_listener: Callable[..., Listener], tls_files: TLSFiles,
                                  tmp_path: Path, require_client_cert: bool) -> None:
    node = node_listener(listener={"tls": _listener_tls(tls_files, require_client_cert)})
    ds = make_dicom(tmp_path / "a.dcm", shape=(128, 128))

    proc = storescu(node.port, [tmp_path / "a.dcm"], extra=_client_tls(tls_files))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [j.sop_instance_uid for j in node.job_rows()] == [ds.SOPInstanceUID]

    plain = echoscu(node.port)  # no TLS: the handshake fails, nothing is accepted
    assert plain.returncode != 0
    # TLS without a client certificate: refused exactly when the listener requires one
    anonymous = echoscu(node.port, extra=["+tla", "+cf", str(tls_files.ca_cert)])
    assert (anonymous.returncode != 0) == require_client_cert, anonymous.stdout + anonymous.stderr
    assert len(node.associations()) == (1 if require_client_cert else 2)


def test_export_over_tls(storescp: Callable[..., StoreSCP], tls_files: TLSFiles) -> None:
    dest = storescp(extra=["+xa", "+tls", str(tls_files.server_key), str(tls_files.server_cert),
                           "+cf", str(tls_files.ca_cert)])
    ds = make_dicom(shape=(64, 64))
    tls = TLSSettings(enabled=True, ca_file=tls_files.ca_cert, cert_file=tls_files.client_cert,
                      key_file=tls_files.client_key)
    send([ds], Peer.parse(dest.address), ExportSettings(network_timeout_s=10, tls=tls))
    assert [dcmread(f).SOPInstanceUID for f in dest.files()] == [ds.SOPInstanceUID]

    # Without TLS the same destination cannot be reached.
    with pytest.raises(DestinationUnreachable):
        send([ds], Peer.parse(dest.address), ExportSettings(network_timeout_s=5))


def test_export_refuses_untrusted_server(storescp: Callable[..., StoreSCP], tls_files: TLSFiles) -> None:
    dest = storescp(extra=["+tls", str(tls_files.server_key), str(tls_files.server_cert),
                           "+cf", str(tls_files.ca_cert)])
    ds = make_dicom(shape=(32, 32))
    client = {"enabled": True, "cert_file": tls_files.client_cert, "key_file": tls_files.client_key}
    wrong_ca = TLSSettings(**client, ca_file=tls_files.client_cert)  # did not sign the server's certificate
    with pytest.raises(DestinationUnreachable, match="TLS handshake failed \\(CERTIFICATE_VERIFY_FAILED\\)"):
        send([ds], Peer.parse(dest.address), ExportSettings(network_timeout_s=5, tls=wrong_ca))
    assert dest.files() == []  # the reason is said, not only logged by pynetdicom
    right_ca = TLSSettings(**client, ca_file=tls_files.ca_cert)  # the right CA: the same call succeeds
    send([ds], Peer.parse(dest.address), ExportSettings(network_timeout_s=5, tls=right_ca))
    assert len(dest.files()) == 1


def test_export_trusts_only_the_configured_ca(tls_files: TLSFiles) -> None:
    """With export.tls.ca_file set, a destination's certificate from any public CA must not pass for the
    PACS: the system trust store (145 certificates on a Debian machine) was loaded as well."""
    import ssl

    ctx = client_context(TLSSettings(enabled=True, ca_file=tls_files.ca_cert))
    assert ctx is not None and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1


def test_tls_settings_errors_name_the_key(tmp_path: Path, tls_files: TLSFiles) -> None:
    assert server_context(TLSSettings()) is None and client_context(TLSSettings()) is None
    with pytest.raises(TLSConfigError, match="listener.tls.cert_file"):
        server_context(TLSSettings(enabled=True, key_file=tls_files.server_key))
    with pytest.raises(TLSConfigError, match="does not exist"):
        server_context(TLSSettings(enabled=True, cert_file=tmp_path / "missing.crt",
                                   key_file=tls_files.server_key))
    with pytest.raises(TLSConfigError, match="require_client_cert"):
        server_context(TLSSettings(enabled=True, cert_file=tls_files.server_cert,
                                   key_file=tls_files.server_key, require_client_cert=True))
    with pytest.raises(TLSConfigError, match="set together"):
        client_context(TLSSettings(enabled=True, cert_file=tls_files.client_cert))
    with pytest.raises(TLSConfigError, match="certificate/key"):
        server_context(TLSSettings(enabled=True, cert_file=tls_files.server_cert,
                                   key_file=tls_files.client_key))


def test_unusable_export_tls_settings_stop_the_worker_start_and_are_never_retried(tmp_path: Path,
                                                                                   tiny_bundle: Path) -> None:
    """A typo in export.tls.ca_file was found only at the first delivery, after the model had run, logged as a
    crash and retried twenty times; now the worker does not start, and a send names it as permanent."""
    from dicom_node.config import Settings
    from dicom_node.db import make_engine
    from dicom_node.errors import ExportRefused
    from dicom_node.worker import Worker

    tls = {"enabled": True, "ca_file": str(tmp_path / "typo.crt")}
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "model": {"path": str(tiny_bundle), "device": "cpu"},
                                        "export": {"destinations": ["PACS@127.0.0.1:104"], "tls": tls}})
    engine = make_engine(settings.db_url)
    with pytest.raises(TLSConfigError, match=r"export.tls.ca_file.*typo.crt.*does not exist"):
        Worker(settings, engine)
    engine.dispose()
    with pytest.raises(ExportRefused, match="export TLS settings") as err:
        send([make_dicom(shape=(32, 32))], Peer.parse("PACS@127.0.0.1:104"), settings.export)
    assert not err.value.retryable
