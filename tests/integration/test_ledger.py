"""One ledger, never two truths: the loop's memory of what it asked Airflow to do follows
every write the executor makes, whatever etcd answers (service/ledger.py), and every
answer Airflow gives becomes an outcome (service/executor.py). Real etcd (paused for the
outage), the fake Airflow behind the real client, on both API generations (v2, and v1 with
the v1 client)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowRejected
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore, StoreError, StoreUnavailable
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.core.state import LedgerState, run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1, api_of
from tests.fixtures.etcd import EtcdServer
from tests.helpers import EXAMPLE_DAGS, example_repo
from tests.integration.test_eager import TaskFake, ti, up_to_05_running

CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
RUN = run_id_for(CYCLE)


def trigger_route(fake: FakeAirflow) -> str:
    return f"POST {api_of(fake)}/dags/{{dag_id}}/dagRuns"


def clear_route(fake: FakeAirflow) -> str:
    return f"POST {api_of(fake)}/dags/{{dag_id}}/dagRuns/{{run_id}}/clear"


class AnsweringFake(TaskFake):
    """The fake Airflow whose answers a test can replace once they took effect:
    `answers[dag_id] = (status, body bytes, content type)` for that DAG's next trigger."""

    def __init__(self, dag_ids: list[str]) -> None:
        super().__init__(dag_ids)
        self.answers: dict[str, tuple[int, bytes, str]] = {}

    def _reply(self, h: Any, status: int, body: Any,
               content_type: str = "application/json") -> None:
        request = getattr(h, "_request", None)
        if (request is not None and request.route == trigger_route(self)
                and request.dag_id in self.answers):
            status, body, content_type = self.answers.pop(request.dag_id)
        super()._reply(h, status, body, content_type)


class AnsweringFakeV1(AnsweringFake, FakeAirflowV1):
    """The same, as Airflow 2 answers (v1 paths, basic auth)."""


@pytest.fixture
def etcd(etcd_killable: EtcdServer) -> Iterator[EtcdServer]:
    yield etcd_killable
    if etcd_killable.paused:
        etcd_killable.resume()


@pytest.fixture
def store(etcd: EtcdServer, tmp_path: Path) -> Iterator[EtcdStore]:
    # A short deadline: the write during the outage fails in 0.5 s, not 5.
    s = EtcdStore(etcd.settings(timeout=0.5))
    assert sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", s, source="t",
                now=datetime.now(UTC) - timedelta(days=60)).ok
    yield s
    s.close()


@pytest.fixture(params=["v2", "v1"])
def fake(request: pytest.FixtureRequest) -> Iterator[AnsweringFake]:
    with (AnsweringFakeV1 if request.param == "v1" else AnsweringFake)(EXAMPLE_DAGS) as f:
        f.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                  run_type="scheduled")
        f.finish_all()
        yield f


def reconciler(store: EtcdStore, fake: FakeAirflow, **loop: Any) -> Reconciler:
    cls = AirflowV1Client if isinstance(fake, FakeAirflowV1) else AirflowClient
    api = cls(AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                              timeout=2, retries=1), backoff_initial=0.01)
    return Reconciler(store, api, LoopSettings(**{"interval": 0.05, "lease_ttl": 10, **loop}),
                      holder="r1")


def until_etcd_answers(store: EtcdStore, timeout: float = 15) -> None:
    """After an outage the client keeps the endpoint marked failed for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.revision()
            return
        except StoreError:
            assert time.monotonic() < deadline, "etcd did not come back"
            time.sleep(0.1)


def passes(r: Reconciler, n: int) -> list[tuple[str, str]]:
    """`n` passes; the (kind, dag_id) of every action that took effect."""
    done: list[tuple[str, str]] = []
    for _ in range(n):
        done += [(a.kind.value, a.dag_id) for a in r.run_pass().actions]
    return done


@pytest.mark.real_clock  # etcd paused: only a request timeout (gRPC's: wall-clock) ends it
def test_an_eager_trigger_whose_result_write_fails_is_adopted_not_cleared(
        etcd: EtcdServer, store: EtcdStore, fake: AnsweringFake) -> None:
    """The probe's case. 05's tasks all succeed, 06 is triggered on the eager path; etcd
    hangs while Airflow answers, so the "done" write fails and etcd keeps 06's intent; the
    term does not change. 06 starts, then Airflow closes 05. The loop must know its own
    unconfirmed intent and adopt 06, not clear it as a stranger's run that started before
    its upstreams: 06 runs once, 07 once."""
    r = reconciler(store, fake)
    up_to_05_running(r, fake)
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success"), ti("load", "success")]
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())

    def hang_etcd(request: Any) -> None:
        if request.route == trigger_route(fake) and request.dag_id == "06_pipeline":
            fake.before_reply = None
            etcd.pause()  # the trigger took effect; its result cannot be written

    fake.before_reply = hang_etcd
    term = r.leadership.term
    with contextlib.suppress(StoreUnavailable):  # the pass's status write fails too
        r.run_pass()
    assert etcd.paused
    time.sleep(1.0)  # an outage of about 1.5 s in all
    etcd.resume()
    until_etcd_answers(store)
    # etcd holds the intent, or "done" when the timed-out write was still applied once it
    # resumed (the client cannot know which): memory holds the intent, unconfirmed.
    assert store.read_ledger()[(CYCLE.isoformat(), "06_pipeline")]["state"] in (
        "intent", "done")
    assert r.ledger.get(CYCLE, "06_pipeline").state is LedgerState.INTENT  # type: ignore[union-attr]

    fake.advance("06_pipeline", RUN, "running")
    time.sleep(0.01)
    fake.advance("05_pipeline", RUN, "success")  # Airflow closes 05 after 06 started
    assert fake.run("06_pipeline", RUN).start_date < fake.run("05_pipeline", RUN).end_date  # type: ignore[union-attr,operator]
    assert passes(r, 2) == [("adopt", "06_pipeline")]
    assert r.leadership.term == term  # the same term: memory was never re-read
    fake.advance("06_pipeline", RUN, "success")
    assert passes(r, 3) == [("trigger", "07_pipeline")]
    fake.advance("07_pipeline", RUN, "running")
    fake.advance("07_pipeline", RUN, "success")
    assert passes(r, 2) == []
    assert fake.requests[clear_route(fake)] == 0  # 06 never cleared
    assert len(fake.runs("06_pipeline")) == 1
    assert len(fake.runs("07_pipeline")) == 1
    assert fake.duplicate_triggers() == {}
    assert store.read_ledger()[(CYCLE.isoformat(), "06_pipeline")]["state"] == "done"


@pytest.mark.real_clock  # etcd paused: only a request timeout (gRPC's: wall-clock) ends it
def test_an_intent_etcd_did_not_take_is_remembered_and_no_call_is_made(
        etcd: EtcdServer, store: EtcdStore, fake: AnsweringFake) -> None:
    """etcd hangs on the intent write itself: Airflow is not called, memory holds the
    intent (unconfirmed), and once etcd is back the trigger goes out once."""
    r = reconciler(store, fake)
    r.run_pass()  # 02-05 triggered
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"):
        fake.advance(dag_id, RUN, "running")
        fake.advance(dag_id, RUN, "success")
    triggers = fake.requests[trigger_route(fake)]
    etcd.pause()
    with contextlib.suppress(StoreUnavailable):
        report = r.run_pass()  # plans 06; its intent write times out
        assert [(o.action.dag_id, o.result) for o in report.outcomes] == [
            ("06_pipeline", "failed")]
    etcd.resume()
    assert fake.requests[trigger_route(fake)] == triggers  # no call without the intent
    assert r.ledger.get(CYCLE, "06_pipeline").state is LedgerState.INTENT  # type: ignore[union-attr]
    until_etcd_answers(store)
    r.executor._retry_after.clear()  # the store's backoff, not under test here
    assert passes(r, 2) == [("trigger", "06_pipeline")]
    assert len(fake.runs("06_pipeline")) == 1


MALFORMED = {
    "a 200 without a run id": (200, json.dumps({"state": "queued"}).encode(),
                               "application/json"),
    "another run's answer": (200, json.dumps({"dag_run_id": "manual__x", "state": "queued"})
                             .encode(), "application/json"),
    "an empty list": (200, b"[]", "application/json"),
    "a list of runs": (200, json.dumps([{"dag_run_id": RUN}]).encode(), "application/json"),
    "an empty object": (200, b"{}", "application/json"),
    "a body that is not JSON": (200, b"OK", "text/plain"),
    "an HTML page": (200, b"<html><body>Sign in</body></html>", "text/html"),
    "a date that is not one": (200, json.dumps({"dag_run_id": RUN, "start_date": "soon"})
                               .encode(), "application/json"),
}


@pytest.mark.parametrize("answer", sorted(MALFORMED))
def test_a_malformed_trigger_answer_is_one_outcome_and_keeps_the_others(
        store: EtcdStore, fake: AnsweringFake, answer: str) -> None:
    """Concurrency 4, four triggers (02-05): Airflow creates 04's run but answers with
    something that is not it. 04's outcome is an AirflowRejected (recorded, unconfirmed);
    the other three are kept (ledger done, runs cached); 04 is adopted later, never
    triggered twice."""
    fake.answers["04_pipeline"] = MALFORMED[answer]
    r = reconciler(store, fake, concurrency=4)
    report = r.run_pass()
    by_dag = {o.action.dag_id: o for o in report.outcomes}
    assert sorted(by_dag) == ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
    assert isinstance(by_dag["04_pipeline"].error, AirflowRejected)
    assert "04_pipeline" in str(by_dag["04_pipeline"].error)
    for dag_id in ("02_pipeline", "03_pipeline", "05_pipeline"):
        assert by_dag[dag_id].result == "triggered"
        assert (dag_id, RUN) in r.observer.cache.runs
    ledger = store.read_ledger(CYCLE.isoformat())
    assert {k[1]: v["state"] for k, v in ledger.items()} == {
        "02_pipeline": "done", "03_pipeline": "done", "04_pipeline": "failed",
        "05_pipeline": "done"}
    r.executor._retry_after.clear()  # its backoff is not under test
    assert passes(r, 2) == [("adopt", "04_pipeline")]  # the run it made, adopted
    assert len(fake.runs("04_pipeline")) == 1
    assert fake.duplicate_triggers() == {}


def test_an_unexpected_error_in_one_action_keeps_the_other_outcomes(
        store: EtcdStore, fake: AnsweringFake, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one action (here: the client itself raising something unexpected) is that
    action's failed outcome; the pass's other outcomes are applied."""
    r = reconciler(store, fake, concurrency=4)
    original: Callable[..., Any] = r.api.trigger  # type: ignore[attr-defined]

    def trigger(dag_id: str, *args: Any, **kwargs: Any) -> Any:
        if dag_id == "03_pipeline":
            raise RuntimeError("boom")
        return original(dag_id, *args, **kwargs)

    monkeypatch.setattr(r.api, "trigger", trigger)
    report = r.run_pass()
    results = {o.action.dag_id: o.result for o in report.outcomes}
    assert results == {"02_pipeline": "triggered", "03_pipeline": "failed",
                       "04_pipeline": "triggered", "05_pipeline": "triggered"}
    assert "RuntimeError" in str(next(o.error for o in report.outcomes
                                      if o.action.dag_id == "03_pipeline"))


def finish(fake: FakeAirflow, *dag_ids: str) -> None:
    for dag_id in dag_ids:
        fake.advance(dag_id, RUN, "running")
        time.sleep(0.002)  # a later end date than any before
        fake.advance(dag_id, RUN, "success")


@pytest.mark.real_clock  # etcd paused: only a request timeout (gRPC's: wall-clock) ends it
def test_a_rerun_whose_result_write_fails_is_not_cleared_twice(
        etcd: EtcdServer, store: EtcdStore, fake: AnsweringFake) -> None:
    """Scenario 2 with an etcd outage: 03 re-ran, so 06 is cleared; etcd hangs while
    Airflow answers the clear, the "done" write fails. Memory must hold the clear's intent
    (unconfirmed), not the old trigger's entry: else 06's next end looks like an upstream
    change not acted on, and 06 is cleared (run) a second time."""
    r = reconciler(store, fake, eager=False)
    r.run_pass()
    finish(fake, "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline")
    assert passes(r, 1) == [("trigger", "06_pipeline")]
    finish(fake, "06_pipeline")
    assert passes(r, 1) == [("trigger", "07_pipeline")]
    finish(fake, "07_pipeline")
    assert passes(r, 2) == []
    fake.advance("03_pipeline", RUN, "queued")  # a user clears 03: it runs again
    finish(fake, "03_pipeline")

    def hang_etcd(request: Any) -> None:
        if request.route == clear_route(fake) and request.dag_id == "06_pipeline":
            fake.before_reply = None
            etcd.pause()

    fake.before_reply = hang_etcd
    with contextlib.suppress(StoreUnavailable):
        r.run_pass()
    time.sleep(0.5)
    etcd.resume()
    until_etcd_answers(store)
    assert fake.clear_count("06_pipeline", RUN) == 1
    assert passes(r, 2) == [("adopt", "06_pipeline")]  # the clear took effect: adopted
    finish(fake, "06_pipeline")
    assert passes(r, 2) == [("clear", "07_pipeline")]
    finish(fake, "07_pipeline")
    assert passes(r, 2) == []
    assert fake.clear_count("06_pipeline", RUN) == 1
    assert fake.clear_count("07_pipeline", RUN) == 1
    assert fake.clear_count("02_pipeline", RUN) == 0


def test_a_ledger_key_without_a_cycle_is_quarantined_by_its_own_name(
        store: EtcdStore, fake: AnsweringFake) -> None:
    """`ledger/x` (no cycle segment: written by hand) is named as it is; rebuilding a key
    from its empty cycle raised a ValueError out of the ledger read, and every pass died."""
    bad = store.key("ledger", "x")
    store.put(bad, json.dumps({"run_id": "r", "action": "trigger"}).encode())
    r = reconciler(store, fake)
    assert passes(r, 1) == [("trigger", d) for d in
                            ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline")]
    assert bad in r.observer.quarantined
