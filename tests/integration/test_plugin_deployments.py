"""The listener plugin and deployments (issue 18, docs/design.md section 13, "Events"),
against a real etcd with graphs written by the reconciler's own sync.

The default deployment's plugin writes `events/<dag_id>/<run_id>` exactly as before (an
old graph without deployments included); the plugin of deployment D
(`RECONCILER_DEPLOYMENT=D`) writes `events/@<D>/<dag_id>/<run_id>` for D's DAGs only, by
dag_id (a renamed pipeline too); a deployment the graph does not have writes nothing and
says so in one line; a value that is no deployment name disables the plugin in one line."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.plugin import reconciler_events as ev
from reconciler.service.sync import sync
from tests.fixtures.etcd import EtcdServer
from tests.helpers import example_repo
from tests.integration.test_plugin_gateway import plugin_config
from tests.integration.test_sync import GitRepo

REPO = Path(__file__).resolve().parents[2]
TWO = REPO / "tests" / "data" / "valid" / "two_deployments"
# tests/data/valid/two_deployments: af2 (default: true) has root, cleanup and report; af3
# has extract and the pipeline named cleanup_af3 whose dag_id is cleanup.
AF2_DAGS = {"root", "cleanup", "report"}
AF3_DAGS = {"extract", "cleanup"}
EVENT_DAGS = ["root", "cleanup", "report", "extract", "cleanup_af3", "elsewhere"]


def sync_example(settings: EtcdSettings, tmp_path: Path) -> None:
    """The shipped example graph: no deployments declared (a blob as written before)."""
    with EtcdStore(settings) as store:
        result = sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", store)
    assert result.ok, result


def sync_two_deployments(settings: EtcdSettings, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "two")
    shutil.copytree(TWO / "pipelines", repo.path / "pipelines")
    shutil.copytree(TWO / "airflow-deployments", repo.path / "airflow-deployments")
    repo.commit({}, "two deployments")
    with EtcdStore(settings) as store:
        result = sync(repo.path, "HEAD", "pipelines", store)
    assert result.ok, result


def synced_blob(settings: EtcdSettings) -> dict[str, Any]:
    with EtcdStore(settings) as store:
        head, _ = store.read_head()
        assert head is not None
        blob = store.read_graph_blob(head.commit)
    assert blob is not None
    return dict(json.loads(gzip.decompress(blob)))


def event_keys(settings: EtcdSettings) -> set[str]:
    """The keys under the namespace's events/, relative to it, as the reconciler reads them."""
    with EtcdStore(settings) as store:
        response = store.client.get_prefix_response(f"{settings.root}events/")
        return {kv.key.decode()[len(settings.root):] for kv in response.kvs}


def send_all(config: ev.Config, dag_ids: list[str], run_id: str = "r1") -> ev.Sender:
    sender = ev.Sender(config)
    for dag_id in dag_ids:
        assert sender.submit({"kind": "run", "dag_id": dag_id, "run_id": run_id,
                              "state": "success"})
    assert sender.flush(10)
    sender.stop()
    return sender


@pytest.mark.parametrize("deployment", [None, "default"])
def test_an_old_graph_without_deployments_gives_exactly_the_old_keys(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path,
        deployment: str | None) -> None:
    sync_example(etcd_settings, tmp_path)
    assert "deployments" not in synced_blob(etcd_settings)  # the old blob, byte for byte
    overrides = {} if deployment is None else {"RECONCILER_DEPLOYMENT": deployment}
    config = plugin_config(etcd_settings, etcd_server, **overrides)
    assert config.deployment == deployment
    sender = send_all(config, ["03_pipeline", "07_pipeline", "elsewhere"], "manual__x")
    assert event_keys(etcd_settings) == {"events/03_pipeline/manual__x",
                                         "events/07_pipeline/manual__x"}
    assert (sender.sent, sender.skipped) == (2, 1)


def test_the_plugin_of_a_non_default_deployment_writes_qualified_keys_for_its_dags_only(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path) -> None:
    sync_two_deployments(etcd_settings, tmp_path)
    blob = synced_blob(etcd_settings)
    assert blob["deployments"]["af2"]["default"] is True
    assert blob["pipelines"]["cleanup_af3"].items() >= {"dag_id": "cleanup",
                                                        "deployment": "af3"}.items()
    config = plugin_config(etcd_settings, etcd_server, RECONCILER_DEPLOYMENT="af3")
    sender = send_all(config, EVENT_DAGS)
    # extract and cleanup (the dag_id of the pipeline named cleanup_af3) only: root and
    # report are af2's DAGs (the same dag_id in this Airflow is not the graph's), and
    # cleanup_af3 is a name, not a dag_id Airflow knows.
    assert event_keys(etcd_settings) == {f"events/@af3/{d}/r1" for d in AF3_DAGS}
    assert (sender.sent, sender.skipped) == (2, 4)
    with EtcdStore(etcd_settings) as store:
        value = json.loads(store.get(f"{etcd_settings.root}events/@af3/cleanup/r1").value or b"")
    assert value["dag_id"] == "cleanup"  # the event itself is unchanged


@pytest.mark.parametrize("deployment", [None, "af2"])
def test_the_default_deployments_plugin_writes_unqualified_keys_for_its_dags_only(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path,
        deployment: str | None) -> None:
    sync_two_deployments(etcd_settings, tmp_path)
    overrides = {} if deployment is None else {"RECONCILER_DEPLOYMENT": deployment}
    sender = send_all(plugin_config(etcd_settings, etcd_server, **overrides), EVENT_DAGS)
    assert event_keys(etcd_settings) == {f"events/{d}/r1" for d in AF2_DAGS}
    assert (sender.sent, sender.skipped) == (3, 3)


def test_a_renamed_pipeline_is_matched_by_its_dag_id_not_its_name(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path) -> None:
    """af3's only DAG here is the pipeline named cleanup_af3 (dag_id cleanup); af2 has a
    pipeline named cleanup too, so only the deployment tells the two apart."""
    sync_two_deployments(etcd_settings, tmp_path)
    af3 = plugin_config(etcd_settings, etcd_server, RECONCILER_DEPLOYMENT="af3")
    assert send_all(af3, ["cleanup_af3"], "by-name").sent == 0
    assert send_all(af3, ["cleanup"], "by-dag-id").sent == 1
    af2 = plugin_config(etcd_settings, etcd_server)
    assert send_all(af2, ["cleanup"], "by-dag-id").sent == 1
    assert event_keys(etcd_settings) == {"events/@af3/cleanup/by-dag-id",
                                         "events/cleanup/by-dag-id"}


@pytest.mark.parametrize(("graph", "deployment"), [("two", "af9"), ("old", "af3")])
def test_an_unknown_deployment_writes_nothing_and_says_so_once(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, graph: str, deployment: str) -> None:
    (sync_two_deployments if graph == "two" else sync_example)(etcd_settings, tmp_path)
    caplog.set_level(logging.INFO, logger="reconciler.plugin")
    config = plugin_config(etcd_settings, etcd_server, RECONCILER_DEPLOYMENT=deployment)
    sender = ev.Sender(config)
    for n in range(5):
        for dag_id in ("root", "extract", "cleanup", "03_pipeline"):
            assert sender.submit({"kind": "run", "dag_id": dag_id, "run_id": f"r{n}",
                                  "state": "success"})
    assert sender.flush(10)
    assert sender.alive
    sender.stop()
    assert event_keys(etcd_settings) == set()
    assert (sender.sent, sender.skipped, sender.failed) == (0, 20, 0)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1, logged
    assert f"RECONCILER_DEPLOYMENT={deployment!r} is not a deployment" in logged[0]
    assert logged[0].startswith("reconciler events: ")
    assert "\n" not in logged[0]


TASK_PROCESS = """
import sys
from reconciler.plugin import reconciler_events as ev
print("loaded", file=sys.stderr, flush=True)

class Run:
    dag_id, run_id = "extract", "manual__1"

class TaskInstance:
    dag_id, run_id, task_id, map_index, try_number = "extract", "manual__1", "t", -1, 1

for _ in range(3):
    ev.listener.on_dag_run_success(Run(), "")
    ev.listener.on_task_instance_success(None, TaskInstance())
    ev.listener.on_task_instance_failed(None, TaskInstance(), RuntimeError("x"))
s = ev.sender()
print("sender", None if s is None else (s.sent, s.skipped), flush=True)
if s is not None:
    s.flush(10)
    print("after", s.sent, s.skipped, flush=True)
"""


def run_task_process(settings: EtcdSettings, server: EtcdServer, deployment: str
                     ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECONCILER_ETCD_ENDPOINTS": server.endpoint,
           "RECONCILER_ETCD_PREFIX": settings.prefix, "RECONCILER_NAMESPACE": settings.namespace,
           "RECONCILER_DEPLOYMENT": deployment, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", TASK_PROCESS], env=env, text=True,
                          capture_output=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.parametrize("bad", ["af 3", "af3\n", "af/3", "@af3", "a" * 64, "äf3"])
def test_a_bad_deployment_name_disables_the_plugin_in_one_line(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path,
        bad: str) -> None:
    sync_two_deployments(etcd_settings, tmp_path)
    proc = run_task_process(etcd_settings, etcd_server, bad)
    assert proc.stdout.splitlines() == ["sender None"]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr  # once, not once per event
    assert lines[1] == "loaded"  # said when the plugin is loaded, before any event
    assert lines[0].startswith("reconciler events: the plugin is disabled: ")
    assert "RECONCILER_DEPLOYMENT" in lines[0]
    assert event_keys(etcd_settings) == set()


def test_a_good_name_in_a_task_process_sends_and_an_unknown_one_says_so_once(
        etcd_server: EtcdServer, etcd_settings: EtcdSettings, tmp_path: Path) -> None:
    """The same task process with a good name writes (so the test above can only pass
    through the check of the name), and with an unknown one logs one line, no traceback."""
    sync_two_deployments(etcd_settings, tmp_path)
    good = run_task_process(etcd_settings, etcd_server, "af3")
    assert good.stdout.splitlines()[-1] == "after 9 0", good.stdout + good.stderr
    assert good.stderr == "loaded\n"
    assert event_keys(etcd_settings) == {"events/@af3/extract/manual__1"}
    unknown = run_task_process(etcd_settings, etcd_server, "af9")
    assert unknown.stdout.splitlines()[-1] == "after 0 9", unknown.stdout + unknown.stderr
    lines = unknown.stderr.splitlines()
    assert len(lines) == 2, unknown.stderr
    assert "RECONCILER_DEPLOYMENT='af9' is not a deployment of the graph of" in lines[1]
