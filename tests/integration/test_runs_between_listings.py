"""Runs that change between two listings, against the loop with a real etcd and the fake
Airflow: a run deleted in Airflow (it vanishes from the next relist), and a run whose
logical date changes (edited in Airflow's database). No crash, no second run on the same
upstream executions, and a status that says what happened. On each API generation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.core.state import State, run_id_for
from reconciler.service.loop import PassReport, Reconciler
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.helpers import EXAMPLE_DAGS

CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
ROOT = "01_pipeline_init"
ROOT_RUN = f"scheduled__{CYCLE.isoformat()}"
EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]


@pytest.fixture
def store(example_store: EtcdStore) -> EtcdStore:
    """The example graph synced (tests/fixtures/etcd.py)."""
    return example_store


@pytest.fixture(params=["v2", "v1", "v1-2.5"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    """API v2 (Airflow 3), v1 of Airflow 2.11, v1 of 2.5 (no updated_at filter)."""
    version = {"v1": "2.11.2", "v1-2.5": "2.5.3"}.get(request.param)
    with (FakeAirflow(EXAMPLE_DAGS) if version is None
          else FakeAirflowV1(EXAMPLE_DAGS, version=version)) as f:
        f.add_run(ROOT, ROOT_RUN, CYCLE, run_type="scheduled")
        f.finish_all()
        yield f


@pytest.fixture
def loop(store: EtcdStore, fake: FakeAirflow) -> Reconciler:
    settings = AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                               timeout=2, retries=2)
    api = (AirflowV1Client(settings, backoff_initial=0.01, airflow_version=fake.version)
           if isinstance(fake, FakeAirflowV1)
           else AirflowClient(settings, backoff_initial=0.01))
    return Reconciler(store, api, LoopSettings(interval=0.05, lease_ttl=6), holder="r1")


def delete_run(fake: FakeAirflow, dag_id: str, run_id: str) -> None:
    """`DELETE /dags/{dag_id}/dagRuns/{run_id}` as a user would (the fake has no route)."""
    with fake._lock:
        del fake._runs[(dag_id, run_id)]


def move_run(fake: FakeAirflow, dag_id: str, run_id: str, logical_date: datetime) -> None:
    """The run's logical date edited in Airflow's database."""
    with fake._lock:
        run = fake._runs[(dag_id, run_id)]
        run.logical_date = logical_date
        run.updated_at = datetime.now(UTC)


def relist(loop: Reconciler) -> PassReport:
    loop.observer.cache.listed_at = None  # as every relist_interval
    return loop.run_pass()


def triggered(report: PassReport) -> list[tuple[str, datetime]]:
    return sorted((a.dag_id, a.cycle) for a in report.actions)


def test_a_downstream_run_deleted_in_airflow_is_triggered_again_once(
        loop: Reconciler, fake: FakeAirflow) -> None:
    assert triggered(loop.run_pass()) == [(d, CYCLE) for d in EXTRACTS]
    delete_run(fake, "03_pipeline", run_id_for(CYCLE))
    fake.finish_all()
    # The incremental listing does not show a deletion; the next relist does. The
    # ledger says it was triggered and Airflow has no run: DESIGN section 5 triggers it
    # again (the deleted run is gone: one run in Airflow, not two).
    assert loop.run_pass().actions == []  # the cache still holds 03's run, queued
    report = relist(loop)
    assert triggered(report) == [("03_pipeline", CYCLE)]
    assert "Airflow has no run for this cycle" in report.actions[0].reason
    assert report.plan is not None
    waiting = {s.dag_id: s for s in report.plan.statuses}["06_pipeline"]
    assert waiting.state is State.WAITING
    assert "03_pipeline" in waiting.message
    for _ in range(3):
        assert relist(loop).actions == []  # once, not on every pass
    fake.finish_all()
    assert triggered(loop.run_pass()) == [("06_pipeline", CYCLE)]
    assert [r.run_id for r in fake.runs("03_pipeline")] == [run_id_for(CYCLE)]


def test_a_root_run_deleted_midway_leaves_its_cycle_without_error(
        loop: Reconciler, fake: FakeAirflow) -> None:
    assert triggered(loop.run_pass()) == [(d, CYCLE) for d in EXTRACTS]
    delete_run(fake, ROOT, ROOT_RUN)
    fake.finish_all()
    report = relist(loop)
    # Its cycle is no longer open (nothing roots it): nothing is triggered or cleared.
    assert report.actions == []
    assert report.plan is not None
    assert CYCLE not in report.plan.cycles
    assert fake.runs("06_pipeline") == []
    assert relist(loop).actions == []


def test_a_root_run_whose_logical_date_changes_does_not_run_its_downstreams_twice(
        loop: Reconciler, fake: FakeAirflow) -> None:
    assert triggered(loop.run_pass()) == [(d, CYCLE) for d in EXTRACTS]
    fake.finish_all()
    moved = CYCLE - timedelta(hours=1)
    move_run(fake, ROOT, ROOT_RUN, moved)
    for report in (loop.run_pass(), relist(loop), loop.run_pass()):
        # The root run now claims the earlier cycle; 02-05 already ran on it (as
        # reconciler__<CYCLE>): starting them again for the new date would be a second
        # run on the same upstream execution.
        assert report.actions == []
    assert report.plan is not None
    statuses = {(s.dag_id, s.cycle): s for s in report.plan.statuses}
    moved_02 = statuses[("02_pipeline", moved)]
    assert moved_02.state is State.NOT_IN_CYCLE
    assert f"already started as {run_id_for(CYCLE)}" in moved_02.message
    assert "logical date changed" in moved_02.message
    assert statuses[("06_pipeline", moved)].state is State.NOT_IN_CYCLE
    for dag_id in EXTRACTS:
        assert [r.run_id for r in fake.runs(dag_id)] == [run_id_for(CYCLE)]
    assert fake.duplicate_triggers() == {}


def test_a_downstream_run_whose_logical_date_changes_is_not_started_again_elsewhere(
        loop: Reconciler, fake: FakeAirflow) -> None:
    assert triggered(loop.run_pass()) == [(d, CYCLE) for d in EXTRACTS]
    fake.finish_all()
    move_run(fake, "03_pipeline", run_id_for(CYCLE), CYCLE - timedelta(hours=2))
    report = relist(loop)
    # 03 has no run for CYCLE any more but its ledger entry says it was triggered: the
    # trigger is sent again with the same run id, Airflow answers 409 (the run id exists,
    # with another logical date) and the outcome names the conflict; nothing is created.
    assert [a.dag_id for a in report.actions] == []
    outcomes = {o.action.dag_id: o for o in report.outcomes}
    assert set(outcomes) == {"03_pipeline"}
    assert "already has run" in str(outcomes["03_pipeline"].error)
    assert [r.run_id for r in fake.runs("03_pipeline")] == [run_id_for(CYCLE)]
    assert fake.duplicate_triggers() == {}
    assert fake.runs("06_pipeline") == []  # 06 waits: one of its upstreams is unresolved
