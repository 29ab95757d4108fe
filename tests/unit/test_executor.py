"""The executor with an in-memory store and a scripted Airflow: intent before effect,
fencing, lease checks, and a clear that is never sent twice for one re-run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowUnavailable
from reconciler.adapters.store import NotLeader, StoreUnavailable
from reconciler.core.errors import LostLeadership
from reconciler.core.state import Action, ActionKind, Fingerprint, LedgerState, iso
from reconciler.service.executor import Executor
from reconciler.service.ledger import Ledger
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


HINT = "every concurrent Airflow call of this pass went unanswered"


def test_a_concurrent_batch_that_all_went_unanswered_says_once_to_send_one_at_a_time(
        caplog: pytest.LogCaptureFixture) -> None:
    ex, api = _concurrent_executor()
    api.fail_with = AirflowUnavailable("POST ... timed out after 5 s", no_answer=True)
    with caplog.at_level("WARNING", logger="reconciler"):
        outcomes = ex.execute(_fan_out(4))
        assert [o.result for o in outcomes] == ["failed"] * 4
        ex._retry_after.clear()  # the next pass sends them again at once
        ex.execute(_fan_out(4))
    ex.close()
    hints = [r for r in caplog.records if r.getMessage() == HINT]
    assert len(hints) == 1
    assert "--concurrency 1" in hints[0].fields["hint"]  # type: ignore[attr-defined]


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


def trigger_action() -> Action:
    return Action(kind=ActionKind.TRIGGER, dag_id="06_pipeline", cycle=CYCLE,
                  run_id="reconciler__x", fingerprint=Fingerprint(), reason="upstreams done",
                  commit="c")


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
