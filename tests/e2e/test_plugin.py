"""The listener plugin inside the real Airflow 3 (the session's `airflow standalone` loads
the drop-in examples/plugins/reconciler_events.py, configured by the reconciler's
RECONCILER_ETCD_* variables: tests/fixtures/airflow.py) writing into the real etcd:

- Airflow lists the plugin with its listener;
- a run of a DAG of the synced graph writes both event kinds under its key, task level
  (from the task processes, flushed as they exit) and run level (from the scheduler), for
  success and for failure;
- a DAG that is not in the graph gets no key at all;
- the wheel's `airflow.plugins` entry point is found and loaded by Airflow's own loader.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings
from reconciler.core.state import DagRun, run_id_for
from reconciler.plugin import reconciler_events as ev
from reconciler.service.sync import sync
from tests.e2e.conftest import eventually, new_cycle
from tests.fixtures.airflow import EVENTS_ETCD_PREFIX, EVENTS_NAMESPACE, EVENTS_PREFIX
from tests.helpers import example_repo, git

REPO = Path(__file__).resolve().parents[2]


def key_history(gateway: ev.Gateway, key: str) -> list[dict[str, Any]]:
    """Every value `key` had, oldest first (etcd keeps the revisions: no compaction here)."""
    encoded = base64.b64encode(key.encode()).decode()
    answer = gateway.call("/v3/kv/range", {"key": encoded})
    kvs = answer.get("kvs") or []
    if not kvs:
        return []
    values = []
    create = int(kvs[0]["create_revision"])
    revision = int(kvs[0]["mod_revision"])
    while revision >= create:
        kv = gateway.call("/v3/kv/range", {"key": encoded, "revision": revision})["kvs"][0]
        values.append(json.loads(base64.b64decode(kv["value"])))
        revision = int(kv["mod_revision"]) - 1
    return values[::-1]


def finished(api: AirflowClient, dag_id: str, run_id: str) -> DagRun | None:
    raw = api.get_run(dag_id, run_id)
    run = DagRun.from_api(raw) if raw else None
    return run if run is not None and run.state in ("success", "failed") else None


def test_airflow_loads_the_plugin_with_its_listener(airflow_server: Any) -> None:
    status, body = airflow_server.request("GET", "/api/v2/plugins",
                                          token=airflow_server.token())
    assert status == 200, body
    plugin = next(p for p in body["plugins"] if p["name"] == "reconciler_events")
    assert any("Listener" in str(x) for x in plugin["listeners"]), plugin


def test_graph_dags_write_run_and_task_events_and_other_dags_none(
        airflow_server: Any, etcd_server: Any, tmp_path: Path) -> None:
    # The graph without 07_pipeline, forced over whatever an earlier run left there.
    repo = example_repo(tmp_path / "repo")
    git(repo, "rm", "-q", "pipelines/07_pipeline.yaml")
    git(repo, "commit", "-qm", "without 07")
    settings = EtcdSettings(endpoints=(etcd_server.endpoint,), prefix=EVENTS_ETCD_PREFIX,
                            namespace=EVENTS_NAMESPACE)
    with EtcdStore(settings) as store:
        assert sync(repo, "HEAD", "pipelines", store, force=True, source="e2e").ok
    gateway = ev.Gateway(ev.Config(endpoints=(f"http://{etcd_server.endpoint}",),
                                   root=EVENTS_PREFIX))
    assert "07_pipeline" not in ev.graph_dag_ids(gateway, EVENTS_PREFIX)

    api = AirflowClient(AirflowSettings(url=airflow_server.url,
                                        username=airflow_server.username,
                                        password=airflow_server.password))
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    # The plugin reads the graph again every second (RECONCILER_EVENTS_GRAPH_REFRESH=1).
    wanted = {"02_pipeline": {}, "03_pipeline": {"fail": True}, "07_pipeline": {}}
    for dag_id, conf in wanted.items():
        api.trigger(dag_id, run_id, cycle, conf)
    for dag_id in wanted:
        eventually(lambda d=dag_id: finished(api, d, run_id), 120, f"{dag_id} to finish")

    def history(dag_id: str) -> list[dict[str, Any]]:
        return key_history(gateway, f"{EVENTS_PREFIX}events/{dag_id}/{run_id}")

    # The run-level event is the scheduler's, written right after the run ended.
    ok = eventually(lambda: (h := history("02_pipeline")) and
                    any(e["kind"] == "run" for e in h) and h, 30, "02's run event")
    tasks = {e["task_id"]: e["state"] for e in ok if e["kind"] == "task"}
    assert tasks == {"extract": "success", "load": "success"}, ok
    run_events = [e for e in ok if e["kind"] == "run"]
    assert [(e["dag_id"], e["run_id"], e["state"]) for e in run_events] == [
        ("02_pipeline", run_id, "success")]
    assert all(e["at"] for e in ok)

    failed = eventually(lambda: (h := history("03_pipeline")) and
                        any(e["kind"] == "run" for e in h) and h, 30, "03's run event")
    assert {e["task_id"]: e["state"] for e in failed if e["kind"] == "task"} == {
        "extract": "success", "load": "failed"}, failed
    assert [e["state"] for e in failed if e["kind"] == "run"] == ["failed"]

    assert history("07_pipeline") == []  # not in the graph: never written


def test_the_wheel_entry_point_is_found_by_airflows_plugin_loader(tmp_path: Path) -> None:
    from tests.fixtures.airflow import airflow_venv

    target = tmp_path / "site"
    # The package as pip installs it into an Airflow image (its own dependencies are not
    # needed by the plugin, which imports only the standard library).
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    home = tmp_path / "airflow-home"
    home.mkdir()
    probe = (
        "from airflow import plugins_manager as pm\n"
        "from importlib.metadata import entry_points\n"
        "eps = [e for e in entry_points(group='airflow.plugins') "
        "if e.name == 'reconciler_events']\n"
        "assert len(eps) == 1, eps\n"
        "cls = eps[0].load()\n"
        "assert issubclass(cls, pm.AirflowPlugin) and cls.name == 'reconciler_events'\n"
        "assert cls.listeners, 'no listener'\n"
        "print(eps[0].value)\n")
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(home), "PYTHONPATH": str(target),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(tmp_path / "no-plugins")}
    python = airflow_venv() / "bin" / "python"
    done = subprocess.run([str(python), "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "reconciler.plugin.reconciler_events:ReconcilerEventsPlugin"
    shutil.rmtree(target)
