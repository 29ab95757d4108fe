"""The eager path's rule on a REAL Airflow 3: while a run runs, its task instances (via
the REST API) count as done only when every one is success or skipped. Checked on the
shapes that matter: a task up for retry, mapped tasks, a skipped branch, a teardown. The
DAGs are examples/dags/eager_cases.py. Polls, never sleeps to synchronise."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.core.settings import AirflowSettings
from reconciler.service.observer import tasks_done_at
from tests.e2e.conftest import eventually, new_cycle


@pytest.fixture
def api(airflow_server: Any) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=airflow_server.url,
                                         username=airflow_server.username,
                                         password=airflow_server.password, timeout=10))


def watch_run(api: AirflowClient, dag_id: str, timeout: float = 150
              ) -> list[tuple[str, list[dict[str, Any]], datetime | None]]:
    """Trigger `dag_id` and record (run state, task instances, tasks_done_at) until the
    run ends."""
    cycle = new_cycle()
    run_id = f"eager_case__{cycle.isoformat()}"
    eventually(lambda: any(d["dag_id"] == dag_id for d in api.list_dags()), 120,
               f"{dag_id} parsed")
    api.trigger(dag_id, run_id, cycle, {})
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get_run(dag_id, run_id) or {}
        tis = api.task_instances(dag_id, run_id)
        seen.append((str(run.get("state")), tis, tasks_done_at(tis, datetime.now(UTC))))
        if run.get("state") in ("success", "failed"):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{dag_id} did not end within {timeout} s: {seen[-1:]}")


def states(tis: list[dict[str, Any]]) -> set[str]:
    return {str(t.get("state")) for t in tis}


def test_a_task_up_for_retry_is_not_done(api: AirflowClient) -> None:
    seen = watch_run(api, "eager_retry")
    retrying = [done for _, tis, done in seen if "up_for_retry" in states(tis)]
    assert retrying, "the retry was never observed"
    assert all(done is None for done in retrying)
    assert seen[-1][0] == "success"
    assert seen[-1][2] is not None


def test_mapped_tasks_are_done_only_when_every_map_index_is(api: AirflowClient) -> None:
    seen = watch_run(api, "eager_mapped")
    final = seen[-1][1]
    assert sorted(t["map_index"] for t in final) == [0, 1, 2]
    for _, tis, done in seen:
        if done is not None:
            assert len(tis) == 3
            assert states(tis) == {"success"}
    assert seen[-1][2] is not None


def test_a_skipped_branch_counts_as_done(api: AirflowClient) -> None:
    seen = watch_run(api, "eager_branch")
    assert seen[-1][0] == "success"
    assert "skipped" in states(seen[-1][1])
    assert seen[-1][2] is not None


def test_a_teardown_must_end_too(api: AirflowClient) -> None:
    seen = watch_run(api, "eager_teardown")
    assert seen[-1][0] == "success"
    for _, tis, done in seen:
        teardown = [t for t in tis if t["task_id"] == "delete"]
        if done is not None:
            assert teardown
            assert teardown[0]["state"] == "success"
    # the work had ended while the teardown still ran: not done yet at that point
    assert any(done is None and any(t["task_id"] == "work" and t["state"] == "success"
                                    for t in tis) for _, tis, done in seen)


def test_the_batch_reads_what_one_read_per_run_reads(api: AirflowClient) -> None:
    """`task_instances_of` (one POST .../taskInstances/list for several runs) answers,
    per run, exactly what `GET .../dagRuns/{run_id}/taskInstances` does."""
    runs = []
    for dag_id in ("eager_mapped", "eager_branch"):
        eventually(lambda d=dag_id: any(x["dag_id"] == d for x in api.list_dags()), 120,
                   f"{dag_id} parsed")
        cycle = new_cycle()
        run_id = f"eager_batch__{cycle.isoformat()}"
        api.trigger(dag_id, run_id, cycle, {})
        runs.append((dag_id, run_id))
    eventually(lambda: all((api.get_run(*key) or {}).get("state") in ("success", "failed")
                           for key in runs), 150, "both runs ended")
    batch = api.task_instances_of(runs)
    assert api.batch_task_instances  # answered as a batch, not run by run
    assert set(batch) == set(runs)
    for key in runs:
        def shape(tis: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
            return sorted((t["task_id"], t["map_index"], t["state"]) for t in tis)
        assert shape(batch[key]) == shape(api.task_instances(*key)), key
    assert len(batch[runs[0]]) >= 3  # the mapped task's indexes are all there
