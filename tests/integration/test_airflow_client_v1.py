"""The Airflow 2 client (API v1, basic auth) against the fake's v1 layer
(tests/fakes/fake_airflow_v1.py), and the choice of API (`detect`): what differs from v2 is
asserted here, the shared transport in test_airflow_client.py. The same is checked on a real
Airflow 2.11 in tests/e2e/test_airflow2.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.adapters.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowConflict,
    AirflowNotFound,
    AirflowUnavailable,
)
from reconciler.adapters.airflow_detect import AirflowApiMismatch, client_for, detect
from reconciler.adapters.airflow_v1 import AirflowV1Client, dag_v1
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import DagRun, run_id_for
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1

PASSWORD = "s3cret-Pa55"
CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
LIST = "GET /api/v1/dags/~/dagRuns"
BATCH = "POST /api/v1/dags/~/dagRuns/list"


@pytest.fixture
def fake() -> Iterator[FakeAirflowV1]:
    with FakeAirflowV1(["a", "b"], password=PASSWORD) as f:
        yield f


def settings(url: str, **values: object) -> AirflowSettings:
    base: dict[str, object] = {"url": url, "username": "admin", "password": PASSWORD,
                               "timeout": 1.0, "retries": 3}
    base.update(values)
    return AirflowSettings(**base)  # type: ignore[arg-type]


def client(url: str, **values: object) -> AirflowV1Client:
    return AirflowV1Client(settings(url, **values), backoff_initial=0.01, backoff_max=0.05)


# --- listing ----------------------------------------------------------------------------------


def test_lists_every_page_with_the_logical_date_of_each_run(fake: FakeAirflowV1) -> None:
    for i in range(250):
        fake.add_run("a" if i % 2 else "b", f"r{i:03d}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    runs = api.list_runs(page_size=1000)  # capped at maximum_page_limit (100): 3 pages
    assert [r["dag_run_id"] for r in runs] == [f"r{i:03d}" for i in range(250)]
    assert fake.requests[LIST] == 3
    assert "queued_at" not in runs[0]  # v1 has none
    assert [DagRun.from_api(r).logical_date for r in runs[:2]] == [
        CYCLE, CYCLE + timedelta(minutes=1)]
    assert runs[0]["logical_date"] == runs[0]["execution_date"]


def test_a_relist_of_some_dags_uses_the_batch_form_filtered_by_execution_date(
        fake: FakeAirflowV1) -> None:
    for i in range(150):
        fake.add_run("a", f"a{i}", CYCLE + timedelta(minutes=i))
        fake.add_run("b", f"b{i}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    runs = api.list_runs(["a"], logical_date_gte=CYCLE + timedelta(minutes=100))
    assert len(runs) == 50
    assert {r["dag_id"] for r in runs} == {"a"}
    assert fake.requests[BATCH] == 1  # page_limit is not capped on the batch form
    assert fake.requests[LIST] == 0


def test_the_incremental_listing_is_the_get_form_one_request_when_nothing_changed(
        fake: FakeAirflowV1) -> None:
    fake.add_run("a", "old", CYCLE)
    api = client(fake.url)
    mark = datetime.now(UTC) + timedelta(seconds=1)
    # the batch form ignores updated_at_gte: only the GET listing can be incremental
    assert api.list_runs({"a", "b"}, updated_at_gte=mark) == []
    assert (fake.requests[LIST], fake.requests[BATCH]) == (1, 0)
    fake.advance("a", "old", "running")
    changed = api.list_runs({"a", "b"}, updated_at_gte=mark - timedelta(seconds=5))
    assert [r["dag_run_id"] for r in changed] == ["old"]


def test_the_batch_form_ignores_updated_at_gte_on_airflow_2(fake: FakeAirflowV1) -> None:
    """Why the client never sends it there: the fact, as the fake has it from 2.11.2."""
    import requests

    fake.add_run("a", "old", CYCLE)
    answer = requests.post(f"{fake.url}/api/v1/dags/~/dagRuns/list", auth=("admin", PASSWORD),
                           json={"dag_ids": ["a"], "updated_at_gte": "2100-01-01T00:00:00Z"},
                           timeout=5)
    assert answer.status_code == 200
    assert answer.json()["total_entries"] == 1


# --- trigger, adopt, clear ----------------------------------------------------------------


def test_trigger_sends_the_execution_date_and_a_repeat_is_adopted(fake: FakeAirflowV1) -> None:
    api = client(fake.url)
    run, created = api.trigger("a", run_id_for(CYCLE), CYCLE, {"k": 1})
    assert created
    assert run["state"] == "queued"
    assert DagRun.from_api(run).logical_date == CYCLE
    stored = fake.run("a", run_id_for(CYCLE))
    assert stored is not None
    assert stored.logical_date == CYCLE
    assert stored.conf == {"k": 1}
    again, created = api.trigger("a", run_id_for(CYCLE), CYCLE, {"k": 1})
    assert not created
    assert again["dag_run_id"] == run_id_for(CYCLE)
    assert fake.created[("a", run_id_for(CYCLE))] == 1
    assert fake.conflicts[("a", run_id_for(CYCLE))] == 1


def test_another_run_on_the_execution_date_is_a_conflict_naming_it(fake: FakeAirflowV1) -> None:
    fake.add_run("a", "manual__x", CYCLE)
    with pytest.raises(AirflowConflict, match="manual__x") as caught:
        client(fake.url).trigger("a", run_id_for(CYCLE), CYCLE, {})
    assert caught.value.existing is not None
    assert caught.value.existing["dag_run_id"] == "manual__x"


def test_clear_is_not_a_dry_run_and_restarts_the_run(fake: FakeAirflowV1) -> None:
    fake.add_run("a", "r", CYCLE)
    fake.finish_all()
    api = client(fake.url)
    run, sent = api.clear("a", "r")
    assert sent
    assert run["state"] == "queued"
    assert run["start_date"] is None
    assert fake.clear_count("a", "r") == 1


def test_a_clear_whose_answer_is_lost_is_not_sent_again(fake: FakeAirflowV1) -> None:
    fake.add_run("a", "r", CYCLE)
    fake.finish_all()
    ended = fake.run("a", "r").end_date  # type: ignore[union-attr]
    fake.fail_next(1, "500", route="POST /api/v1/dags/{dag_id}/dagRuns/{run_id}/clear")
    # the 500 came after the clear took effect? The fake answers 500 before acting, so the
    # retry after reading the run (still finished, same end) sends it once: one clear.
    run, sent = client(fake.url).clear("a", "r", cleared_end=ended)
    assert fake.clear_count("a", "r") == 1
    assert run["state"] == "queued"
    assert sent


def test_task_instances_and_unknown_runs(fake: FakeAirflowV1) -> None:
    api = client(fake.url)
    with pytest.raises(AirflowNotFound, match="not in Airflow"):
        api.task_instances("a", "nope")
    assert api.get_run("a", "nope") is None
    fake.add_run("a", "r", CYCLE)
    assert api.get_run("a", "r")["logical_date"] is not None  # type: ignore[index]


def test_dags_carry_the_v2_fields_doctor_reads(fake: FakeAirflowV1) -> None:
    dags = client(fake.url).list_dags()
    assert {d["dag_id"] for d in dags} == {"a", "b"}
    assert all(d["is_stale"] is False and d["timetable_summary"] is None for d in dags)
    cron = dag_v1({"dag_id": "x", "is_active": False,
                   "schedule_interval": {"__type": "CronExpression", "value": "0 * * * *"}})
    assert (cron["is_stale"], cron["timetable_summary"]) == (True, "0 * * * *")
    every = dag_v1({"dag_id": "x", "is_active": True, "timetable_description": "weekly",
                    "schedule_interval": {"__type": "TimeDelta", "days": 7}})
    assert every["timetable_summary"] == "weekly"


def test_unpause_and_health(fake: FakeAirflowV1) -> None:
    fake.paused["a"] = True
    api = client(fake.url)
    assert api.unpause("a")["is_paused"] is False
    assert fake.paused["a"] is False
    assert api.health()["metadatabase"]["status"] == "healthy"


# --- auth -------------------------------------------------------------------------------------


def test_basic_auth_is_sent_and_a_refused_password_is_403_naming_every_cause(
        fake: FakeAirflowV1) -> None:
    assert client(fake.url).list_runs() == []
    with pytest.raises(AirflowAuthError) as caught:
        client(fake.url, password="wrong").list_runs()
    message = str(caught.value)
    assert "HTTP 403" in message
    assert "airflow.api.auth.backend.basic_auth" in message
    assert "RECONCILER_AIRFLOW_PASSWORD" in message
    assert "wrong" not in message
    assert fake.requests[LIST] == 2  # a 403 is not retried


def test_basic_auth_not_enabled_in_airflow_says_what_to_set() -> None:
    with FakeAirflowV1(["a"], password=PASSWORD, basic_auth=False) as fake, \
            pytest.raises(AirflowAuthError, match=r"\[api\] auth_backends lists "
                                                  r"airflow\.api\.auth\.backend\.basic_auth"):
        client(fake.url).get_run("a", "r")


def test_a_token_is_refused_on_api_v1_before_any_request(fake: FakeAirflowV1) -> None:
    api = client(fake.url, username=None, password=None, token="t0ken")
    with pytest.raises(AirflowAuthError, match=r"RECONCILER_AIRFLOW_TOKEN.* is for Airflow 3"):
        api.list_runs()
    assert fake.total_requests() == 0


def test_5xx_is_retried_and_a_dead_airflow_is_unavailable(fake: FakeAirflowV1) -> None:
    fake.fail_next(2, "503")
    assert client(fake.url).list_runs() == []
    fake.fail_next(10, "500")
    with pytest.raises(AirflowUnavailable):
        client(fake.url, retries=2).list_runs()


# --- which API ------------------------------------------------------------------------------


def test_auto_detects_airflow_2_from_its_version_endpoint(fake: FakeAirflowV1) -> None:
    found = detect(settings(fake.url))
    assert (found.generation, found.version) == ("v1", "2.11.2")
    assert fake.requests["GET /api/v2/version"] == 1  # a 404 on Airflow 2
    assert isinstance(client_for(found, settings(fake.url)), AirflowV1Client)


def test_auto_detects_airflow_3() -> None:
    with FakeAirflow(["a"]) as fake:
        found = detect(settings(fake.url))
        assert found.generation == "v2"
        api = client_for(found, settings(fake.url))
        assert type(api) is AirflowClient


@pytest.mark.parametrize("choice", ["v1", "auto"])
def test_a_right_or_automatic_choice_on_airflow_2(fake: FakeAirflowV1, choice: str) -> None:
    assert detect(settings(fake.url, api=choice)).generation == "v1"


def test_a_wrong_choice_names_what_to_set(fake: FakeAirflowV1) -> None:
    with pytest.raises(AirflowApiMismatch, match=r"RECONCILER_AIRFLOW_API=v2, but .* is "
                                                 r"Airflow 2 \(2\.11\.2\).*set "
                                                 r"RECONCILER_AIRFLOW_API=v1 or auto"):
        detect(settings(fake.url, api="v2"))
    with FakeAirflow(["a"]) as v2, pytest.raises(AirflowApiMismatch,
                                                 match="set RECONCILER_AIRFLOW_API=v2"):
        detect(settings(v2.url, api="v1"))


def test_a_url_without_an_airflow_api_is_a_mismatch() -> None:
    with FakeAirflow(["a"]) as fake:
        fake.fail_next(2, "html")  # an SSO page in front of both version endpoints
        with pytest.raises(AirflowApiMismatch, match="no Airflow REST API at"):
            detect(settings(fake.url))


# --- what doctor says on a 403 --------------------------------------------------------------


def test_explain_refusal_names_the_auth_backend_when_the_password_logs_in() -> None:
    with FakeAirflowV1(["a"], password=PASSWORD, basic_auth=False) as fake:
        said = client(fake.url).explain_refusal()
    assert said.endswith("set AIRFLOW__API__AUTH_BACKENDS=airflow.api.auth.backend."
                         "basic_auth,airflow.api.auth.backend.session and restart its "
                         "webserver")
    assert PASSWORD not in said


def test_explain_refusal_says_the_password_is_wrong_when_the_login_refuses_it(
        fake: FakeAirflowV1) -> None:
    said = client(fake.url, password="wrong").explain_refusal()
    assert "refused the password of user 'admin'" in said
    assert "auth_backends" not in said


def test_explain_refusal_names_the_role_when_the_user_may_not_read(
        fake: FakeAirflowV1) -> None:
    fake.basic_auth = False
    fake.add_user("guest", "guest-pw", "viewer")
    fake.no_access.add("guest")  # logs in, may read nothing
    said = client(fake.url, username="guest", password="guest-pw").explain_refusal()
    assert "give it the role 'User'" in said


# --- before 2.6: no updated_at filter ---------------------------------------------------------


@pytest.mark.parametrize("told", [True, False])
def test_before_2_6_the_incremental_pass_lists_active_and_recently_ended_runs(
        told: bool) -> None:
    """2.4 and 2.5 answer 400 to `updated_at_gte`: what changed since the watermark is
    every run still queued or running plus every run that ended since. With the version
    told (detect), the filter is never sent; untold, its 400 switches the client over."""
    with FakeAirflowV1(["a", "b"], password=PASSWORD, version="2.5.3") as fake:
        long_ago = CYCLE - timedelta(days=30)
        fake.add_run("a", "ended_long_ago", long_ago)
        fake.advance("a", "ended_long_ago", "running", at=long_ago)
        fake.advance("a", "ended_long_ago", "success", at=long_ago)
        fake.add_run("a", "queued", CYCLE)
        fake.add_run("b", "running", CYCLE)
        fake.advance("b", "running", "running")
        fake.add_run("b", "ended_now", CYCLE + timedelta(minutes=1))
        fake.finish_all()  # ends "queued" and "running" too
        fake.add_run("a", "new", CYCLE + timedelta(minutes=2))
        found = detect(settings(fake.url))
        assert found.version == "2.5.3"
        api = (client_for(found, settings(fake.url)) if told else client(fake.url))
        since = datetime.now(UTC) - timedelta(minutes=5)
        changed = api.list_runs({"a", "b"}, updated_at_gte=since)
        assert sorted(r["dag_run_id"] for r in changed) == [
            "ended_now", "new", "queued", "running"]
        assert fake.requests[LIST] == (2 if told else 3)  # the refused one, then two
        assert api.list_runs({"a", "b"}, updated_at_gte=since)  # switched for good
        assert fake.requests[LIST] == (4 if told else 5)
