"""The Airflow client against the real Airflow 3: the API facts the reconciler relies on
(DESIGN section 10): 409 on a repeated run id (adopted), another run on the same logical
date refused, clear re-runs with a new end date, unknown DAGs, incremental listing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowConflict, AirflowNotFound
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import DagRun, run_id_for
from tests.e2e.conftest import eventually, new_cycle


@pytest.fixture
def api(airflow_server: Any) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=airflow_server.url,
                                         username=airflow_server.username,
                                         password=airflow_server.password))


def finished(api: AirflowClient, dag_id: str, run_id: str, after: datetime | None = None
             ) -> DagRun | None:
    raw = api.get_run(dag_id, run_id)
    run = DagRun.from_api(raw) if raw else None
    if run is None or run.state not in ("success", "failed"):
        return None
    if after is not None and (run.end_date is None or run.end_date <= after):
        return None
    return run


def test_trigger_is_idempotent_by_run_id_and_keeps_the_logical_date(api: AirflowClient
                                                                    ) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    first, created = api.trigger("02_pipeline", run_id, cycle, {"k": 1})
    assert created
    assert DagRun.from_api(first).logical_date == cycle
    again, created_again = api.trigger("02_pipeline", run_id, cycle, {"k": 1})
    assert not created_again
    assert again["dag_run_id"] == run_id
    with pytest.raises(AirflowConflict, match="another run for logical date"):
        api.trigger("02_pipeline", "someone_else", cycle, {})
    with pytest.raises(AirflowNotFound, match="no_such_dag"):
        api.trigger("no_such_dag", run_id, cycle, {})


def test_clear_reruns_with_a_new_end_date_and_incremental_listing_sees_it(
        api: AirflowClient) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    api.trigger("03_pipeline", run_id, cycle, {})
    done = eventually(lambda: finished(api, "03_pipeline", run_id), 120, "the first run")
    mark = datetime.now(UTC) - timedelta(seconds=1)
    before = api.request_count
    assert all(r["dag_run_id"] != run_id
               for r in api.list_runs(updated_at_gte=datetime.now(UTC) + timedelta(hours=1)))
    assert api.request_count - before == 1  # nothing changed: one request
    api.clear("03_pipeline", run_id)
    again = eventually(lambda: finished(api, "03_pipeline", run_id, after=done.end_date),
                       120, "the re-run")
    assert again.end_date > done.end_date  # type: ignore[operator]
    changed = api.list_runs(updated_at_gte=mark)
    assert run_id in {r["dag_run_id"] for r in changed}

