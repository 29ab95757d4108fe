"""Concurrency that adapts, over HTTP: the loop against a real etcd and the fake Airflow
API, with defaults. A fake that stalls on concurrent writes (an Airflow on SQLite) brings
the limit down to 1 and every run is still triggered once; a prompt fake lets the limit
grow to the ceiling, and never more than --concurrency writes are in flight."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.pacing import Change
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from tests.fakes.fake_airflow import FakeAirflow, Request
from tests.fakes.fake_airflow_v1 import FakeAirflowV1

DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
CYCLES = [NOW - timedelta(hours=h) for h in range(3)]
"""Three open cycles: the first pass fans out to 02-05 of each, 12 independent triggers."""


@pytest.fixture
def store(example_store: EtcdStore) -> EtcdStore:
    """The example graph synced (tests/fixtures/etcd.py)."""
    return example_store


@pytest.fixture(params=["v2", "v1"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    made = FakeAirflow(DAGS) if request.param == "v2" else FakeAirflowV1(DAGS)
    with made as f:
        for cycle in CYCLES:
            f.add_run("01_pipeline_init", f"scheduled__{cycle.isoformat()}", cycle,
                      run_type="scheduled")
        f.finish_all()
        yield f


def reconciler(store: EtcdStore, fake: FakeAirflow, **loop: Any) -> Reconciler:
    settings = AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                               timeout=2, retries=2)
    api: AirflowClient
    if isinstance(fake, FakeAirflowV1):
        api = AirflowV1Client(settings, backoff_initial=0.01, backoff_max=0.05,
                              airflow_version=fake.version)
    else:
        api = AirflowClient(settings, backoff_initial=0.01, backoff_max=0.05)
    return Reconciler(store, api, LoopSettings(**{"interval": 0.05, "lease_ttl": 6, **loop}),
                      holder="r1")


def changes_of(r: Reconciler) -> list[Change]:
    """The limit's moves, recorded as the executor hears of them."""
    seen: list[Change] = []
    told = r.executor.gate.on_change

    def record(change: Change) -> None:
        seen.append(change)
        if told is not None:
            told(change)

    r.executor.gate.on_change = record
    return seen


def run_to_the_end(r: Reconciler, fake: FakeAirflow, *, within: float = 90.0) -> int:
    """Passes until every run of every cycle is there and done; how many passes it took.
    Passes wait for failed actions' backoff, so the bound is in seconds (a guard against a
    hang, not a speed assertion)."""
    passes, give_up = 0, time.monotonic() + within
    while time.monotonic() < give_up:
        report = r.run_pass()
        passes += 1
        if not report.actions and fake.finish_all() == 0 and all(
                fake.runs(dag_id) and len(fake.runs(dag_id)) == len(CYCLES)
                for dag_id in DAGS[1:]):
            return passes
        fake.finish_all()
        time.sleep(0.05)
    raise AssertionError(f"not done after {passes} passes")


def assert_each_run_once(fake: FakeAirflow) -> None:
    assert fake.duplicate_triggers() == {}
    for dag_id in DAGS[1:]:
        assert sorted(r.run_id for r in fake.runs(dag_id)) == sorted(
            run_id_for(c) for c in CYCLES), dag_id


def commit_time(request: Request) -> None:
    """A write holds its place a moment, as a database commit does."""
    if request.route.startswith(("POST", "PATCH")) and not request.route.endswith("/list"):
        time.sleep(0.05)


def test_an_airflow_that_stalls_on_concurrent_writes_gets_one_at_a_time(
        store: EtcdStore, fake: FakeAirflow) -> None:
    """SQLite: a write that finds another in flight waits past the call's deadline (and
    takes effect then: the next pass adopts it on 409). The limit, grown by the first
    fast answers, comes down to 1; every run is triggered once."""
    fake.stall_concurrent_writes = 1.2
    fake.before_reply = commit_time  # two writes let through together do overlap
    r = reconciler(store, fake, call_deadline=1.0)  # the default --concurrency: 8
    moves = changes_of(r)
    try:
        run_to_the_end(r, fake)
    finally:
        r.executor.close()
    assert_each_run_once(fake)
    assert fake.stalled_writes >= 1  # the stall did happen: the limit had grown past 1
    assert any(c.new == 1 and c.old > 1 for c in moves), moves
    assert all(c.new <= 8 for c in moves)


def test_a_prompt_airflow_gets_the_ceiling_and_never_more(
        store: EtcdStore, fake: FakeAirflow) -> None:
    r = reconciler(store, fake, concurrency=4)
    moves = changes_of(r)
    try:
        run_to_the_end(r, fake)
    finally:
        r.executor.close()
    assert_each_run_once(fake)
    assert max(c.new for c in moves) == 4  # grown to the ceiling (1, 2, 4 by slow start)
    assert fake.max_writes_in_flight <= 4
    assert r.executor.gate.peak <= 4
    assert r.metrics.registry.get_sample_value(
        "reconciler_airflow_concurrency_limit") == r.executor.pacer.limit


def test_concurrency_1_is_a_hard_cap(store: EtcdStore, fake: FakeAirflow) -> None:
    r = reconciler(store, fake, concurrency=1)
    moves = changes_of(r)
    run_to_the_end(r, fake)
    assert_each_run_once(fake)
    assert fake.max_writes_in_flight == 1
    assert moves == []
