"""The executor with an in-memory store and a scripted Airflow: intent before effect,
fencing, lease checks, and a clear that is never sent twice for one re-run."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowNotFound, AirflowRejected, AirflowUnavailable
from reconciler.adapters.store import NotLeader, StoreUnavailable
from reconciler.core.errors import HUMAN_BACKOFF, LostLeadership
from reconciler.core.state import Action, ActionKind, Fingerprint, LedgerState, iso
from reconciler.service.executor import DAG_AWAY_TRIES, Executor
from reconciler.service.ledger import Ledger
from reconciler.service.observability import Metrics
from tests.fakes.clock import FakeClock

CYCLE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
ENDED = CYCLE + timedelta(minutes=5)


class MemoryStore:
    """The ledger part of the store: writes pass only while `holder` leads."""

    def __init__(self) -> None:
        self.leader_holder = "me"
        self.ledger: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes = 0

    def put_ledger(self, holder: str, cycle: str, dag_id: str,
                   entry: Mapping[str, Any]) -> None:
        self.writes += 1
        if holder != self.leader_holder:
            raise NotLeader("someone else leads")
        self.ledger[(cycle, dag_id)] = dict(entry)

    def ledger_key(self, cycle: str, dag_id: str) -> str:
        return f"ledger/{cycle}/{dag_id}"

    def scan_ledger(self) -> Iterator[tuple[tuple[str, str], Any]]:
        return iter(list(self.ledger.items()))


class ScriptedAirflow:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.run_state = {"state": "success", "end_date": iso(ENDED)}
        self.fail_with: Exception | None = None

    @contextlib.contextmanager
    def deadline_of(self, seconds: float) -> Iterator[None]:
        self.calls.append(("deadline", f"{seconds:.1f}"))
        yield

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        self.calls.append(("get", dag_id))
        return {"dag_run_id": run_id, "dag_id": dag_id, "logical_date": iso(CYCLE),
                **self.run_state}

    def clear(self, dag_id: str, run_id: str, *, cleared_end: datetime | None = None
              ) -> tuple[dict[str, Any], bool]:
        self.calls.append(("clear", dag_id))
        if self.fail_with is not None:
            raise self.fail_with
        self.run_state = {"state": "queued", "end_date": None}
        return self.get_run(dag_id, run_id), True

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        self.calls.append(("trigger", dag_id))
        return {"dag_run_id": run_id, "dag_id": dag_id, "logical_date": iso(logical_date),
                "state": "queued"}, True


class Lease:
    holder = "me"

    def __init__(self) -> None:
        self.left = 9.0

    def remaining(self) -> float:
        return self.left


def clear_action() -> Action:
    return Action(kind=ActionKind.CLEAR, dag_id="06_pipeline", cycle=CYCLE,
                  run_id="reconciler__x", fingerprint=Fingerprint(), reason="03 re-ran",
                  commit="c", cleared_end=ENDED)


def ledger_of(store: MemoryStore) -> Ledger:
    return Ledger(store, lambda key, why: None)  # type: ignore[arg-type]


def executor() -> tuple[Executor, MemoryStore, ScriptedAirflow, Lease]:
    store, api, lease = MemoryStore(), ScriptedAirflow(), Lease()
    ex = Executor(ledger_of(store), api, lease, FakeClock(),  # type: ignore[arg-type]
                  call_deadline=3.0, concurrency=1, failpoint="")
    return ex, store, api, lease


def test_a_clear_records_its_intent_with_the_end_date_then_the_result() -> None:
    ex, store, api, _ = executor()
    (outcome,) = ex.execute([clear_action()])
    assert outcome.result == "cleared"
    assert [c for c in api.calls if c[0] != "deadline"] == [("clear", "06_pipeline"),
                                                            ("get", "06_pipeline")]
    entry = store.ledger[(iso(CYCLE), "06_pipeline")]
    assert entry["state"] == "done"
    assert entry["cleared_end"] == iso(ENDED)
    assert ("deadline", "3.0") in api.calls  # the call runs under the action's deadline


def test_a_retried_clear_whose_run_already_restarted_is_not_sent_again() -> None:
    ex, store, api, _ = executor()
    action = clear_action()
    previous = action.ledger_entry(at=CYCLE, state=LedgerState.INTENT)  # a crash, a lost answer
    api.run_state = {"state": "running", "end_date": None}  # the first clear took effect
    store.ledger[(iso(CYCLE), "06_pipeline")] = previous.to_json()
    (outcome,) = ex.execute([action])
    assert outcome.result == "already-cleared"
    assert ("clear", "06_pipeline") not in api.calls
    assert store.ledger[(iso(CYCLE), "06_pipeline")]["state"] == "done"


def test_a_retried_clear_whose_run_did_not_restart_is_sent_once() -> None:
    ex, store, api, _ = executor()
    action = clear_action()
    previous = action.ledger_entry(at=CYCLE, state=LedgerState.FAILED)
    store.ledger[(iso(CYCLE), "06_pipeline")] = previous.to_json()
    (outcome,) = ex.execute([action])
    assert outcome.result == "cleared"
    assert api.calls.count(("clear", "06_pipeline")) == 1


def test_no_action_starts_without_enough_lease() -> None:
    ex, store, api, lease = executor()
    lease.left = 3.5  # under the call's deadline plus the margin
    (outcome,) = ex.execute([clear_action()])
    assert outcome.result == "deferred"
    assert store.writes == 0
    assert api.calls == []


def test_a_fenced_intent_stops_before_airflow_is_called() -> None:
    ex, store, api, _ = executor()
    store.leader_holder = "the-new-leader"
    with pytest.raises(LostLeadership):
        ex.execute([clear_action()])
    assert api.calls == []


def test_a_failed_call_is_recorded_and_deferred_by_its_backoff() -> None:
    ex, store, api, _ = executor()
    api.fail_with = AirflowUnavailable("502 from Airflow")
    (outcome,) = ex.execute([clear_action()])
    assert outcome.result == "failed"
    assert store.ledger[(iso(CYCLE), "06_pipeline")]["state"] == "failed"
    (again,) = ex.execute([clear_action()])
    assert again.result == "deferred"  # not before its backoff
    assert api.calls.count(("clear", "06_pipeline")) == 1


def _fan_out(n: int) -> list[Action]:
    return [replace(clear_action(), dag_id=f"0{i}_pipeline") for i in range(2, 2 + n)]


def _concurrent_executor() -> tuple[Executor, ScriptedAirflow]:
    store, api, lease = MemoryStore(), ScriptedAirflow(), Lease()
    ex = Executor(ledger_of(store), api, lease, FakeClock(),  # type: ignore[arg-type]
                  call_deadline=3.0, concurrency=4, failpoint="")
    return ex, api


HINT = "Airflow left every call of this pass unanswered, one at a time"
MOVED = "Airflow calls in flight: limit changed"


def test_calls_unanswered_one_at_a_time_say_once_that_airflow_itself_is_stuck(
        caplog: pytest.LogCaptureFixture) -> None:
    ex, api = _concurrent_executor()
    assert ex.pacer.limit == 1  # where the pacer starts
    api.fail_with = AirflowUnavailable("POST ... timed out after 5 s", no_answer=True)
    with caplog.at_level("WARNING", logger="reconciler"):
        outcomes = ex.execute(_fan_out(4))
        assert [o.result for o in outcomes] == ["failed"] * 4
        ex._retry_after.clear()  # the next pass sends them again at once
        ex.execute(_fan_out(4))
    ex.close()
    hints = [r for r in caplog.records if r.getMessage() == HINT]
    assert len(hints) == 1
    assert "--concurrency 1" not in str(hints[0].fields)  # type: ignore[attr-defined]


def test_a_concurrent_stall_halves_the_limit_once_and_gives_no_hint(
        caplog: pytest.LogCaptureFixture) -> None:
    """Four calls in flight under a limit of 4 all go unanswered (an Airflow on SQLite):
    the limit halves once (the four saw the same congestion), logged once; no hint, the
    pacer handles it."""
    ex, api = _concurrent_executor()
    ex.pacer.limit = 4
    together = threading.Barrier(4, timeout=10)
    real_clear = api.clear

    def stalled_clear(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        together.wait()  # all four in flight, then they all time out
        return real_clear(*args, **kwargs)

    api.clear = stalled_clear  # type: ignore[method-assign]
    api.fail_with = AirflowUnavailable("POST ... timed out after 5 s", no_answer=True)
    with caplog.at_level("INFO", logger="reconciler"):
        outcomes = ex.execute(_fan_out(4))
    assert {type(o.error) for o in outcomes} == {AirflowUnavailable}
    ex.close()
    assert ex.pacer.limit == 2
    moved = [r.fields for r in caplog.records if r.getMessage() == MOVED]  # type: ignore[attr-defined]
    assert len(moved) == 1
    assert (moved[0]["was"], moved[0]["limit"]) == (4, 2)
    assert HINT not in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("failure", [
    AirflowUnavailable("cannot connect to Airflow at http://x"),  # down: not a stall
    AirflowUnavailable("POST ... answered 500", no_answer=False),
])
def test_no_hint_when_airflow_answered_or_was_not_reached(
        caplog: pytest.LogCaptureFixture, failure: AirflowUnavailable) -> None:
    ex, api = _concurrent_executor()
    api.fail_with = failure
    with caplog.at_level("WARNING", logger="reconciler"):
        ex.execute(_fan_out(4))
    ex.close()
    assert HINT not in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("failure", "halves"), [
    (AirflowUnavailable("POST ... answered 503: busy"), True),
    (AirflowRejected("POST ... answered 429: Too Many Requests"), True),
    (AirflowNotFound("DAG 06_pipeline is not in Airflow"), False),  # an answer, in time
])
def test_what_halves_the_limit(failure: Exception, halves: bool) -> None:
    ex, api = _concurrent_executor()
    ex.pacer.limit = 4
    api.fail_with = failure
    ex.execute(_fan_out(1))
    assert ex.pacer.limit == (2 if halves else 4)


class CountingAirflow(ScriptedAirflow):
    """Counts the triggers in flight at once; each holds its place a moment, so that the
    pool's threads overlap when the gate lets them."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.02)
            return super().trigger(dag_id, run_id, logical_date, conf)
        finally:
            with self._lock:
                self.in_flight -= 1


def _triggers(n: int, cycle: datetime = CYCLE) -> list[Action]:
    return [replace(trigger_action(), dag_id=f"{i:02d}_pipeline", cycle=cycle)
            for i in range(2, 2 + n)]


def test_calls_in_flight_follow_the_limit_and_the_limit_grows_to_the_ceiling() -> None:
    store, api, lease = MemoryStore(), CountingAirflow(), Lease()
    metrics = Metrics()
    ex = Executor(ledger_of(store), api, lease, FakeClock(),  # type: ignore[arg-type]
                  call_deadline=3.0, concurrency=4, failpoint="", metrics=metrics)
    limits = []
    for hour in range(4):
        outcomes = ex.execute(_triggers(8, CYCLE - timedelta(hours=hour)))
        assert {o.result for o in outcomes} == {"triggered"}
        limits.append(ex.pacer.limit)
        assert metrics.registry.get_sample_value(
            "reconciler_airflow_concurrency_limit") == ex.pacer.limit
    ex.close()
    assert limits[-1] == 4
    assert limits == sorted(limits)
    assert ex.gate.peak <= 4
    assert api.peak <= 4


def test_the_first_pass_sends_one_call_at_a_time() -> None:
    """A fresh executor starts at 1: the first fan-out of a default user (an Airflow on
    SQLite) does not stall Airflow. (Before the pacer, all 8 went out at once.)"""
    store, api, lease = MemoryStore(), CountingAirflow(), Lease()
    ex = Executor(ledger_of(store), api, lease, FakeClock(),  # type: ignore[arg-type]
                  call_deadline=3.0, concurrency=8, failpoint="")
    ex.execute(_triggers(3))  # 1, then 2 at once
    ex.close()
    assert api.peak <= 2
    assert ex.gate.peak <= 2


def test_actions_that_send_nothing_teach_the_pacer_nothing() -> None:
    ex, api = _concurrent_executor()
    ex.pacer.limit = 2
    adopt = [replace(a, kind=ActionKind.ADOPT) for a in _triggers(4)]
    assert {o.result for o in ex.execute(adopt)} == {"adopted"}
    ex.leadership.left = 1.0  # type: ignore[attr-defined]  # too little lease: deferred
    assert {o.result for o in ex.execute(_triggers(4))} == {"deferred"}
    ex.close()
    assert (ex.pacer.limit, ex.pacer.epoch, ex.pacer.baseline) == (2, 0, None)
    assert ex.gate.in_flight == 0
    assert ("trigger", "02_pipeline") not in api.calls


class OutageStore(MemoryStore):
    """etcd that stops answering ledger writes after `good` of them."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def put_ledger(self, holder: str, cycle: str, dag_id: str,
                   entry: Mapping[str, Any]) -> None:
        if self.writes >= self.good:
            self.writes += 1
            raise StoreUnavailable("etcd at 127.0.0.1:2379 is unreachable")
        super().put_ledger(holder, cycle, dag_id, entry)


def trigger_action(cycle: datetime = CYCLE) -> Action:
    return Action(kind=ActionKind.TRIGGER, dag_id="06_pipeline", cycle=cycle,
                  run_id=f"reconciler__{iso(cycle)}", fingerprint=Fingerprint(),
                  reason="upstreams done", commit="c")


@pytest.mark.parametrize("good", [0, 1])
def test_memory_holds_the_unconfirmed_intent_whichever_ledger_write_fails(good: int) -> None:
    """good=0: the intent write fails (Airflow is not called); good=1: the intent is
    written, the call made, the result write fails. Either way the loop's memory holds the
    intent, unconfirmed, as etcd may: never nothing, never "done"."""
    store, api, lease = OutageStore(good), ScriptedAirflow(), Lease()
    ledger = ledger_of(store)
    ex = Executor(ledger, api, lease, FakeClock(), call_deadline=3.0,  # type: ignore[arg-type]
                  concurrency=1, failpoint="")
    (outcome,) = ex.execute([trigger_action()])
    assert outcome.result == "failed"
    assert isinstance(outcome.error, StoreUnavailable)
    remembered = ledger.get(CYCLE, "06_pipeline")
    assert remembered is not None
    assert remembered.state is LedgerState.INTENT
    assert api.calls.count(("trigger", "06_pipeline")) == good


class GoneAirflow(ScriptedAirflow):
    """Answers triggers 404 while `gone` (its DAG file's parse was killed, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = False

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        if self.gone:
            self.calls.append(("trigger-404", dag_id))
            raise AirflowNotFound(f"DAG {dag_id!r} is not in Airflow")
        return super().trigger(dag_id, run_id, logical_date, conf)


def _delays_of_404s(ex: Executor, clock: FakeClock, tries: int) -> list[float]:
    """Trigger the next cycle `tries` times while Airflow answers 404; the wait each
    failure set before the next try (in the executor's own clock)."""
    cycle = CYCLE + timedelta(hours=1)
    delays = []
    for _ in range(tries):
        (outcome,) = ex.execute([trigger_action(cycle)])
        assert outcome.result == "failed"
        until, _failures = ex._retry_after[(cycle, "06_pipeline")]
        delays.append(round(until - clock.monotonic(), 6))  # not 29.999999999999886
        clock.advance(until - clock.monotonic())
    return delays


def _gone_executor() -> tuple[Executor, MemoryStore, GoneAirflow, FakeClock]:
    store, api, lease, clock = MemoryStore(), GoneAirflow(), Lease(), FakeClock()
    ex = Executor(ledger_of(store), api, lease, clock,  # type: ignore[arg-type]
                  call_deadline=3.0, concurrency=1, failpoint="", interval=2.0)
    return ex, store, api, clock


def test_a_404_for_a_dag_that_took_runs_here_is_retried_at_the_normal_backoff_first() -> None:
    """Airflow's DAG processor kills a parse that outlasts its timeout and the file's DAGs
    answer 404 until the next parse: a DAG that took a run of ours before gets its first
    tries at the normal backoff, then the human's 30 s."""
    ex, _store, api, clock = _gone_executor()
    (first,) = ex.execute([trigger_action()])
    assert first.result == "triggered"
    api.gone = True
    delays = _delays_of_404s(ex, clock, DAG_AWAY_TRIES + 2)
    assert all(d < HUMAN_BACKOFF for d in delays[:DAG_AWAY_TRIES]), delays
    assert all(d >= HUMAN_BACKOFF for d in delays[DAG_AWAY_TRIES:]), delays
    api.gone = False
    (back,) = ex.execute([trigger_action(CYCLE + timedelta(hours=1))])
    assert back.result == "triggered"


def test_a_404_for_a_dag_confirmed_only_in_the_ledger_counts_too() -> None:
    """A new replica has sent nothing yet: the ledger's confirmed entries are its memory."""
    ex, store, api, clock = _gone_executor()
    ex.execute([trigger_action()])
    fresh = Executor(ledger_of(store), api, Lease(), clock,  # type: ignore[arg-type]
                     call_deadline=3.0, concurrency=1, failpoint="", interval=2.0)
    api.gone = True
    (delay,) = _delays_of_404s(fresh, clock, 1)
    assert delay < HUMAN_BACKOFF


def test_a_404_for_a_dag_never_run_here_waits_for_a_human() -> None:
    ex, _store, api, clock = _gone_executor()
    api.gone = True
    (delay,) = _delays_of_404s(ex, clock, 1)
    assert delay >= HUMAN_BACKOFF
