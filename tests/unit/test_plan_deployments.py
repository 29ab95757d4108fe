"""The pure side of several deployments (issue 18, items 3 and 4): where a run was is
recorded in the ledger (old entries read as before), a pipeline moved since a confirmed
run is not run again where it runs now, and a plan holds back what an unreachable
deployment would have to do, saying so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reconciler.core.graph import Deployment, Graph, Pipeline
from reconciler.core.plan import hold_back, hold_moved, plan
from reconciler.core.state import (
    ActionKind,
    DagRun,
    Fingerprint,
    LedgerEntry,
    LedgerState,
    State,
    run_id_for,
)

NOW = datetime.now(UTC).replace(microsecond=0)
CYCLE = NOW - timedelta(hours=1)
WINDOW = timedelta(days=2)


def graph(b_in: str = "af3") -> Graph:
    """root (af2) -> b (`b_in`) -> c (af2)."""
    deployments = [Deployment("af2", "http://af2.example", default=True),
                   Deployment("af3", "http://af3.example")]
    return Graph([Pipeline("root"), Pipeline("b", depends_on=("root",), deployment=b_in),
                  Pipeline("c", depends_on=("b",))], deployments)


def root_run() -> DagRun:
    return DagRun("root", f"scheduled__{CYCLE.isoformat()}", CYCLE, "success",
                  start_date=CYCLE, end_date=CYCLE + timedelta(minutes=1),
                  queued_at=CYCLE)


def done_entry(deployment: str | None) -> LedgerEntry:
    return LedgerEntry(run_id=run_id_for(CYCLE), action=ActionKind.TRIGGER,
                       fingerprint=Fingerprint(()), commit="c0", at=CYCLE,
                       deployment=deployment)


def test_a_ledger_entry_records_its_deployment_and_old_entries_read_as_before() -> None:
    entry = done_entry("af2")
    data = entry.to_json()
    assert data["deployment"] == "af2"
    assert LedgerEntry.from_json(data) == entry
    old = done_entry(None).to_json()
    assert "deployment" not in old  # the bytes of an entry written before deployments
    assert LedgerEntry.from_json(old).deployment is None


def test_a_pipeline_moved_after_a_confirmed_run_elsewhere_is_not_run_again() -> None:
    ledger = {(CYCLE, "b"): done_entry("af2")}  # b ran in af2; the graph now puts it in af3
    result = plan(graph("af3"), [root_run()], ledger, NOW, window=WINDOW)
    assert [a.dag_id for a in result.actions] == []
    status = result.status("b", CYCLE)
    assert status is not None
    assert status.state is State.DONE
    assert "ran as" in status.message
    assert "before it moved to af3" in status.message


def test_a_run_missing_where_it_ran_is_still_triggered_again() -> None:
    # The same entry in the deployment it runs in now (a deleted run), or an entry from
    # before deployments were declared: the table's "none / any -> trigger" stands.
    for recorded in ("af3", None):
        ledger = {(CYCLE, "b"): done_entry(recorded)}
        result = plan(graph("af3"), [root_run()], ledger, NOW, window=WINDOW)
        assert [(a.kind, a.dag_id) for a in result.actions] == [(ActionKind.TRIGGER, "b")]


def test_hold_back_drops_the_actions_of_an_unreachable_deployment_and_says_why() -> None:
    result = plan(graph("af3"), [root_run()], {}, NOW, window=WINDOW)
    assert [a.dag_id for a in result.actions] == ["b"]
    where = {"root": "af2", "b": "af3", "c": "af2"}.__getitem__
    held = hold_back(result, {"af3": "deployment af3: 503 Service Unavailable"}, where)
    assert held.actions == ()
    b = held.status("b", CYCLE)
    assert b is not None
    assert b.state is State.WAITING
    assert b.message.startswith("deployment af3 unreachable (503 Service Unavailable); ")
    c = held.status("c", CYCLE)
    assert c is not None
    assert c.message.endswith("(deployment af3 unreachable)")
    # Another deployment down changes nothing here; nothing down is the plan itself.
    assert hold_back(result, {"af2x": "down"}, where).actions == result.actions
    assert hold_back(result, {}, where) is result


def test_a_moved_pipelines_trigger_waits_while_its_unconfirmed_entry_cannot_be_read(
        ) -> None:
    """b's last trigger (its answer lost: an intent, or failed) went to af2, which b has
    left and which cannot be read: the plan's trigger in af3 waits, saying why; it goes
    out once af2 answers (its listing then shows the run, or that there is none)."""
    where = {"root": "af2", "b": "af3", "c": "af2"}.__getitem__
    for state in (LedgerState.INTENT, LedgerState.FAILED):
        entry = LedgerEntry(run_id=run_id_for(CYCLE), action=ActionKind.TRIGGER,
                            fingerprint=Fingerprint(()), commit="c0", at=CYCLE,
                            state=state, deployment="af2")
        ledger = {(CYCLE, "b"): entry}
        result = plan(graph("af3"), [root_run()], ledger, NOW, window=WINDOW)
        assert [(a.kind, a.dag_id) for a in result.actions] == [(ActionKind.TRIGGER, "b")]
        held = hold_moved(result, ledger, {"af2": "deployment af2: answered 503"}, where)
        assert held.actions == ()
        status = held.status("b", CYCLE)
        assert status is not None
        assert status.state is State.WAITING
        assert f"its trigger of {run_id_for(CYCLE)} ({state.value}) was sent to " \
               "deployment af2" in status.message
        assert "(answered 503)" in status.message
        assert "not triggered in af3 until af2 answers" in status.message
        assert hold_moved(result, ledger, {}, where) is result  # af2 answers: it goes out
        assert hold_moved(result, ledger, {"af3": "down"}, where) is result  # not where it was
        same = {(CYCLE, "b"): LedgerEntry(run_id=entry.run_id, action=entry.action,
                                          fingerprint=entry.fingerprint, commit="c0",
                                          at=CYCLE, state=state, deployment="af3")}
        assert hold_moved(result, same, {"af3": "down"}, where) is result  # hold_back's
