"""What is Airflow 2's own, on a REAL Airflow 2.11 standalone (API v1, basic auth, the
LocalExecutor on PostgreSQL) and a real etcd. The scenarios themselves (normal, re-run,
reconciler off then catch-up, a failing upstream that blocks, a weekly root, a crash) run
on both majors in test_scenarios.py (`bench` is parametrized).

- The client's facts: the API found by itself, a wrong explicit choice refused (exit 2, one
  line), a refused password is 403 naming `[api] auth_backends`, the batch listing ignores
  `updated_at_gte`, and the cost of a quiet pass (printed in the summary).
- `doctor` reads Airflow 2's DAGs (is_active, schedule_interval) right.
- The listener plugin inside Airflow 2 writes task and run events, and the eager path: the
  scheduler is held (SIGSTOP) once the root's last task runs, so Airflow cannot close the
  root run; the task-level event alone makes the reconciler start 02-05.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from reconciler.adapters.airflow import AirflowAuthError
from reconciler.adapters.airflow_detect import detect
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import iso, run_id_for
from reconciler.plugin import reconciler_events as ev
from tests.e2e.conftest import DAGS, Bench, eventually, make_bench, new_cycle
from tests.e2e.test_plugin import key_history
from tests.fixtures.airflow import EVENTS2_NAMESPACE, EVENTS2_PREFIX, note

EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]


def settings(airflow: Any, **values: Any) -> AirflowSettings:
    return AirflowSettings(**{"url": airflow.url, "username": airflow.username,
                              "password": airflow.password, "timeout": 10, **values})


def test_the_api_is_found_and_a_wrong_choice_is_one_line_and_exit_2(
        airflow2_server: Any, bench2: Bench) -> None:
    found = detect(settings(airflow2_server))
    assert (found.generation, found.version) == ("v1", "2.11.2")
    wrong = subprocess.run([sys.executable, "-m", "reconciler", "plan"],
                           env=bench2.env(RECONCILER_AIRFLOW_API="v2"), capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 2
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert "set RECONCILER_AIRFLOW_API=v1 or auto" in wrong.stderr
    right = subprocess.run([sys.executable, "-m", "reconciler", "plan"],
                           env=bench2.env(RECONCILER_AIRFLOW_API="v1"), capture_output=True,
                           text=True, timeout=60)
    assert right.returncode == 0, right.stderr


def test_a_refused_password_is_403_naming_the_auth_backend(airflow2_server: Any) -> None:
    api = AirflowV1Client(settings(airflow2_server, password="not-the-password"))
    with pytest.raises(AirflowAuthError, match="HTTP 403") as caught:
        api.list_runs(["02_pipeline"])
    assert "airflow.api.auth.backend.basic_auth" in str(caught.value)
    assert "not-the-password" not in str(caught.value)


def test_the_batch_listing_ignores_updated_at_gte_and_the_quiet_pass_is_one_get(
        airflow2_server: Any) -> None:
    api = AirflowV1Client(settings(airflow2_server))
    cycle = new_cycle()
    run, created = api.trigger("05_pipeline", run_id_for(cycle), cycle, {})
    assert created
    assert "queued_at" not in run  # v1 has none
    assert run["logical_date"] == run["execution_date"]
    future = "2100-01-01T00:00:00+00:00"
    batch = requests.post(f"{airflow2_server.url}/api/v1/dags/~/dagRuns/list",
                          auth=(airflow2_server.username, airflow2_server.password),
                          json={"dag_ids": ["05_pipeline"], "updated_at_gte": future},
                          timeout=30)
    assert batch.status_code == 200
    assert batch.json()["total_entries"] >= 1  # the filter was not applied
    # The informer's quiet pass: one GET with updated_at_gte, nothing changed since.
    dag_ids = set(DAGS)
    mark = datetime.now(UTC) + timedelta(seconds=5)
    costs = []
    for _ in range(20):
        before = api.request_count
        started = time.perf_counter()
        assert api.list_runs(dag_ids, updated_at_gte=mark) == []
        costs.append(time.perf_counter() - started)
        assert api.request_count - before == 1
    costs.sort()
    note(f"Airflow 2.11 quiet pass: 1 request, {costs[len(costs) // 2] * 1000:.0f} ms "
         f"median, {costs[-2] * 1000:.0f} ms p90 (20 passes)")


def test_the_task_instance_batch_reads_what_one_read_per_run_reads(
        airflow2_server: Any) -> None:
    """2.10+ pages its task-instance batch form: `task_instances_of` sends one POST
    .../taskInstances/list for several runs and answers, per run, what the per-run GET
    does."""
    api = AirflowV1Client(settings(airflow2_server), airflow_version="2.11.2")
    runs = []
    for dag_id in ("05_pipeline", "07_pipeline"):
        cycle = new_cycle()
        api.trigger(dag_id, f"e2e_batch__{iso(cycle)}", cycle, {})
        runs.append((dag_id, f"e2e_batch__{iso(cycle)}"))
    eventually(lambda: all((api.get_run(*key) or {}).get("state") in ("success", "failed")
                           for key in runs), 180, "both runs ended")
    before = api.request_count
    batch = api.task_instances_of(runs)
    assert api.request_count - before == 1
    assert api.batch_task_instances
    for key in runs:
        def shape(tis: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
            return sorted((t["task_id"], t.get("map_index", -1), t["state"]) for t in tis)
        assert batch[key], key
        assert shape(batch[key]) == shape(api.task_instances(*key)), key


def test_doctor_reads_airflow_2_dags(bench2: Bench) -> None:
    done = subprocess.run([sys.executable, "-m", "reconciler", "doctor", "--output", "json"],
                          env=bench2.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    findings = json.loads(done.stdout)["findings"]
    # the example DAGs are all there, active and unpaused; none but the root is scheduled
    assert {f["problem"] for f in findings} <= {"root-idle"}, findings


@pytest.fixture
def plugin_bench(airflow2_server: Any, etcd_server: Any, tmp_path: Path) -> Iterator[Bench]:
    """A bench whose graph is synced where Airflow 2's plugin writes (/e2e/plugin2/)."""
    yield from make_bench(airflow2_server, etcd_server, tmp_path, namespace=EVENTS2_NAMESPACE)


def scheduler_pid(airflow: Any) -> int:
    """The pid of standalone's `airflow scheduler` child."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            words = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == airflow.process.pid and " scheduler" in words:
            return int(stat.parent.name)
    raise AssertionError("no scheduler process under airflow standalone")


def held_while_eager(bench: Bench, scheduler: int, cycle: datetime
                     ) -> tuple[datetime, set[str]] | None:
    """Open a cycle; once the root's last task runs, hold the scheduler (SIGSTOP) so that
    Airflow cannot close the root run, and wait for 02-05 to be triggered all the same.
    The cycle and how the ledger says 02-05 were decided while the root run was still
    open, or None when the run closed before the scheduler was held."""
    bench.open_cycle(cycle)
    root_run = f"e2e__{iso(cycle)}"

    def last_task_started() -> bool:
        tis = {t["task_id"]: t["state"]
               for t in bench.api.task_instances("01_pipeline_init", root_run)}
        return tis.get("load") in ("running", "success")

    eventually(last_task_started, 300, "the root's last task to start", every=0.1)
    os.kill(scheduler, signal.SIGSTOP)
    try:
        root = bench.run("01_pipeline_init", cycle)
        if root is None or root.state != "running":
            return None
        # the task's own event (the plugin, in the task process) is all the reconciler
        # has: it reads the task instances and starts 02-05
        for dag_id in EXTRACTS:
            eventually(lambda d=dag_id: bench.run(d, cycle), 120,
                       f"{dag_id} triggered before the root run closed")
        with EtcdStore(bench.etcd) as store:
            ledger = store.read_ledger(iso(cycle))
        root = bench.run("01_pipeline_init", cycle)
        assert root is not None
        assert root.state == "running"
        return cycle, {ledger[(iso(cycle), d)]["decided"] for d in EXTRACTS}
    finally:
        os.kill(scheduler, signal.SIGCONT)


def delete_cycles(airflow: Any, bench: Bench, cycles: list[datetime]) -> None:
    """Delete every run of these cycles: their downstreams started before the root run
    ended (the eager path), so a later test's reconciler, with a ledger of its own, would
    find runs it has no record of that started too early, and clear them."""
    for cycle in cycles:
        for dag_id in DAGS:
            for run in bench.runs(dag_id, cycle):
                requests.delete(f"{airflow.url}/api/v1/dags/{dag_id}/dagRuns/"
                                f"{quote(run.run_id, safe='')}",
                                auth=(airflow.username, airflow.password), timeout=30)


def test_the_plugin_wakes_the_eager_path_while_airflow_has_not_closed_the_run(
        airflow2_server: Any, plugin_bench: Bench) -> None:
    bench = plugin_bench
    bench.start()
    gateway = ev.Gateway(ev.Config(endpoints=tuple(f"http://{e}" for e in bench.etcd.endpoints),
                                   root=EVENTS2_PREFIX))
    eventually(lambda: "02_pipeline" in ev.graph_dag_ids(gateway, EVENTS2_PREFIX), 30,
               "the synced graph")
    scheduler = scheduler_pid(airflow2_server)
    tried: list[datetime] = []
    try:
        held = None
        for _attempt in range(3):
            tried.append(new_cycle())
            held = held_while_eager(bench, scheduler, tried[-1])
            if held is not None:
                break
        assert held is not None, "Airflow closed the root run before the scheduler was held"
        cycle, decided = held
        assert decided == {"eager"}
        key = f"{EVENTS2_PREFIX}events/01_pipeline_init/e2e__{iso(cycle)}"
        assert "load" in {e.get("task_id") for e in key_history(gateway, key)
                          if e["kind"] == "task"}
        bench.wait_done("07_pipeline", cycle)
        # the dag-run hook (2.5+) writes the run's end from the scheduler
        eventually(lambda: any(e["kind"] == "run" and e["state"] == "success"
                               for e in key_history(gateway, key)), 60, "the root's run event")
        for dag_id in DAGS[1:]:
            assert [r.run_id for r in bench.runs(dag_id, cycle)] == [run_id_for(cycle)]
    finally:
        bench.stop()
        delete_cycles(airflow2_server, bench, tried)


@pytest.fixture
def bench2(airflow2_server: Any, etcd_server: Any, tmp_path: Path) -> Iterator[Bench]:
    yield from make_bench(airflow2_server, etcd_server, tmp_path)
