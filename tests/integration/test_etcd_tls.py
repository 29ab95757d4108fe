"""TLS errors that say what to set: a handshake etcd or the reconciler refuses (the
server's certificate not trusted, the wrong CA, no client certificate or a foreign one)
names the setting to fix in one line, instead of "unreachable". A real etcd serving TLS
with client-certificate authentication (certificates made by the fixture with openssl)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.adapters.store import EtcdStore, StoreAccessDenied, StoreUnavailable
from reconciler.cli import main
from reconciler.core.settings import EtcdSettings
from tests.fixtures.etcd import EtcdFactory, EtcdServer, TlsFiles


@pytest.fixture
def server(etcd_factory: EtcdFactory) -> EtcdServer:
    return etcd_factory(tls=True)


@pytest.fixture
def foreign(tmp_path: Path) -> TlsFiles:
    """Another CA, and a client certificate it signed: etcd trusts neither."""
    return TlsFiles.create(tmp_path / "foreign")


def cases(settings: EtcdSettings, foreign: TlsFiles) -> dict[str, tuple[EtcdSettings, str]]:
    """name -> (settings, what the error must name)."""
    return {
        "no CA (system roots)": (replace(settings, ca=None), "RECONCILER_ETCD_CA"),
        "the wrong CA": (replace(settings, ca=str(foreign.ca)), "RECONCILER_ETCD_CA"),
        "no client certificate": (replace(settings, cert=None, key=None),
                                  "RECONCILER_ETCD_CERT"),
        "a foreign client certificate": (replace(settings, cert=str(foreign.client_cert),
                                                 key=str(foreign.client_key)),
                                         "RECONCILER_ETCD_CERT"),
    }


CASES = ["no CA (system roots)", "the wrong CA", "no client certificate",
         "a foreign client certificate"]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_handshake_says_so_and_names_the_setting(
        server: EtcdServer, foreign: TlsFiles, case: str) -> None:
    settings, setting = cases(replace(server.settings(), timeout=2.0), foreign)[case]
    with EtcdStore(settings) as store, pytest.raises(StoreAccessDenied) as caught:
        store.read_head()
    message = str(caught.value)
    assert "TLS handshake failed" in message
    assert setting in message
    assert "unreachable" not in message
    assert "\n" not in message


def test_plaintext_to_a_tls_etcd_hints_at_the_ca(server: EtcdServer) -> None:
    plain = replace(server.settings(), ca=None, cert=None, key=None, timeout=2.0)
    with EtcdStore(plain) as store, pytest.raises(StoreUnavailable, match="RECONCILER_ETCD_CA"):
        store.read_head()


def env_of(settings: EtcdSettings) -> dict[str, str]:
    env = {"RECONCILER_ETCD_ENDPOINTS": ",".join(settings.endpoints),
           "RECONCILER_ETCD_PREFIX": settings.prefix,
           "RECONCILER_NAMESPACE": settings.namespace, "RECONCILER_ETCD_TIMEOUT": "2"}
    for name, value in (("CA", settings.ca), ("CERT", settings.cert), ("KEY", settings.key)):
        if value:
            env[f"RECONCILER_ETCD_{name}"] = value
    return env


@pytest.mark.parametrize("case", CASES)
def test_a_command_prints_one_line_naming_the_setting_and_exits_2(
        server: EtcdServer, foreign: TlsFiles, case: str) -> None:
    settings, setting = cases(server.settings(), foreign)[case]
    result = CliRunner().invoke(main, ["history"], env=env_of(settings),
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert setting in lines[0]
    assert "TLS handshake failed" in lines[0]


def test_the_right_files_work(server: EtcdServer) -> None:
    result = CliRunner().invoke(main, ["history"], env=env_of(server.settings()),
                                catch_exceptions=False)
    # etcd answered over TLS: the empty namespace's one answer (exit 1), not a connection
    # error (exit 2)
    assert result.exit_code == 1, result.output
    assert "nothing synced yet" in result.output
