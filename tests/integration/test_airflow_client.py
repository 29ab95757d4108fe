"""The Airflow client against the fake Airflow API: auth, pagination, incremental listing,
409 adoption, retries and the messages of the errors (never a secret in them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowConflict,
    AirflowNotFound,
    AirflowUnavailable,
)
from reconciler.settings import AirflowSettings
from tests.fakes.fake_airflow import FakeAirflow
from tests.fixtures.etcd import free_port

PASSWORD = "s3cret-Pa55"
CYCLE = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    with FakeAirflow(["a", "b"], password=PASSWORD) as f:
        yield f


def client(url: str, password: str = PASSWORD, retries: int = 3) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=url, username="admin", password=password,
                                         timeout=1, retries=retries),
                         backoff_initial=0.01, backoff_max=0.05)


def test_lists_every_page_and_filters_by_dag(fake: FakeAirflow) -> None:
    for i in range(250):
        fake.add_run("a" if i % 2 else "b", f"r{i}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    assert len(api.list_runs()) == 250
    assert api.request_count == 1 + 3  # token + three pages of 100
    only_a = api.list_runs(dag_ids=["a"])
    assert {r["dag_id"] for r in only_a} == {"a"}
    assert len(only_a) == 125


def test_incremental_listing_is_one_request_when_nothing_changed(fake: FakeAirflow) -> None:
    fake.add_run("a", "r1", CYCLE)
    api = client(fake.url)
    api.list_runs()
    mark = datetime.now(UTC)
    before = api.request_count
    assert api.list_runs(updated_at_gte=mark) == []
    assert api.request_count - before == 1
    fake.set_state("a", "r1", "running")
    (changed,) = api.list_runs(updated_at_gte=mark)
    assert changed["state"] == "running"


def test_a_repeated_trigger_is_adopted_and_another_run_on_the_date_is_a_conflict(
        fake: FakeAirflow) -> None:
    api = client(fake.url)
    run, created = api.trigger("a", "reconciler__x", CYCLE, {"k": 1})
    assert created
    again, created_again = api.trigger("a", "reconciler__x", CYCLE, {"k": 1})
    assert not created_again
    assert again["dag_run_id"] == run["dag_run_id"]
    assert len(fake.runs("a")) == 1
    with pytest.raises(AirflowConflict):
        api.trigger("a", "other", CYCLE, {})


def test_run_ids_with_colons_and_plus_reach_the_right_run(fake: FakeAirflow) -> None:
    api = client(fake.url)
    run_id = "reconciler__2026-11-01T00:00:00+00:00"
    api.trigger("a", run_id, CYCLE, {})
    fake.finish_all()
    api.clear("a", run_id)
    assert fake.run("a", run_id).state == "queued"
    assert api.get_run("a", run_id)["dag_run_id"] == run_id


def test_an_expired_token_is_fetched_again_once(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    fake.tokens.clear()  # the JWT expired
    api.list_runs()
    assert fake.requests["POST auth/token"] == 2


def test_5xx_is_retried_then_succeeds(fake: FakeAirflow) -> None:
    api = client(fake.url)
    fake.faults = [("500", 0), ("500", 0)]
    assert api.list_runs() == []


def test_gives_up_after_the_retries_with_airflow_unavailable(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=3)
    api.list_runs()
    fake.faults = [("500", 0)] * 3
    with pytest.raises(AirflowUnavailable, match="answered 500"):
        api.list_runs()


def test_a_hanging_airflow_times_out_within_bounds(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=2)
    api.list_runs()
    fake.faults = [("hang", 3)] * 2
    started = time.monotonic()
    with pytest.raises(AirflowUnavailable, match="timed out"):
        api.list_runs()
    assert time.monotonic() - started < 10


def test_refused_connection_is_unavailable_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AirflowUnavailable, match=f"cannot connect to Airflow at {url}"):
        client(url, retries=2).list_runs()


def test_wrong_password_is_an_auth_error_without_the_secret(fake: FakeAirflow) -> None:
    with pytest.raises(AirflowAuthError) as info:
        client(fake.url, password="wrong-" + PASSWORD).list_runs()
    assert "'admin'" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_unknown_dag_is_not_found_and_named(fake: FakeAirflow) -> None:
    with pytest.raises(AirflowNotFound, match="'nope'"):
        client(fake.url).trigger("nope", "r", CYCLE, {})
