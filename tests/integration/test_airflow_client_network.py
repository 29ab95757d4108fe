"""The Airflow client in real networks, against the fake Airflow API: a CA bundle for a TLS
API server with a throw-away CA (and a clear needs-a-human error without it), proxies
only when asked (an explicit proxy, or the environment's HTTP_PROXY/NO_PROXY on opt-in;
never by default, so the bearer token does not cross a proxy nobody chose), and a token
file read again on a 401 (a rotated token), never re-sending the same refused token. The
CA bundle and the proxies for the v1 client (Airflow 2, basic auth) too."""

from __future__ import annotations

import ssl
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowAuthError, AirflowClient, AirflowRejected
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.core.settings import AirflowSettings
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.fixtures.etcd import TlsFiles

PASSWORD = "net-pw"


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    with FakeAirflow(["a"], password=PASSWORD) as f:
        yield f


def client(url: str, **settings: Any) -> AirflowClient:
    values: dict[str, Any] = {"url": url, "username": "admin", "password": PASSWORD,
                              "retries": 1, "timeout": 5}
    values.update(settings)
    return AirflowClient(AirflowSettings(**values), backoff_initial=0.01, backoff_max=0.02)


# --- TLS with a CA bundle ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("airflow-tls"))


@pytest.fixture
def tls_fake(fake: FakeAirflow, tls: TlsFiles) -> str:
    return serve_tls(fake, tls)


def serve_tls(fake: FakeAirflow, tls: TlsFiles) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    assert fake.server is not None
    # the fake's listening socket, wrapped: every connection it accepts speaks TLS
    fake.server.socket = context.wrap_socket(fake.server.socket, server_side=True)
    return fake.url.replace("http://", "https://")


def test_a_ca_bundle_verifies_a_private_ca(tls_fake: str, tls: TlsFiles,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    assert client(tls_fake, ca=str(tls.ca)).list_dags()[0]["dag_id"] == "a"
    with pytest.raises(AirflowRejected, match="RECONCILER_AIRFLOW_CA") as info:
        client(tls_fake).list_dags()
    assert "certificate verify failed" in str(info.value)


def test_requests_ca_bundle_alone_is_not_read_by_the_client(
        tls_fake: str, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI turns REQUESTS_CA_BUNDLE into settings.ca; the client reads settings only.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))
    with pytest.raises(AirflowRejected):
        client(tls_fake).list_dags()


# --- proxies ------------------------------------------------------------------------------

class RecordingProxy:
    """A forward HTTP proxy on loopback that remembers what crossed it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (url, Authorization)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy.seen.append((self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                request = urllib.request.Request(self.path, data=body, method=self.command)
                for name in ("Content-Type", "Authorization"):
                    if self.headers.get(name):
                        request.add_header(name, self.headers[name])
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(request, timeout=5) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    p = RecordingProxy()
    yield p
    p.stop()


def test_the_environments_proxy_is_not_used_unless_asked(
        fake: FakeAirflow, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert client(fake.url).list_dags()
    assert proxy.seen == []  # the token went straight to Airflow
    assert client(fake.url, proxy_from_env=True).list_dags()
    assert [url for url, _ in proxy.seen] == [f"{fake.url}/auth/token",
                                              f"{fake.url}/api/v2/dags?limit="
                                              f"{AirflowSettings.page_size}&offset=0"]
    assert proxy.seen[-1][1] is not None  # asked for: the bearer token crosses it
    proxy.seen.clear()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert client(fake.url, proxy_from_env=True).list_dags()
    assert proxy.seen == []  # NO_PROXY is honoured


def test_an_explicit_proxy_is_used_whatever_the_environment_says(
        fake: FakeAirflow, proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "*")
    assert client(fake.url, proxy=proxy.url).list_dags()
    assert len(proxy.seen) == 2


# --- a token file, read again on a 401 -----------------------------------------------------

def issue(fake: FakeAirflow) -> str:
    return client(fake.url)._fetch_token()


def test_a_rotated_token_file_is_read_again_on_a_401(fake: FakeAirflow,
                                                      tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issue(fake) + "\n")
    api = client(fake.url, username=None, password=None, token_file=str(token_file))
    assert api.list_dags()
    before = fake.requests["POST /auth/token"]
    fake.expire_tokens()
    token_file.write_text(issue(fake))  # the platform rotated it
    assert api.list_dags()
    assert fake.requests["POST /auth/token"] == before + 1  # only ours above: no login
    fake.expire_tokens()  # refused again, and the file still holds that token
    sent = fake.total_requests()
    with pytest.raises(AirflowAuthError, match="holds no newer token") as info:
        api.list_dags()
    assert str(token_file) in str(info.value)
    assert fake.total_requests() - sent == 1  # the same refused token is not sent twice
    assert token_file.read_text() not in str(info.value)


def test_a_missing_or_empty_token_file_says_so(fake: FakeAirflow, tmp_path: Path) -> None:
    with pytest.raises(AirflowAuthError, match="cannot read the Airflow token file"):
        client(fake.url, username=None, token_file=str(tmp_path / "absent")).list_dags()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AirflowAuthError, match="is empty"):
        client(fake.url, username=None, token_file=str(tmp_path / "empty")).list_dags()


def test_the_cli_fills_the_settings_from_options_and_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import click
    from click.testing import CliRunner

    from reconciler.cli.loop_cmds import airflow_options

    got: dict[str, AirflowSettings] = {}

    @click.command()
    @airflow_options
    def probe(airflow: AirflowSettings) -> None:
        got["settings"] = airflow

    ca = tmp_path / "corp-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for name in ("RECONCILER_AIRFLOW_CA", "RECONCILER_AIRFLOW_PROXY",
                 "RECONCILER_AIRFLOW_PROXY_FROM_ENV", "RECONCILER_AIRFLOW_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    result = CliRunner().invoke(probe, [])
    assert result.exit_code == 0, result.output
    s = got["settings"]
    assert (s.ca, s.proxy, s.proxy_from_env, s.token_file) == (str(ca), None, False, None)
    monkeypatch.setenv("RECONCILER_AIRFLOW_PROXY_FROM_ENV", "true")
    monkeypatch.setenv("RECONCILER_AIRFLOW_TOKEN_FILE", str(tmp_path / "token"))
    result = CliRunner().invoke(probe, ["--airflow-proxy", "http://proxy.corp:3128"])
    assert result.exit_code == 0, result.output
    s = got["settings"]
    assert (s.proxy, s.proxy_from_env, s.token_file) == (
        "http://proxy.corp:3128", True, str(tmp_path / "token"))


# --- the same on Airflow 2 (API v1, basic auth) -----------------------------------------

@pytest.fixture
def fake_v1() -> Iterator[FakeAirflowV1]:
    with FakeAirflowV1(["a"], password=PASSWORD) as f:
        yield f


def client_v1(url: str, **settings: Any) -> AirflowV1Client:
    values: dict[str, Any] = {"url": url, "username": "admin", "password": PASSWORD,
                              "retries": 1, "timeout": 5}
    values.update(settings)
    return AirflowV1Client(AirflowSettings(**values), backoff_initial=0.01, backoff_max=0.02)


def test_the_v1_client_verifies_a_private_ca_too(fake_v1: FakeAirflowV1, tls: TlsFiles,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    url = serve_tls(fake_v1, tls)
    assert client_v1(url, ca=str(tls.ca)).list_dags()[0]["dag_id"] == "a"
    with pytest.raises(AirflowRejected, match="RECONCILER_AIRFLOW_CA"):
        client_v1(url).list_dags()


def test_the_environments_proxy_never_sees_v1s_password_unless_asked(
        fake_v1: FakeAirflowV1, proxy: RecordingProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert client_v1(fake_v1.url).list_dags()
    assert proxy.seen == []  # basic auth carries the password itself: straight to Airflow
    assert client_v1(fake_v1.url, proxy_from_env=True).list_dags()
    assert [url.split("?")[0] for url, _ in proxy.seen] == [f"{fake_v1.url}/api/v1/dags"]
    assert (proxy.seen[-1][1] or "").startswith("Basic ")  # asked for: it crosses it
