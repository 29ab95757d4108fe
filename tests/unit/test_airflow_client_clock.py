"""The Airflow client reads time only from the clock it is given: Airflow's clock carried
forward from the `Date` header, the call's deadline, the listing's time bound. The fault
simulation depends on it (real time must not leak into a seed)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable
from reconciler.adapters.bounded_http import Watchdog
from reconciler.core.settings import AirflowSettings
from tests.fakes.clock import FakeClock

SERVER = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
"""Airflow's clock in its answers: far from the real and the fake clock's now on purpose."""


class _Session(requests.Session):
    """Answers every request in-process with `Date: SERVER`; `cost` fake seconds pass
    while the answer is produced (a slow server), `status` is the status it answers."""

    def __init__(self, clock: FakeClock, *, cost: float = 0.0, status: int = 200) -> None:
        super().__init__()
        self.clock = clock
        self.cost = cost
        self.status = status
        self.sent = 0

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        self.sent += 1
        self.clock.advance(self.cost)
        response = requests.Response()
        response.status_code = self.status
        data = json.dumps({"dag_runs": [], "total_entries": 0}).encode()
        response.headers = CaseInsensitiveDict({
            "Content-Type": "application/json", "Content-Length": str(len(data)),
            "Date": format_datetime(SERVER, usegmt=True)})
        response.raw = io.BytesIO(data)
        response._content = False
        response._content_consumed = False  # type: ignore[attr-defined]
        response.url = str(url)
        return response


def _client(session: _Session, clock: FakeClock, **settings: Any) -> AirflowClient:
    return AirflowClient(AirflowSettings(url="http://airflow.test", token="t", **settings),
                         session=session, clock=clock,
                         watchdog=Watchdog(clock.monotonic, threaded=False))


def test_server_now_follows_the_injected_clock_not_the_real_one() -> None:
    clock = FakeClock()
    api = _client(_Session(clock), clock)
    api.list_runs(["a"])
    assert api.server_now() == SERVER
    clock.advance(3600.0)
    # An hour of the injected clock moves Airflow's clock an hour; real time, none.
    assert api.server_now() == SERVER + timedelta(hours=1)
    assert api.server_now() == SERVER + timedelta(hours=1)


def test_the_call_deadline_is_measured_on_the_injected_clock() -> None:
    clock = FakeClock()
    session = _Session(clock, cost=4.0, status=503)
    api = _client(session, clock, timeout=10, retries=50)
    api.sleep = lambda _seconds: None  # only the answers' cost moves time
    with pytest.raises(AirflowUnavailable), api.deadline_of(10.0):
        api.list_runs(["a"])
    # 4 fake seconds an answer against a 10 s deadline: three attempts, then no more
    # (measured on the real clock, the 50 retries would all have been sent).
    assert session.sent == 3
    assert api.last_failure is not None
    assert api.last_failure[0] == clock.monotonic()


def test_an_answer_slower_than_the_deadline_on_the_injected_clock_is_no_answer() -> None:
    clock = FakeClock()
    session = _Session(clock, cost=40.0)
    api = _client(session, clock, timeout=10, retries=1)
    with pytest.raises(AirflowUnavailable) as caught, api.deadline_of(10.0):
        api.list_runs(["a"])
    assert caught.value.no_answer
