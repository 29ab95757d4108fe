"""The listener plugin's deployment (RECONCILER_DEPLOYMENT, issue 18) without etcd: which
DAGs a plugin writes for and under which key (event_scope), the setting and its check, and
the unknown-deployment warning once per graph. Against a real etcd:
tests/integration/test_plugin_deployments.py."""

from __future__ import annotations

import gzip
import json
import logging
from typing import Any

import pytest

from reconciler.plugin import reconciler_events as ev
from tests.fakes.clock import FakeClock
from tests.unit.test_plugin_sender import ROOT, FakeGateway, config, event

OLD = {"format": 1, "pipelines": {"a": {"dag_id": "a"}, "b": {"dag_id": "b"}}}
"""A graph as written before deployments: no `deployments`, no `deployment`."""


def two(default: str | None = "af2") -> dict[str, Any]:
    """af2 and af3 (the default: `default`); the same dag_id `cleanup` in both, af3's
    pipeline named cleanup_af3."""
    return {"format": 1,
            "deployments": {name: {"name": name, "default": name == default}
                            for name in ("af2", "af3")},
            "pipelines": {"root": {"dag_id": "root", "deployment": "af2"},
                          "cleanup": {"dag_id": "cleanup", "deployment": "af2"},
                          "extract": {"dag_id": "extract", "deployment": "af3"},
                          "cleanup_af3": {"dag_id": "cleanup", "deployment": "af3"}}}


@pytest.mark.parametrize("deployment", [None, "default"])
def test_a_graph_without_deployments_is_all_the_default_deployments_unqualified(
        deployment: str | None) -> None:
    assert ev.event_scope(OLD, deployment) == ev.Scope(frozenset({"a", "b"}), "events/")


def test_a_graph_without_deployments_knows_no_other_deployment() -> None:
    scope = ev.event_scope(OLD, "af3", "c0ffee")
    assert scope.dag_ids == frozenset()
    assert scope.problem is not None
    assert "'af3' is not a deployment of the graph of c0ffee" in scope.problem


def test_deployment_d_gets_its_dag_ids_under_a_qualified_prefix() -> None:
    assert ev.event_scope(two(), "af3") == ev.Scope(frozenset({"extract", "cleanup"}),
                                                    "events/@af3/")


@pytest.mark.parametrize("deployment", [None, "af2"])
def test_the_declared_default_gets_its_dag_ids_unqualified(deployment: str | None) -> None:
    assert ev.event_scope(two(), deployment) == ev.Scope(frozenset({"root", "cleanup"}),
                                                         "events/")


def test_the_default_is_what_the_graph_declares() -> None:
    """The same plugin (af3) writes unqualified keys once the graph makes af3 the default,
    and af2's plugin then qualified ones."""
    assert ev.event_scope(two(default="af3"), "af3").prefix == "events/"
    assert ev.event_scope(two(default="af3"), None).dag_ids == {"extract", "cleanup"}
    assert ev.event_scope(two(default="af3"), "af2") == ev.Scope(
        frozenset({"root", "cleanup"}), "events/@af2/")


def test_a_pipeline_without_its_resolved_deployment_is_the_defaults() -> None:
    graph = two()
    del graph["pipelines"]["root"]["deployment"]
    assert "root" in ev.event_scope(graph, "af2").dag_ids
    assert "root" not in ev.event_scope(graph, "af3").dag_ids


@pytest.mark.parametrize("deployment", ["af9", "default"])
def test_a_deployment_the_graph_does_not_declare_gets_nothing(deployment: str) -> None:
    scope = ev.event_scope(two(), deployment, "abc123")
    assert scope.dag_ids == frozenset()
    assert scope.problem is not None
    assert f"RECONCILER_DEPLOYMENT={deployment!r}" in scope.problem
    assert "af2, af3" in scope.problem


def test_unset_with_no_declared_default_gets_nothing_and_says_set_it() -> None:
    scope = ev.event_scope(two(default=None), None, "abc123")
    assert scope.dag_ids == frozenset()
    assert scope.problem is not None
    assert "unset" in scope.problem
    assert "no default deployment" in scope.problem


def test_the_setting_is_read_and_checked() -> None:
    base = {"RECONCILER_ETCD_ENDPOINTS": "e:2379"}
    unset = ev.Config.from_env(base)
    assert unset is not None
    assert (unset.deployment, unset.problem) == (None, None)
    empty = ev.Config.from_env({**base, "RECONCILER_DEPLOYMENT": ""})
    assert empty is not None
    assert empty.deployment is None  # empty is unset, like the other settings
    for good in ("af3", "a" * 63, "Air_flow-3", "default"):
        c = ev.Config.from_env({**base, "RECONCILER_DEPLOYMENT": good})
        assert c is not None
        assert (c.deployment, c.problem) == (good, None)
    for bad in ("af 3", "af3\n", " af3", "af/3", "@af3", "a" * 64, "äf3", "af3."):
        c = ev.Config.from_env({**base, "RECONCILER_DEPLOYMENT": bad})
        assert c is not None
        assert c.problem is not None, bad
        assert "\n" not in c.problem


def test_a_bad_setting_disables_the_plugin_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ev, "_disabled", None)
    monkeypatch.setattr(ev, "_sender", None)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    env = {"RECONCILER_ETCD_ENDPOINTS": "e:2379", "RECONCILER_DEPLOYMENT": "af 3"}
    for _ in range(3):
        assert ev.load_config(env) is None
    monkeypatch.setenv("RECONCILER_ETCD_ENDPOINTS", "e:2379")
    monkeypatch.setenv("RECONCILER_DEPLOYMENT", "af 3")
    assert ev.sender() is None
    ev.listener.on_dag_run_success(type("Run", (), {"dag_id": "a", "run_id": "r"})(), "")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["reconciler events: the plugin is disabled: RECONCILER_DEPLOYMENT="
                        "'af 3' is not a deployment name (letters, digits, _ and -, at most 63)"]


def test_a_good_setting_is_not_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "_disabled", None)
    c = ev.load_config({"RECONCILER_ETCD_ENDPOINTS": "e:2379", "RECONCILER_DEPLOYMENT": "af3"})
    assert c is not None
    assert c.deployment == "af3"
    assert ev._disabled is None


def put_graph(gateway: FakeGateway, graph: dict[str, Any], commit: str) -> None:
    gateway.kv[f"{ROOT}desired/head"] = json.dumps({"commit": commit}).encode()
    gateway.kv[f"{ROOT}desired/graphs/{commit}"] = gzip.compress(json.dumps(graph).encode())


def test_an_unknown_deployment_is_said_once_per_graph_and_nothing_is_written(
        caplog: pytest.LogCaptureFixture) -> None:
    gateway = FakeGateway()
    put_graph(gateway, two(), "c1")
    clock = FakeClock()
    sender = ev.Sender(config(deployment="af9", graph_refresh=30.0), gateway,  # type: ignore[arg-type]
                       clock=clock.monotonic)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    for n in range(3):
        assert not sender.handle(event("extract", f"r{n}"))
    clock.advance(31)  # read again: the same graph, not said again
    assert not sender.handle(event("extract", "r3"))
    put_graph(gateway, two(), "c2")
    clock.advance(31)  # another graph: said once more
    for n in range(3):
        assert not sender.handle(event("root", f"s{n}"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "graph of c1" in messages[0]
    assert "graph of c2" in messages[1]
    assert not [c for c in gateway.calls if c.startswith(("put", "grant"))]
    assert (sender.sent, sender.skipped, sender.failed) == (0, 7, 0)
    put_graph(gateway, {**two(), "deployments": {**two()["deployments"], "af9": {}}}, "c3")
    clock.advance(31)  # declared now (no pipeline of its own yet): no warning, no event
    assert not sender.handle(event("extract", "t"))
    assert len(caplog.records) == 2


def test_nothing_synced_yet_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    sender = ev.Sender(config(deployment="af3"), FakeGateway())  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    assert not sender.handle(event("extract"))
    assert caplog.records == []
