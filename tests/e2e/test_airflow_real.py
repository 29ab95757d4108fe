"""The Airflow client against a REAL Airflow 3 (`airflow standalone`, tests/fixtures): the
API facts the reconciler relies on (DESIGN section 10, docs/airflow.md) and the client's
handling of them: tokens (201, 24 h, refresh on 401 "Token Expired" and on 403 "Invalid
JWT token"), listing (pagination, the batch form, incremental by updated_at_gte),
trigger with a deterministic run id and a past logical date (409 adopted; the same
logical date under another run id is a conflict), clear (the run runs again, a new
end_date), unknown DAGs, and what the roles may do. Polls with `eventually`, never sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from reconciler.adapters.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowConflict,
    AirflowNotFound,
)
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import DagRun, run_id_for
from tests.e2e.conftest import eventually, new_cycle
from tests.fixtures.airflow import note


def client_for(server: Any, username: str | None = None) -> AirflowClient:
    name = username or server.username
    return AirflowClient(AirflowSettings(url=server.url, username=name,
                                         password=server.users[name], timeout=10))


@pytest.fixture
def api(airflow_server: Any) -> AirflowClient:
    return client_for(airflow_server)


def finished(api: AirflowClient, dag_id: str, run_id: str,
             after: datetime | None = None) -> DagRun | None:
    """The run once it is success/failed (and ended after `after`), else None."""
    raw = api.get_run(dag_id, run_id)
    run = DagRun.from_api(raw) if raw else None
    if run is None or not run.finished:
        return None
    if after is not None and (run.end_date is None or run.end_date <= after):
        return None
    return run


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def forged_token(secret: str, claims: dict[str, Any]) -> str:
    """An HS512 JWT signed with the API server's secret: how Airflow signs its own."""
    head = _b64(json.dumps({"alg": "HS512", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha512).digest()
    return f"{head}.{body}.{_b64(signature)}"


def raw_get(server: Any, path: str, token: str) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(server.url + path, headers={"Authorization": f"Bearer {token}"},
                           timeout=10)


# --- authentication -------------------------------------------------------------------------


def test_token_endpoint_and_health(airflow_server: Any, api: AirflowClient) -> None:
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(f"{airflow_server.url}/auth/token", timeout=10, json={
            "username": "admin", "password": airflow_server.password})
        assert answer.status_code == 201
        claims = _claims(answer.json()["access_token"])
        assert claims["exp"] - claims["iat"] == 86400  # 24 h by default
        wrong = session.post(f"{airflow_server.url}/auth/token", timeout=10,
                             json={"username": "admin", "password": "wrong"})
        assert (wrong.status_code, wrong.json()) == (401, {"detail": "Invalid credentials"})
        anonymous = session.get(f"{airflow_server.url}/api/v2/dags", timeout=10)
        assert anonymous.status_code == 401
    health = api.health()
    assert {part["status"] for part in health.values()} == {"healthy"}


def test_expired_and_foreign_tokens_are_replaced_once(airflow_server: Any,
                                                      api: AirflowClient) -> None:
    real = airflow_server.token()
    now = int(time.time())
    expired = forged_token(airflow_server.jwt_secret, {
        **_claims(real), "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600})
    foreign = forged_token("another-secret-" + airflow_server.jwt_secret, _claims(real))
    # What Airflow answers, verbatim: the client keys on these.
    answer = raw_get(airflow_server, "/api/v2/dags?limit=1", expired)
    assert (answer.status_code, answer.json()) == (401, {"detail": "Token Expired"})
    answer = raw_get(airflow_server, "/api/v2/dags?limit=1", foreign)
    assert (answer.status_code, answer.json()) == (403, {"detail": "Invalid JWT token"})
    for stale in (expired, foreign):
        api._token = stale  # as if issued long ago / by an API server with another secret
        before = api.request_count
        api.list_runs(["02_pipeline"], page_size=1)
        assert api._token not in (stale, None)
        assert api.request_count - before >= 3  # refused, a new token, the request again


def test_wrong_password_is_an_auth_error_without_the_secret(airflow_server: Any) -> None:
    secret = "not-the-" + airflow_server.password
    api = AirflowClient(AirflowSettings(url=airflow_server.url, username="admin",
                                        password=secret))
    with pytest.raises(AirflowAuthError, match="user 'admin'") as info:
        api.list_runs(["02_pipeline"])
    assert secret not in str(info.value)


def test_role_user_is_enough_and_role_viewer_may_only_read(airflow_server: Any) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    user = client_for(airflow_server, "reconciler")  # simple auth manager role "user"
    user.list_runs(["04_pipeline"], logical_date_gte=cycle)
    user.list_runs(updated_at_gte=datetime.now(UTC))
    _, created = user.trigger("04_pipeline", run_id, cycle, {})
    assert created
    eventually(lambda: finished(user, "04_pipeline", run_id), 120, "the run")
    assert user.clear("04_pipeline", run_id)[0]["dag_run_id"] == run_id

    viewer = client_for(airflow_server, "viewer")
    assert any(r["dag_run_id"] == run_id for r in viewer.list_runs(["04_pipeline"]))
    with pytest.raises(AirflowAuthError, match=r"user 'viewer' .* may not POST .*HTTP 403"
                       ) as info:
        viewer.trigger("04_pipeline", "reconciler__viewer", cycle + timedelta(seconds=1), {})
    assert airflow_server.users["viewer"] not in str(info.value)


# --- trigger, adopt, conflicts --------------------------------------------------------------


def test_trigger_with_a_deterministic_run_id_a_past_logical_date_and_conf(
        api: AirflowClient) -> None:
    cycle = new_cycle()
    assert cycle < datetime.now(UTC) - timedelta(hours=1)
    run_id = run_id_for(cycle)  # reconciler__<ISO>: ':' and '+' in a URL path
    conf = {"target": "mart", "reconciler": {"commit": "abc123", "cycle": cycle.isoformat()}}
    raw, created = api.trigger("02_pipeline", run_id, cycle, conf)
    assert created
    run = DagRun.from_api(raw)
    assert (run.dag_id, run.run_id, run.logical_date, run.state, run.run_type) == (
        "02_pipeline", run_id, cycle, "queued", "manual")
    assert run.queued_at is not None
    assert raw["conf"] == conf
    done = eventually(lambda: finished(api, "02_pipeline", run_id), 120, "the run")
    assert done.state == "success"
    assert done.start_date is not None
    assert done.end_date is not None
    started = (done.start_date - run.queued_at).total_seconds()
    ended = (done.end_date - run.queued_at).total_seconds()
    note(f"02_pipeline run: queued->running {started:.2f} s, queued->success {ended:.2f} s")
    got = api.get_run("02_pipeline", run_id)
    assert got is not None
    assert got["conf"] == conf


def test_a_repeated_trigger_is_adopted_and_the_logical_date_stays_taken(
        api: AirflowClient) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    first, _ = api.trigger("05_pipeline", run_id, cycle, {"k": 1})
    again, created = api.trigger("05_pipeline", run_id, cycle, {"k": 2})  # 409 -> adopted
    assert not created
    assert again["dag_run_id"] == first["dag_run_id"]
    assert again["conf"] == {"k": 1}  # the run as it was made, not the second conf
    # Another run id on the same logical date: also 409 on Airflow 3 (unique
    # (dag_id, logical_date)); not ours, so a conflict that names the holder.
    with pytest.raises(AirflowConflict, match="another run for logical date") as info:
        api.trigger("05_pipeline", "someone_else", cycle, {})
    assert info.value.existing is not None
    assert info.value.existing["dag_run_id"] == run_id
    # Our run id on another logical date: 409 too, and not adoptable.
    with pytest.raises(AirflowConflict, match="not made by the reconciler"):
        api.trigger("05_pipeline", run_id, cycle + timedelta(seconds=30), {})
    runs = api.list_runs(["05_pipeline"], logical_date_gte=cycle)
    assert [r["dag_run_id"] for r in runs if r["logical_date"]
            and DagRun.from_api(r).logical_date == cycle] == [run_id]


def test_unknown_dags_and_runs_are_not_found(api: AirflowClient) -> None:
    cycle = new_cycle()
    with pytest.raises(AirflowNotFound, match="DAG 'no_such_dag' is not in Airflow"):
        api.trigger("no_such_dag", run_id_for(cycle), cycle, {})
    with pytest.raises(AirflowNotFound, match="run 'no_such_run' of DAG '02_pipeline'"):
        api.clear("02_pipeline", "no_such_run")
    with pytest.raises(AirflowNotFound, match="DAG 'no_such_dag'"):
        api.unpause("no_such_dag")
    assert api.get_run("02_pipeline", "no_such_run") is None


# --- listing and clear ----------------------------------------------------------------------


def test_listing_pages_through_both_forms(api: AirflowClient) -> None:
    cycle = new_cycle()
    for i in range(5):
        api.trigger("06_pipeline", f"page_{i}__{run_id_for(cycle)}",
                    cycle + timedelta(seconds=i), {})
    before = api.request_count
    batch = api.list_runs(["06_pipeline"], logical_date_gte=cycle, page_size=2)
    assert api.request_count - before == 3  # 2 + 2 + 1, filtered by Airflow
    assert [r["dag_run_id"] for r in batch] == [f"page_{i}__{run_id_for(cycle)}"
                                                for i in range(5)]
    everything = api.list_runs(logical_date_gte=cycle, page_size=2)
    assert {r["dag_run_id"] for r in batch} <= {r["dag_run_id"] for r in everything}


def test_clear_reruns_with_a_new_end_date_and_incremental_listing_sees_only_that(
        api: AirflowClient) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    api.trigger("03_pipeline", run_id, cycle, {})
    api.trigger("07_pipeline", run_id, cycle, {})
    done = eventually(lambda: finished(api, "03_pipeline", run_id), 120, "the first run")
    eventually(lambda: finished(api, "07_pipeline", run_id), 120, "the other run")

    before = api.request_count
    assert api.list_runs(["03_pipeline"], updated_at_gte=datetime.now(UTC) + timedelta(hours=1)
                         ) == []
    assert api.request_count - before == 1  # a quiet incremental pass: one request

    mark = datetime.now(UTC)
    cleared, _ = api.clear("03_pipeline", run_id)
    assert (cleared["dag_run_id"], cleared["state"], cleared["end_date"]) == (run_id, "queued",
                                                                              None)
    changed = {(r["dag_id"], r["dag_run_id"])
               for r in api.list_runs(["03_pipeline", "07_pipeline"], updated_at_gte=mark)}
    assert ("03_pipeline", run_id) in changed
    assert ("07_pipeline", run_id) not in changed  # finished before the mark, untouched
    again = eventually(lambda: finished(api, "03_pipeline", run_id, after=done.end_date),
                       120, "the re-run")
    assert again.run_id == run_id
    assert again.end_date > done.end_date  # type: ignore[operator]
    assert len([r for r in api.list_runs(["03_pipeline"], logical_date_gte=cycle)
                if r["dag_run_id"] == run_id]) == 1  # the same run, not a new one


def test_a_run_fails_on_demand(api: AirflowClient) -> None:
    cycle = new_cycle()
    run_id = run_id_for(cycle)
    api.trigger("04_pipeline", run_id, cycle, {"fail": True})
    done = eventually(lambda: finished(api, "04_pipeline", run_id), 120, "the run")
    assert done.state == "failed"
