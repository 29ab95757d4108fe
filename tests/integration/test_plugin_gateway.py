"""The listener plugin's etcd client (etcd's JSON gateway, standard library only) against a
real etcd: what it writes the reconciler's store reads; user/password auth (a token, a new
one when it is refused); TLS with a client certificate; failover past a dead endpoint;
and a hung endpoint costs one short timeout, never a hang."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.plugin import reconciler_events as ev
from reconciler.service.sync import sync
from tests.fixtures.etcd import EtcdFactory, EtcdServer, free_port
from tests.helpers import example_repo


def plugin_config(settings: EtcdSettings, server: EtcdServer, **overrides: Any) -> ev.Config:
    env = {"RECONCILER_ETCD_ENDPOINTS": ",".join(server.endpoints),
           "RECONCILER_ETCD_PREFIX": settings.prefix,
           "RECONCILER_NAMESPACE": settings.namespace}
    for name, value in (("USER", settings.user), ("PASSWORD", settings.password),
                        ("CA", settings.ca), ("CERT", settings.cert), ("KEY", settings.key)):
        if value is not None:
            env[f"RECONCILER_ETCD_{name}"] = value
    env.update(overrides)
    config = ev.Config.from_env(env)
    assert config is not None
    return config


def synced(settings: EtcdSettings, tmp_path: Path) -> None:
    with EtcdStore(settings) as store:
        result = sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", store)
    assert result.ok, result


def written(settings: EtcdSettings, dag_id: str, run_id: str) -> Any:
    with EtcdStore(settings) as store:
        got = store.get(f"{settings.root}events/{dag_id}/{run_id}")
    return json.loads(got.value) if got.value is not None else None


def test_events_of_graph_dags_land_where_the_reconciler_watches(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path) -> None:
    synced(etcd_settings, tmp_path)
    config = plugin_config(etcd_settings, etcd_server)
    assert ev.graph_dag_ids(ev.Gateway(config), config.root) >= {"01_pipeline_init",
                                                                  "07_pipeline"}
    sender = ev.Sender(config)
    sender.submit({"kind": "task", "dag_id": "03_pipeline", "run_id": "manual__x",
                   "task_id": "load", "state": "success"})
    sender.submit({"kind": "run", "dag_id": "elsewhere", "run_id": "manual__x",
                   "state": "success"})
    assert sender.flush(10)
    sender.stop()
    assert written(etcd_settings, "03_pipeline", "manual__x")["task_id"] == "load"
    assert written(etcd_settings, "elsewhere", "manual__x") is None
    assert (sender.sent, sender.skipped) == (1, 1)
    with EtcdStore(etcd_settings) as store:  # the key is bound to a lease
        lease = store.client.get(f"{etcd_settings.root}events/03_pipeline/manual__x")[1].lease_id
    assert lease != 0


def test_auth_with_user_and_password_and_a_fresh_token_when_refused(
        etcd_factory: EtcdFactory, tmp_path: Path) -> None:
    server = etcd_factory(password="r00t-pw")
    settings = server.settings()
    synced(settings, tmp_path)
    gateway = ev.Gateway(plugin_config(settings, server))
    assert "01_pipeline_init" in ev.graph_dag_ids(gateway, settings.root)
    gateway._token = "not-a-valid-token"  # what an expired simple token looks like
    gateway.put(f"{settings.root}events/02_pipeline/r1", b"{}")
    assert written(settings, "02_pipeline", "r1") == {}
    wrong = ev.Gateway(plugin_config(settings, server, RECONCILER_ETCD_PASSWORD="wrong"))
    with pytest.raises(ev.GatewayError, match="refused user 'root'") as info:
        wrong.get(f"{settings.root}desired/head")
    assert "wrong" not in str(info.value)
    anonymous = ev.Gateway(plugin_config(settings, server, RECONCILER_ETCD_USER=""))
    with pytest.raises(ev.GatewayError, match="user name is empty"):
        anonymous.get(f"{settings.root}desired/head")


def test_tls_with_a_client_certificate(etcd_factory: EtcdFactory, tmp_path: Path) -> None:
    server = etcd_factory(tls=True)
    settings = server.settings()
    synced(settings, tmp_path)
    config = plugin_config(settings, server)
    assert config.tls
    sender = ev.Sender(config)
    assert sender.handle({"kind": "run", "dag_id": "06_pipeline", "run_id": "r", "state": "x"})
    assert written(settings, "06_pipeline", "r")["state"] == "x"
    no_cert = ev.Gateway(plugin_config(settings, server, RECONCILER_ETCD_CERT="",
                                       RECONCILER_ETCD_KEY=""))
    with pytest.raises(ev.GatewayError):
        no_cert.get(f"{settings.root}desired/head")


def test_a_dead_first_endpoint_fails_over_and_a_hung_one_costs_one_timeout(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, silent_endpoint: str,
        tmp_path: Path) -> None:
    synced(etcd_settings, tmp_path)
    dead = f"127.0.0.1:{free_port()}"
    config = plugin_config(etcd_settings, etcd_server, RECONCILER_ETCD_ENDPOINTS=(
        f"{dead},{etcd_server.endpoint}"))
    assert "02_pipeline" in ev.graph_dag_ids(ev.Gateway(config), config.root)
    hung = ev.Gateway(plugin_config(etcd_settings, etcd_server, RECONCILER_EVENTS_TIMEOUT="0.3",
                                    RECONCILER_ETCD_ENDPOINTS=silent_endpoint))
    started = time.monotonic()
    with pytest.raises(ev.GatewayError, match="unreachable"):
        hung.get(f"{etcd_settings.root}desired/head")
    assert time.monotonic() - started < 2.0
