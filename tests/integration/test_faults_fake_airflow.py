"""The fake Airflow's scheduler and books (tests/fakes/fake_airflow.py), which the process
fault tests stand on: runs move queued -> running -> success on their own, a scheduled root
run appears on demand, and duplicate triggers and clears are counted. Each test runs against
both API generations: v2 (Airflow 3) and the fake's v1 layer (Airflow 2, basic auth)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1, api_of
from tests.helpers import EXAMPLE_DAGS


@pytest.fixture(params=["v2", "v1"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    with (FakeAirflowV1 if request.param == "v1" else FakeAirflow)(EXAMPLE_DAGS) as f:
        yield f


def poll(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
    return value


def call(fake: FakeAirflow, method: str, path: str, body: Any = None,
         token: str | None = None) -> tuple[int, Any, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    request = urllib.request.Request(fake.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            raw = answer.read()
            kind = answer.headers.get("Content-Type", "")
            return answer.status, json.loads(raw) if "json" in kind else raw, kind
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("Content-Type", "")


def token(fake: FakeAirflow) -> str:
    """The Authorization header: basic auth on v1, a bearer token from /auth/token on v2."""
    if isinstance(fake, FakeAirflowV1):
        return "Basic " + base64.b64encode(b"admin:secret-pw").decode()
    status, body, _ = call(fake, "POST", "/auth/token",
                           {"username": "admin", "password": "secret-pw"})
    assert status == 201
    return f"Bearer {body['access_token']}"


def test_the_scheduler_runs_a_scheduled_root_and_triggered_runs(fake: FakeAirflow) -> None:
    fake.auto_schedule(run_seconds=0.2, queue_seconds=0.05)
    root = fake.schedule_root()
    assert root.run_type == "scheduled"
    assert root.state == "queued"
    assert root.run_id == f"scheduled__{root.logical_date.isoformat()}"  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - root.logical_date).total_seconds()) < 5  # type: ignore[operator]
    poll(lambda: root.state == "running")
    assert root.start_date is not None
    poll(lambda: root.state == "success")
    assert root.end_date is not None
    assert root.end_date - root.start_date >= timedelta(seconds=0.2)

    t = token(fake)
    body = {"dag_run_id": "reconciler__x", "logical_date": root.to_api()["logical_date"]}
    assert call(fake, "POST", f"{api_of(fake)}/dags/02_pipeline/dagRuns", body, t)[0] == 200
    assert call(fake, "POST", f"{api_of(fake)}/dags/02_pipeline/dagRuns", body, t)[0] == 409
    run = fake.run("02_pipeline", "reconciler__x")
    assert run is not None
    poll(lambda: run.state == "success")
    assert fake.created[("02_pipeline", "reconciler__x")] == 1
    assert fake.conflicts[("02_pipeline", "reconciler__x")] == 1
    assert fake.duplicate_triggers() == {}
    assert fake.cycle_runs(root.logical_date)["02_pipeline"] == [run]  # type: ignore[arg-type]

    # a clear of a finished run is fine; a second one before the re-run ended is a duplicate
    ended = run.end_date
    clear = f"{api_of(fake)}/dags/02_pipeline/dagRuns/reconciler__x/clear"
    assert call(fake, "POST", clear, {"dry_run": False}, t)[0] == 200
    assert fake.clears[("02_pipeline", "reconciler__x")][0].end_date_before == ended
    assert fake.duplicate_clears() == {}
    assert call(fake, "POST", clear, {"dry_run": False}, t)[0] == 200
    assert list(fake.duplicate_clears()) == [("02_pipeline", "reconciler__x")]
    assert fake.clear_count("02_pipeline", "reconciler__x") == 2
    poll(lambda: run.state == "success")
    assert run.end_date is not None
    assert ended is not None
    assert run.end_date > ended


def test_paused_dags_and_failing_outcomes(fake: FakeAirflow) -> None:
    fake.auto_schedule(run_seconds=0.05, queue_seconds=0.0)
    fake.paused["02_pipeline"] = True
    fake.outcomes["03_pipeline"] = "failed"
    now = datetime.now(UTC)
    held = fake.add_run("02_pipeline", "a", now)
    failing = fake.add_run("03_pipeline", "b", now)
    poll(lambda: failing.state == "failed")
    assert held.state == "queued"
    fake.paused["02_pipeline"] = False
    poll(lambda: held.state == "success")
    fake.stop_schedule()
    late = fake.add_run("04_pipeline", "c", now)
    time.sleep(0.2)  # the scheduler is stopped: nothing may move (a negative check)
    assert late.state == "queued"


def test_faults_for_one_route_html_and_the_request_log(fake: FakeAirflow) -> None:
    t = token(fake)
    api = api_of(fake)
    fake.fail_next(1, "html", route=f"GET {api}/dags")
    fake.fail_next(1, "503", route=f"POST {api}/dags/{{dag_id}}/dagRuns")
    status, body, kind = call(fake, "GET", f"{api}/dags", token=t)
    assert status == 200
    assert kind.startswith("text/html")
    assert body.startswith(b"<!DOCTYPE html>")
    started = time.monotonic()
    trigger = {"dag_run_id": "r", "logical_date": datetime.now(UTC).isoformat()}
    assert call(fake, "GET", f"{api}/dags/~/dagRuns", token=t)[0] == 200  # not that route
    assert call(fake, "POST", f"{api}/dags/05_pipeline/dagRuns", trigger, t)[0] == 503
    assert call(fake, "POST", f"{api}/dags/05_pipeline/dagRuns", trigger, t)[0] == 200
    # The fake logs a request after its answer is sent: give the handler thread a moment.
    named = f"POST {api}/dags/{{"
    deadline = time.monotonic() + 5
    while len([r for r in fake.log if r.route.startswith(named)]) < 2:
        assert time.monotonic() < deadline, fake.log
        time.sleep(0.01)
    first = fake.first_request(f"POST {api}/dags/{{dag_id}}/dagRuns", after=started)
    assert first is not None
    assert (first.dag_id, first.run_id, first.status) == ("05_pipeline", None, 503)
    # In order of arrival: each is logged once answered, by its own handler thread.
    arrived = sorted(fake.log, key=lambda r: r.at)
    assert [r.status for r in arrived if r.route.startswith(named)] == [503, 200]
