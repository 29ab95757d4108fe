"""The UI plugin's app (reconciler/plugin/ui/app.py) against a real etcd that the
reconciler's own store filled: the graph and a pipeline's tab say what `reconciler status
-o json` says, word for word; the eager path is read from the ledger; per-DAG authorization
hides what the user may not read; etcd down, hung or not configured is one line and a 503
in bounded time; several cycles are listed newest first.

Airflow's user and auth manager are stood in for here (Airflow is not in this venv): the
user dependency is overridden and the readable set is given. tests/e2e/test_ui_airflow3.py
runs the same app inside a real Airflow 3 with its real authentication.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from reconciler.adapters.store import EtcdStore
from reconciler.cli import main
from reconciler.core.settings import EtcdSettings
from reconciler.core.state import PipelineStatus, Reason, State, iso
from reconciler.plugin import reconciler_events as ev
from reconciler.plugin.ui import app as ui_app
from reconciler.plugin.ui.reader import UISettings
from reconciler.plugin.ui.view import HIDDEN, Links
from reconciler.service.sync import sync
from tests.fixtures.etcd import EtcdServer, free_port
from tests.helpers import example_repo

DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]


def env_of(settings: EtcdSettings, endpoints: str, **extra: str) -> dict[str, str]:
    return {"RECONCILER_ETCD_ENDPOINTS": endpoints, "RECONCILER_ETCD_PREFIX": settings.prefix,
            "RECONCILER_NAMESPACE": settings.namespace, **extra}


def client_of(env: dict[str, str], readable: Callable[[set[str]], set[str]] | None = None,
              monkeypatch: pytest.MonkeyPatch | None = None) -> TestClient:
    app = ui_app.create_app(UISettings.from_env(env))
    app.dependency_overrides[ui_app.airflow_user] = lambda: "someone"
    if monkeypatch is not None:
        monkeypatch.setattr(ui_app, "readable_dags",
                            lambda user, ids: (readable or (lambda s: s))(set(ids)))
    return TestClient(app)


def status(dag_id: str, cycle: datetime, state: State, reason: Reason, message: str,
           **extra: Any) -> dict[str, Any]:
    return PipelineStatus(dag_id=dag_id, cycle=cycle, state=state, reason=reason,
                          message=message, commit="c", **extra).to_json()


@pytest.fixture
def world(etcd_settings: EtcdSettings, tmp_path: Path) -> tuple[datetime, datetime]:
    """The example graph synced; two cycles mirrored (as the leader's recorder writes
    them), the newer with a blocked join, an eager trigger in the ledger, a suspend mark."""
    now = datetime.now(UTC).replace(microsecond=0)
    old, new = now - timedelta(hours=2), now - timedelta(hours=1)
    with EtcdStore(etcd_settings) as store:
        assert sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", store,
                    source="ci@runner").ok
        for d in DAGS:
            store.put_observed(iso(old), d, status(d, old, State.DONE, Reason.DONE,
                                                   "run succeeded", run_id=f"r_{d}"))
        rows = {
            "01_pipeline_init": status("01_pipeline_init", new, State.DONE, Reason.DONE,
                                       "run succeeded", run_id="manual__1"),
            "02_pipeline": status("02_pipeline", new, State.RUNNING, Reason.RUNNING,
                                  "run running (triggered on the eager path)",
                                  run_id="reconciler__2"),
            "03_pipeline": status("03_pipeline", new, State.FAILED, Reason.FAILED,
                                  "run failed", run_id="reconciler__3"),
            "06_pipeline": status("06_pipeline", new, State.BLOCKED, Reason.BLOCKED_BY,
                                  "blocked by failed 03_pipeline",
                                  blocked_by=("03_pipeline",)),
        }
        for d, row in rows.items():
            store.put_observed(iso(new), d, row)
        store.put(f"{etcd_settings.root}ledger/{iso(new)}/02_pipeline", json.dumps(
            {"run_id": "reconciler__2", "action": "trigger", "decided": "eager"}).encode())
        store.put_suspend("07_pipeline", {"by": "ops@host", "at": iso(now), "reason": "audit"})
    return old, new


def cli_status(settings: EtcdSettings, endpoint: str, cycle: datetime) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["status", "-o", "json", "--from-etcd", "--cycle",
                                       iso(cycle)], env=env_of(settings, endpoint))
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_the_graph_says_what_status_says(world: tuple[datetime, datetime],
                                         etcd_settings: EtcdSettings,
                                         etcd_server: EtcdServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = world
    client = client_of(env_of(etcd_settings, etcd_server.endpoint,
                              RECONCILER_UI_COMMIT_URL="https://git/c/{commit}"),
                       monkeypatch=monkeypatch)
    for cycle, query in ((new, ""), (old, f"?cycle={quote(iso(old))}")):
        answer = client.get("/api/graph" + query)
        assert answer.status_code == 200, answer.text
        data = answer.json()
        expected = cli_status(etcd_settings, etcd_server.endpoint, cycle)
        assert data["cycle"] == iso(cycle)
        nodes = {n["id"]: n for n in data["nodes"]}
        assert set(nodes) == set(DAGS)
        for row in expected["statuses"]:
            got = nodes[row["dag_id"]]
            assert (got["state"], got["reason"], got["message"], got["run_id"]) == \
                (row["state"], row["reason"], row["message"], row["run_id"])
        missing = set(DAGS) - {r["dag_id"] for r in expected["statuses"]}
        assert all(nodes[d]["state"] is None for d in missing)
    assert data["cycles"] == [iso(new), iso(old)]
    header = data["header"]
    assert header["commit"] == expected["header"]["commit"]
    assert header["synced_by"] == "ci@runner"
    assert header["commit_url"] == f"https://git/c/{header['commit']}"
    assert header["suspended"]["07_pipeline"]["reason"] == "audit"
    assert nodes["07_pipeline"]["suspended"] is True


def test_a_pipelines_tab_lists_its_cycles_and_the_eager_path(
        world: tuple[datetime, datetime], etcd_settings: EtcdSettings,
        etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = world
    client = client_of(env_of(etcd_settings, etcd_server.endpoint,
                              RECONCILER_UI_FILE_URL="https://git/b/{commit}/{path}"),
                       monkeypatch=monkeypatch)
    data = client.get("/api/dags/02_pipeline").json()
    assert [(c["cycle"], c["state"], c["eager"]) for c in data["cycles"]] == \
        [(iso(new), "running", True), (iso(old), "done", False)]
    assert data["cycles"][0]["message"] == "run running (triggered on the eager path)"
    assert data["pipeline"]["upstreams"] == ["01_pipeline_init"]
    assert data["pipeline"]["descendants"] == ["06_pipeline", "07_pipeline"]
    assert data["pipeline"]["file_url"].endswith("/pipelines/02_pipeline.yaml")
    assert data["pipeline"]["owner"]
    # the drawing: its upstreams and downstreams, coloured by the newest cycle
    assert {n["id"]: n["state"] for n in data["nodes"]} == {
        "01_pipeline_init": "done", "02_pipeline": "running", "06_pipeline": "blocked",
        "07_pipeline": None}
    answer = client.get("/api/dags/not_a_pipeline")
    assert answer.status_code == 404
    assert "not in the reconciler's synced graph" in answer.json()["detail"]


def test_what_the_user_may_not_read_is_hidden_and_refused(
        world: tuple[datetime, datetime], etcd_settings: EtcdSettings,
        etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of(env_of(etcd_settings, etcd_server.endpoint),
                       readable=lambda ids: ids - {"03_pipeline"}, monkeypatch=monkeypatch)
    data = client.get("/api/graph").json()
    assert "03_pipeline" not in json.dumps(data)
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes["06_pipeline"]["message"] == f"blocked by failed {HIDDEN}"
    assert client.get("/api/dags/03_pipeline").status_code == 403
    assert "03_pipeline" not in json.dumps(client.get("/api/dags/06_pipeline").json()
                                           ["pipeline"]["ancestors"])


def test_etcd_down_is_one_line_and_a_503_in_bounded_time(
        etcd_settings: EtcdSettings, silent_endpoint: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for endpoints in (f"127.0.0.1:{free_port()}", silent_endpoint):
        client = client_of(env_of(etcd_settings, endpoints, RECONCILER_UI_TIMEOUT="0.5"),
                           monkeypatch=monkeypatch)
        for path in ("/api/graph", "/api/dags/02_pipeline"):
            started = time.monotonic()
            answer = client.get(path)
            assert time.monotonic() - started < 5
            assert answer.status_code == 503
            detail = answer.json()["detail"]
            assert detail.startswith("The reconciler's etcd cannot be read: etcd unreachable")
            assert "\n" not in detail
        # the page itself still loads: it shows that line
        assert client.get("/").status_code == 200


def test_nothing_configured_or_synced_says_so(etcd_settings: EtcdSettings,
                                              etcd_server: EtcdServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of({}, monkeypatch=monkeypatch)
    answer = client.get("/api/graph")
    assert answer.status_code == 503
    assert "RECONCILER_ETCD_ENDPOINTS" in answer.json()["detail"]
    empty = client_of(env_of(etcd_settings, etcd_server.endpoint), monkeypatch=monkeypatch)
    data = empty.get("/api/graph").json()
    assert (data["header"]["commit"], data["nodes"], data["cycles"]) == (None, [], [])
    assert "nothing synced yet" in empty.get("/api/dags/02_pipeline").json()["detail"]


def test_a_synced_graph_is_read_once_per_commit(world: tuple[datetime, datetime],
                                                etcd_settings: EtcdSettings,
                                                etcd_server: EtcdServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = ev.Gateway.get

    def counting(self: ev.Gateway, key: str) -> bytes | None:
        reads.append(key)
        return real(self, key)

    monkeypatch.setattr(ev.Gateway, "get", counting)
    client = client_of(env_of(etcd_settings, etcd_server.endpoint), monkeypatch=monkeypatch)
    for _ in range(3):
        assert client.get("/api/graph").status_code == 200
    assert len([k for k in reads if "/desired/graphs/" in k]) == 1


def test_the_pages_carry_where_they_are_mounted(etcd_settings: EtcdSettings,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of({}, monkeypatch=monkeypatch)
    page = client.get("/dags/06_pipeline").text
    assert 'data-kind="dag"' in page
    assert 'data-dag-id="06_pipeline"' in page
    assert "<script" not in client.get("/dags/%3Cscript%3E").text.split("<body")[1] \
        .split(">")[0]
    assert client.get("/static/vendor/cytoscape/cytoscape.min.js").status_code == 200
    assert Links().pipelines_path == "pipelines"


def test_a_cycle_is_chosen_by_its_logical_date(world: tuple[datetime, datetime],
                                               etcd_settings: EtcdSettings,
                                               etcd_server: EtcdServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = world
    client = client_of(env_of(etcd_settings, etcd_server.endpoint), monkeypatch=monkeypatch)
    # "+00:00" typed into a URL arrives as " 00:00": still that cycle
    assert client.get(f"/api/graph?cycle={iso(old)}").json()["cycle"] == iso(old)
    answer = client.get("/api/graph", params={"cycle": "2001-01-01T00:00:00+00:00"})
    assert answer.status_code == 404
    assert "no cycle 2001-01-01T00:00:00+00:00" in answer.json()["detail"]


def test_a_dead_first_endpoint_fails_over_to_the_next(world: tuple[datetime, datetime],
                                                      etcd_settings: EtcdSettings,
                                                      etcd_server: EtcdServer,
                                                      silent_endpoint: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _, new = world
    endpoints = f"127.0.0.1:{free_port()},{silent_endpoint},{etcd_server.endpoint}"
    client = client_of(env_of(etcd_settings, endpoints, RECONCILER_UI_TIMEOUT="0.5"),
                       monkeypatch=monkeypatch)
    started = time.monotonic()
    answer = client.get("/api/graph")
    assert answer.status_code == 200, answer.text
    assert answer.json()["cycle"] == iso(new)
    assert time.monotonic() - started < 10
    # the endpoint that answered is asked first from then on: no timeout paid again
    started = time.monotonic()
    assert client.get("/api/dags/06_pipeline").status_code == 200
    assert time.monotonic() - started < 2
