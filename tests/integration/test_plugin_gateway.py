"""The listener plugin's etcd client (etcd's JSON gateway, standard library only) against a
real etcd: what it writes the reconciler's store reads; user/password auth (a token, a new
one when it is refused); TLS with a client certificate; failover past a dead endpoint;
a hung endpoint costs one short timeout, never a hang; unreadable graph blobs and a hung
etcd never end the sender, submit() says when events cannot be sent, and they flow again
once the blob is repaired or etcd answers."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
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


# --- never dies, never lies (issue 15, finding 3), against a real etcd --------------------


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _bad_deflate() -> bytes:
    good = gzip.compress(b'{"pipelines": {"02_pipeline": {}}}')
    return good[:10] + b"\xff" * 20 + good[-8:]


UNREADABLE = {
    "truncated-gzip": gzip.compress(b'{"format": 1, "pipelines": {"02_pipeline": {}}}')[:-12],
    "gzip-of-a-list": gzip.compress(b"[]"),
    "gzip-of-non-graph-json": gzip.compress(b'{"pipelines": ["02_pipeline"]}'),
    "bad-deflate": _bad_deflate(),
    "not-gzip": b'{"pipelines": {"02_pipeline": {}}}',
    "empty": b"",
}


def test_unreadable_blobs_in_etcd_never_end_the_sender_and_events_flow_once_repaired(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    synced(etcd_settings, tmp_path)
    with EtcdStore(etcd_settings) as store:
        head, _ = store.read_head()
        assert head is not None
        key = f"{etcd_settings.root}desired/graphs/{head.commit}"
        good = store.get(key).value
    assert good is not None
    config = plugin_config(etcd_settings, etcd_server, RECONCILER_EVENTS_DOWN_AFTER="0.5",
                           RECONCILER_EVENTS_RETRY_MAX="0.05")
    caplog.set_level(logging.INFO, logger="reconciler.plugin")
    scheduler = ev.Sender(config)  # one long-lived sender meets every kind in turn
    for kind, blob in UNREADABLE.items():
        with EtcdStore(etcd_settings) as store:
            store.put(key, blob)
        task = ev.Sender(config)  # and a new one (a task process) meets each
        assert task.submit({"kind": "task", "dag_id": "02_pipeline", "run_id": kind,
                            "state": "success"})
        scheduler.submit({"kind": "run", "dag_id": "02_pipeline", "run_id": kind,
                          "state": "success"})
        assert wait_until(lambda: task.down and scheduler.down), kind  # noqa: B023
        assert task.alive, kind
        assert scheduler.alive, kind
        assert not task.submit({"kind": "run", "dag_id": "02_pipeline", "run_id": "x",
                                "state": "success"}), kind  # honest: it cannot be sent
        started = time.monotonic()
        task.flush(30)
        assert time.monotonic() - started < 1.0, kind
        assert any(head.commit in r.getMessage() for r in caplog.records), kind
        task.stop()
    with EtcdStore(etcd_settings) as store:
        store.put(key, good)  # repaired
    assert wait_until(lambda: not scheduler.down)
    assert scheduler.submit({"kind": "run", "dag_id": "02_pipeline", "run_id": "after",
                             "state": "success"})
    assert scheduler.flush(10)
    assert written(etcd_settings, "02_pipeline", "after")["state"] == "success"
    assert scheduler.alive
    scheduler.stop()


def test_a_hung_etcd_makes_submit_honest_flush_short_and_events_flow_after_it_resumes(
        etcd_killable: EtcdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = etcd_killable.settings()
    synced(settings, tmp_path)
    config = plugin_config(settings, etcd_killable, RECONCILER_EVENTS_TIMEOUT="0.3",
                           RECONCILER_EVENTS_DOWN_AFTER="1", RECONCILER_EVENTS_RETRY_MAX="0.2",
                           RECONCILER_EVENTS_FLUSH_TIMEOUT="30")
    sender = ev.Sender(config)

    def run_event(run_id: str) -> dict[str, Any]:
        return {"kind": "run", "dag_id": "06_pipeline", "run_id": run_id, "state": "success"}

    assert sender.submit(run_event("before"))
    assert sender.flush(10)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    etcd_killable.pause()
    try:
        assert sender.submit(run_event("during"))  # not yet known to be down
        assert wait_until(lambda: sender.down)
        assert not sender.submit(run_event("refused"))
        started = time.monotonic()
        sender.flush()
        assert time.monotonic() - started < 1.0  # not the 30 s flush timeout
        assert sender.alive
        assert [r for r in caplog.records if "unreachable" in r.getMessage()]
    finally:
        etcd_killable.resume()
    assert wait_until(lambda: not sender.down, 15)
    assert sender.submit(run_event("after"))
    assert sender.flush(10)
    assert written(settings, "06_pipeline", "after") is not None
    assert written(settings, "06_pipeline", "refused") is None
    sender.stop()


TASK_PROCESS = """
import sys, time
from reconciler.plugin import reconciler_events as ev
s = ev.sender()
accepted = [s.submit({"kind": "task", "dag_id": "06_pipeline", "run_id": f"r{n}",
                      "task_id": "t", "state": "success"}) for n in range(5)]
print(time.monotonic(), accepted, flush=True)
"""


def test_a_task_process_exits_within_the_flush_timeout_when_etcd_hangs(
        etcd_killable: EtcdServer, tmp_path: Path) -> None:
    settings = etcd_killable.settings()
    synced(settings, tmp_path)
    env = {**os.environ, "RECONCILER_ETCD_ENDPOINTS": etcd_killable.endpoint,
           "RECONCILER_ETCD_PREFIX": settings.prefix, "RECONCILER_NAMESPACE": settings.namespace,
           "RECONCILER_EVENTS_TIMEOUT": "0.3", "RECONCILER_EVENTS_FLUSH_TIMEOUT": "1"}
    etcd_killable.pause()
    try:
        proc = subprocess.run([sys.executable, "-c", TASK_PROCESS], env=env, text=True,
                              capture_output=True, timeout=60)
        ended = time.monotonic()
    finally:
        etcd_killable.resume()
    assert proc.returncode == 0, proc.stderr
    submitted, _, accepted = proc.stdout.partition(" ")
    assert accepted.strip() == "[True, True, True, True, True]"
    assert ended - float(submitted) < 1.0 + 1.0  # one flush timeout, and the exit itself
    assert "Traceback" not in proc.stderr
