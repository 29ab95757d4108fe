"""The Airflow client against the fake Airflow API (tests/fakes): authentication and token
refresh, pagination, incremental listing, 409 adoption, clear, retries within bounds, and
the messages of the errors (never a secret in them). The same behaviour is checked on a
real Airflow 3 in tests/e2e/test_airflow_real.py."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from reconciler.adapters.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowConflict,
    AirflowError,
    AirflowNotFound,
    AirflowRejected,
    AirflowUnavailable,
)
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import DagRun, run_id_for
from tests.fakes.fake_airflow import FakeAirflow, FakeRun

PASSWORD = "s3cret-Pa55"
CYCLE = datetime(2026, 11, 1, tzinfo=UTC)
LIST = "GET /api/v2/dags/~/dagRuns"
BATCH = "POST /api/v2/dags/~/dagRuns/list"
TOKEN = "POST /auth/token"


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    with FakeAirflow(["a", "b"], password=PASSWORD) as f:
        yield f


def client(url: str, *, username: str = "admin", password: str | None = PASSWORD,
           token: str | None = None, retries: int = 3, timeout: float = 1.0,
           deadline: float = 30.0) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=url, username=username, password=password,
                                         token=token, timeout=timeout, retries=retries),
                         backoff_initial=0.01, backoff_max=0.05, deadline=deadline)


def stored(fake: FakeAirflow, dag_id: str, run_id: str) -> FakeRun:
    run = fake.run(dag_id, run_id)
    assert run is not None, f"the fake has no run {dag_id}/{run_id}"
    return run


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- listing --------------------------------------------------------------------------------


def test_lists_every_page_in_id_order(fake: FakeAirflow) -> None:
    for i in range(250):
        fake.add_run("a" if i % 2 else "b", f"r{i:03d}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    runs = api.list_runs()
    assert [r["dag_run_id"] for r in runs] == [f"r{i:03d}" for i in range(250)]
    assert fake.requests[TOKEN] == 1
    assert fake.requests[LIST] == 3  # 100 + 100 + 50
    assert all(DagRun.from_api(r).dag_id in ("a", "b") for r in runs)  # state.py parses them


def test_a_page_size_above_the_servers_cap_still_lists_everything(fake: FakeAirflow) -> None:
    for i in range(150):
        fake.add_run("a", f"r{i}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    assert len(api.list_runs(page_size=500)) == 150  # GET serves 100 at most per page
    assert fake.requests[LIST] == 2


def test_a_relist_of_some_dags_is_filtered_by_airflow(fake: FakeAirflow) -> None:
    for i in range(250):
        fake.add_run("a" if i % 2 else "b", f"r{i}", CYCLE + timedelta(minutes=i))
    api = client(fake.url)
    only_a = api.list_runs(["a"], logical_date_gte=CYCLE + timedelta(minutes=50))
    assert {r["dag_id"] for r in only_a} == {"a"}
    assert len(only_a) == 100  # odd i in 50..249
    assert fake.requests[BATCH] == 1  # the batch form: b's runs never crossed the wire
    assert fake.requests[LIST] == 0
    assert client(fake.url).list_runs(["a", "b"], page_size=300) != []
    assert fake.requests[BATCH] == 2  # the batch form takes pages above 100


def test_no_dag_ids_lists_nothing_without_a_request(fake: FakeAirflow) -> None:
    api = client(fake.url)
    assert api.list_runs([]) == []
    assert api.request_count == 0


def test_incremental_listing_costs_one_request_and_returns_only_changes(
        fake: FakeAirflow) -> None:
    fake.add_run("a", "r1", CYCLE)
    fake.add_run("a", "r2", CYCLE + timedelta(days=1))
    fake.add_run("b", "r3", CYCLE)
    api = client(fake.url)
    api.list_runs(["a", "b"])
    mark = datetime.now(UTC)
    before = api.request_count
    assert api.list_runs(["a"], updated_at_gte=mark) == []
    assert api.request_count - before == 1  # a quiet pass: one request, no token request
    fake.advance("a", "r1", "running")
    fake.advance("b", "r3", "running")
    (changed,) = api.list_runs(["a"], updated_at_gte=mark)  # b's change is filtered out
    assert (changed["dag_run_id"], changed["state"]) == ("r1", "running")
    assert fake.requests[BATCH] == 1  # only the relist: the batch form has no updated_at


def test_the_server_clock_is_kept_for_watermarks(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    assert api.server_time is not None
    assert abs(api.server_time - datetime.now(UTC)) < timedelta(seconds=5)


def test_a_page_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="page_size"):
        client("http://127.0.0.1:9").list_runs(page_size=0)


# --- trigger, get, clear, unpause -----------------------------------------------------------


def test_trigger_creates_a_queued_run_with_the_logical_date_and_conf(fake: FakeAirflow) -> None:
    api = client(fake.url)
    run_id = run_id_for(CYCLE)  # holds ':' and '+', percent-encoded in paths
    raw, created = api.trigger("a", run_id, CYCLE, {"reconciler": {"cycle": "x"}})
    assert created
    run = DagRun.from_api(raw)
    assert (run.run_id, run.logical_date, run.state) == (run_id, CYCLE, "queued")
    assert stored(fake, "a", run_id).conf == {"reconciler": {"cycle": "x"}}
    got = api.get_run("a", run_id)
    assert got is not None
    assert got["dag_run_id"] == run_id
    assert api.get_run("a", "no-such-run") is None


def test_a_repeated_trigger_is_adopted_not_duplicated(fake: FakeAirflow) -> None:
    api = client(fake.url)
    first, _ = api.trigger("a", "reconciler__x", CYCLE, {"k": 1})
    fake.advance("a", "reconciler__x", "running")
    again, created = api.trigger("a", "reconciler__x", CYCLE, {"k": 1})
    assert not created
    assert again["dag_run_id"] == first["dag_run_id"]
    assert again["state"] == "running"  # the run as it is now
    assert len(fake.runs("a")) == 1


def test_another_run_on_the_logical_date_is_a_conflict_naming_it(fake: FakeAirflow) -> None:
    fake.add_run("a", "manual__by_a_human", CYCLE)
    api = client(fake.url)
    with pytest.raises(AirflowConflict, match="'manual__by_a_human'") as info:
        api.trigger("a", run_id_for(CYCLE), CYCLE, {})
    assert info.value.existing is not None
    assert info.value.existing["dag_run_id"] == "manual__by_a_human"
    assert len(fake.runs("a")) == 1


def test_our_run_id_on_another_logical_date_is_a_conflict(fake: FakeAirflow) -> None:
    fake.add_run("a", "reconciler__x", CYCLE + timedelta(days=1))
    with pytest.raises(AirflowConflict, match="not made by the reconciler"):
        client(fake.url).trigger("a", "reconciler__x", CYCLE, {})


def test_a_naive_logical_date_is_refused_before_any_request(fake: FakeAirflow) -> None:
    api = client(fake.url)
    with pytest.raises(ValueError, match="timezone-aware"):
        api.trigger("a", "r", datetime(2026, 1, 1), {})
    assert api.request_count == 0


def test_clear_queues_the_run_again_and_the_incremental_list_sees_it(
        fake: FakeAirflow) -> None:
    api = client(fake.url)
    run_id = run_id_for(CYCLE)
    api.trigger("a", run_id, CYCLE, {})
    fake.finish_all()
    ended = stored(fake, "a", run_id).end_date
    assert ended is not None
    mark = datetime.now(UTC)
    cleared, sent = api.clear("a", run_id, cleared_end=ended)
    assert sent
    assert (cleared["state"], cleared["start_date"], cleared["end_date"]) == ("queued", None,
                                                                              None)
    assert [r["dag_run_id"] for r in api.list_runs(updated_at_gte=mark)] == [run_id]
    fake.finish_all()
    again = stored(fake, "a", run_id).end_date
    assert again is not None
    assert again > ended  # the re-run has a new end_date
    with pytest.raises(AirflowNotFound, match="run 'gone' of DAG 'a'"):
        api.clear("a", "gone")


def test_unknown_dag_is_not_found_and_named(fake: FakeAirflow) -> None:
    api = client(fake.url)
    with pytest.raises(AirflowNotFound, match="DAG 'nope' is not in Airflow"):
        api.trigger("nope", "r", CYCLE, {})
    with pytest.raises(AirflowNotFound, match="DAG 'nope'"):
        api.unpause("nope")


def test_unpause_and_health(fake: FakeAirflow) -> None:
    fake.paused["a"] = True
    api = client(fake.url)
    assert api.unpause("a")["is_paused"] is False
    assert fake.paused["a"] is False
    assert api.health()["metadatabase"]["status"] == "healthy"


def test_a_client_error_is_not_retried(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=4)
    with pytest.raises(AirflowError, match=r"answered 400.*does not match regex") as info:
        api.trigger("a", "bad run id!", CYCLE, {})
    assert type(info.value) is AirflowRejected  # needs a human: not retried
    assert fake.requests["POST /api/v2/dags/{dag_id}/dagRuns"] == 1


# --- authentication -------------------------------------------------------------------------


def test_an_expired_token_is_fetched_again_once(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    fake.expire_tokens()  # the JWT's exp passed: 401 "Token Expired"
    assert api.list_runs() == []
    assert fake.requests[TOKEN] == 2
    assert fake.requests[LIST] == 3  # the first list, the refused one, the repeat


def test_a_token_signed_with_an_old_secret_is_fetched_again_once(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    fake.rotate_secret()  # Airflow restarted with a new JWT secret: 403 "Invalid JWT token"
    assert api.list_runs() == []
    assert fake.requests[TOKEN] == 2


def test_a_token_refused_twice_is_an_auth_error_after_one_refresh(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    fake.fail_next(2, "401")
    with pytest.raises(AirflowAuthError, match=r"user 'admin'.*HTTP 401"):
        api.list_runs()
    assert fake.requests[TOKEN] == 2  # one refresh, no loop


def test_a_static_token_is_never_refreshed(fake: FakeAirflow) -> None:
    api = client(fake.url)
    api.list_runs()
    (token,) = fake.tokens
    static = client(fake.url, username="", password=None, token=token)
    assert static.list_runs() == []
    fake.expire_tokens()
    with pytest.raises(AirflowAuthError, match="RECONCILER_AIRFLOW_TOKEN") as info:
        static.list_runs()
    assert token not in str(info.value)
    assert fake.requests[TOKEN] == 1


def test_wrong_password_and_missing_credentials_are_auth_errors(fake: FakeAirflow) -> None:
    with pytest.raises(AirflowAuthError, match=r"refused the password of user 'admin'") as info:
        client(fake.url, password="wrong-" + PASSWORD).list_runs()
    assert PASSWORD not in str(info.value)
    with pytest.raises(AirflowAuthError, match="RECONCILER_AIRFLOW_USERNAME"):
        client(fake.url, username="", password=None).list_runs()


def test_forbidden_names_the_user_and_the_role_it_needs(fake: FakeAirflow) -> None:
    fake.add_user("reader", "reader-Pa55", role="viewer")
    api = client(fake.url, username="reader", password="reader-Pa55")
    assert api.list_runs(["a"]) == []  # reading is allowed, the batch POST included
    with pytest.raises(AirflowAuthError, match=r"user 'reader' at http://127\.0\.0\.1:\d+ may "
                                               r"not POST .*HTTP 403.*role") as info:
        api.trigger("a", "r", CYCLE, {})
    assert "reader-Pa55" not in str(info.value)
    assert fake.requests[TOKEN] == 1  # a plain 403 is not a stale token


# --- retries and bounds ---------------------------------------------------------------------


def test_5xx_is_retried_then_succeeds(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=3)
    api.list_runs()
    fake.fail_next(2, "500")
    before = api.request_count
    assert api.list_runs() == []
    assert api.request_count - before == 3


def test_a_trigger_retried_after_a_5xx_is_not_duplicated(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=3)
    api.list_runs()
    fake.fail_next(1, "500")
    _, created = api.trigger("a", "reconciler__x", CYCLE, {})
    assert created
    assert len(fake.runs("a")) == 1


def test_gives_up_after_the_retries_with_airflow_unavailable(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=3)
    api.list_runs()
    fake.fail_next(10, "500")
    before = api.request_count
    started = time.monotonic()
    with pytest.raises(AirflowUnavailable, match="answered 500") as info:
        api.list_runs()
    assert not info.value.no_answer  # Airflow answered, with an error
    assert api.request_count - before == 3
    assert time.monotonic() - started < 2


def test_a_hanging_airflow_times_out_within_bounds(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=2, timeout=0.5)
    api.list_runs()
    fake.fail_next(2, "hang", 3)
    started = time.monotonic()
    with pytest.raises(AirflowUnavailable, match="timed out") as info:
        api.list_runs()
    assert time.monotonic() - started < 2.5  # two reads of 0.5 s and a short backoff
    assert info.value.no_answer  # reached, but no answer came: what the executor's hint reads


def test_the_deadline_bounds_a_call_whatever_the_retries(fake: FakeAirflow) -> None:
    api = client(fake.url, retries=50, timeout=1.0, deadline=1.5)
    api.list_runs()
    fake.fail_next(50, "hang", 3)
    started = time.monotonic()
    with pytest.raises(AirflowUnavailable):
        api.list_runs()
    assert time.monotonic() - started < 3


def test_refused_connection_is_unavailable_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(AirflowUnavailable, match=f"cannot connect to Airflow at {url}") as info:
        client(url, retries=2).list_runs()
    assert not info.value.no_answer  # not reached at all
    assert time.monotonic() - started < 5


def test_a_malformed_url_is_a_configuration_error_not_a_retry() -> None:
    api = client("htp//no-scheme", retries=4)
    with pytest.raises(AirflowError, match="check RECONCILER_AIRFLOW_URL") as info:
        api.list_runs()
    assert not isinstance(info.value, AirflowUnavailable)
    assert api.request_count == 1


def test_no_error_message_contains_a_secret(fake: FakeAirflow) -> None:
    """Every kind of failure, with the password and the live token checked in each."""
    fake.add_user("reader", PASSWORD, role="viewer")
    api = client(fake.url)
    api.list_runs()
    (token,) = fake.tokens
    failures: list[AirflowError] = []

    def collect(call: object) -> None:
        with pytest.raises(AirflowError) as info:
            call()  # type: ignore[operator]
        failures.append(info.value)

    collect(lambda: client(fake.url, password="x" + PASSWORD).list_runs())
    collect(lambda: client(fake.url, username="reader").trigger("a", "r", CYCLE, {}))
    collect(lambda: api.trigger("nope", "r", CYCLE, {}))
    collect(lambda: api.trigger("a", "bad id!", CYCLE, {}))
    fake.fail_next(3, "500")
    collect(lambda: api.list_runs())
    fake.fail_next(2, "401")
    collect(lambda: api.list_runs())
    collect(lambda: client(fake.url, username="", password=None, token=token + "x").list_runs())
    assert len(failures) == 7
    for error in failures:
        for text in (str(error), repr(error)):
            assert PASSWORD not in text
            assert token not in text


@pytest.mark.parametrize("body", [b"null", b"[]", b"\"ok\"", b"17"])
def test_an_answer_that_is_not_an_object_is_rejected_not_a_type_error(
        fake: FakeAirflow, body: bytes) -> None:
    # Simulation seed 115: a health probe answered `null`, and dict(None) killed the pass
    # with a TypeError outside the error hierarchy.
    api = client(fake.url)
    api.trigger("a", run_id_for(CYCLE), CYCLE, {})
    session = requests.Session()
    session.trust_env = False
    real = session.request

    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        answer = real(method, url, **kwargs)
        if "/auth/token" in url:
            return answer
        answer.close()
        odd = requests.Response()
        odd.status_code = 200
        odd.headers["Content-Type"] = "application/json"
        odd.raw = io.BytesIO(body)
        odd.url = url
        return odd

    session.request = request  # type: ignore[method-assign]
    api._shared_session = session
    with pytest.raises(AirflowRejected, match="not an object"):
        api.health()
    with pytest.raises(AirflowRejected, match="not an object"):
        api.get_run("a", run_id_for(CYCLE))
    with pytest.raises(AirflowRejected, match="not an object"):
        api.unpause("a")


# --- task instances in one batch ------------------------------------------------------------


def test_the_task_instance_batch_keeps_only_the_runs_asked_and_reads_every_page(
        fake: FakeAirflow) -> None:
    """Airflow filters `dag_ids` and `dag_run_ids` apart: asking (a, r1) and (b, r2) also
    lists (a, r2) and (b, r1), which are dropped; 250 task instances take 3 pages of 100;
    a run without task instances maps to []."""
    when = datetime.now(UTC).replace(microsecond=0)
    for dag_id in ("a", "b"):
        for n in (1, 2, 3):
            fake.add_run(dag_id, f"r{n}", when - timedelta(hours=n))
    fake.tis[("a", "r1")] = [{"task_id": "t", "map_index": i, "state": "success"}
                             for i in range(250)]
    fake.tis[("a", "r2")] = [{"task_id": "other", "map_index": -1, "state": "running"}]
    fake.tis[("b", "r1")] = [{"task_id": "other", "map_index": -1, "state": "running"}]
    found = client(fake.url).task_instances_of([("a", "r1"), ("b", "r2"), ("a", "r1")],
                                               page_size=100)
    assert set(found) == {("a", "r1"), ("b", "r2")}
    assert [t["map_index"] for t in found[("a", "r1")]] == list(range(250))
    assert found[("b", "r2")] == []
    assert fake.requests["POST /api/v2/dags/~/dagRuns/~/taskInstances/list"] == 3
