"""The table of DESIGN section 5, row by row, on the example graph and small ad-hoc graphs.

Each case builds an observed state by hand (or with `World`, a tiny Airflow stand-in that
applies actions the way the loop does), checks the actions and statuses, then checks
idempotence: apply the actions, record them in the ledger, plan again: no action.
Also the value types of reconciler/state.py that `plan()` relies on.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reconciler.core.graph import Graph, Pipeline
from reconciler.core.plan import plan
from reconciler.core.state import (
    Action,
    ActionKind,
    DagRun,
    Fingerprint,
    LedgerEntry,
    LedgerState,
    PipelineStatus,
    Plan,
    Reason,
    State,
    run_id_for,
)

ROOT = "01_pipeline_init"
MIDDLE = ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline")
C = datetime(2025, 6, 1, tzinfo=UTC)
WINDOW = timedelta(days=2)
AIRFLOW_RUN_ID = re.compile(r"^[A-Za-z0-9_.~:+-]+$")


def example_graph(**changes: dict[str, Any]) -> Graph:
    """01 -> 02..05 -> 06 -> 07; `changes` maps a dag_id to Pipeline fields to override."""
    pipelines = [Pipeline(ROOT)]
    pipelines += [Pipeline(d, depends_on=(ROOT,)) for d in MIDDLE]
    pipelines += [Pipeline("06_pipeline", depends_on=MIDDLE, conf={"target": "mart"}),
                  Pipeline("07_pipeline", depends_on=("06_pipeline",))]
    return Graph(replace(p, **changes.get(p.dag_id, {})) for p in pipelines)


class World:
    """Airflow and the ledger as the loop sees them, with a fake clock (one second a tick)."""

    def __init__(self, graph: Graph, *, since: dict[str, datetime] | None = None,
                 window: timedelta = WINDOW) -> None:
        self.graph = graph
        self.since = since
        self.window = window
        self.clock = C + timedelta(minutes=1)
        self.runs: dict[tuple[str, str], DagRun] = {}
        self.ledger: dict[tuple[datetime, str], LedgerEntry] = {}
        self.executions: list[tuple[str, datetime]] = []
        self.suspended: dict[str, str] = {}
        """dag_id (or "*") -> why: an operator's `reconciler suspend`."""

    def tick(self) -> datetime:
        self.clock += timedelta(seconds=1)
        return self.clock

    def run_of(self, dag_id: str, cycle: datetime = C) -> DagRun | None:
        found = [r for r in self.runs.values() if r.dag_id == dag_id and r.logical_date == cycle]
        assert len(found) <= 1
        return found[0] if found else None

    def put(self, run: DagRun) -> DagRun:
        self.runs[(run.dag_id, run.run_id)] = run
        return run

    def queue(self, dag_id: str, cycle: datetime = C, run_id: str | None = None) -> DagRun:
        return self.put(DagRun(dag_id, run_id or f"manual__{cycle.isoformat()}", cycle,
                               "queued", queued_at=self.tick()))

    def start(self, dag_id: str, cycle: datetime = C) -> DagRun:
        run = self.run_of(dag_id, cycle)
        assert run is not None
        assert run.state == "queued"
        self.executions.append((dag_id, cycle))
        return self.put(replace(run, state="running", start_date=self.tick()))

    def finish(self, dag_id: str, cycle: datetime = C, state: str = "success") -> DagRun:
        run = self.run_of(dag_id, cycle)
        assert run is not None
        if run.state == "queued":
            run = self.start(dag_id, cycle)
        return self.put(replace(run, state=state, end_date=self.tick()))

    def root_run(self, cycle: datetime = C, state: str = "success", dag_id: str = ROOT
                 ) -> DagRun:
        self.queue(dag_id, cycle, run_id=f"scheduled__{cycle.isoformat()}")
        return self.finish(dag_id, cycle, state)

    def user_clear(self, dag_id: str, cycle: datetime = C) -> DagRun:
        run = self.run_of(dag_id, cycle)
        assert run is not None
        assert run.finished
        return self.put(replace(run, state="queued", queued_at=self.tick(), start_date=None,
                                end_date=None))

    def plan(self, now: datetime | None = None) -> Plan:
        return plan(self.graph, list(self.runs.values()), self.ledger, now or self.clock,
                    window=self.window, since=self.since, commit="abc123",
                    suspended=self.suspended)

    def apply(self, result: Plan) -> None:
        """What the loop does: Airflow call, then the ledger entry, confirmed."""
        for action in result.actions:
            at = self.tick()
            if action.kind is ActionKind.TRIGGER:
                assert self.run_of(action.dag_id, action.cycle) is None
                self.put(DagRun(action.dag_id, action.run_id, action.cycle, "queued",
                                queued_at=at, conf=action.conf))
            elif action.kind is ActionKind.CLEAR:
                run = self.runs[(action.dag_id, action.run_id)]
                assert run.finished
                self.put(replace(run, state="queued", queued_at=at, start_date=None,
                                 end_date=None))
            self.ledger[(action.cycle, action.dag_id)] = action.ledger_entry(
                at=at, state=LedgerState.DONE)

    def step(self) -> Plan:
        result = self.plan()
        self.apply(result)
        return result

    def settle(self, state_of: dict[str, str] | None = None, limit: int = 50) -> None:
        """Plan, apply, run everything to the end, until nothing moves."""
        for _ in range(limit):
            acted = bool(self.step().actions)
            active = [r for r in self.runs.values() if not r.finished]
            for run in sorted(active, key=lambda r: (r.dag_id, r.run_id)):
                self.finish(run.dag_id, run.logical_date or C,
                            (state_of or {}).get(run.dag_id, "success"))
            if not acted and not active:
                return
        raise AssertionError("did not settle")

    def count(self, dag_id: str, cycle: datetime = C) -> int:
        return self.executions.count((dag_id, cycle))


def by_id(result: Plan, cycle: datetime = C) -> dict[str, PipelineStatus]:
    return {s.dag_id: s for s in result.statuses if s.cycle == cycle}


def kinds(result: Plan) -> list[tuple[str, str]]:
    return [(a.kind.value, a.dag_id) for a in result.actions]


def assert_idempotent(world: World) -> None:
    """Apply the actions of a plan, record them, plan again on that: no action."""
    world.apply(world.plan())
    again = world.plan()
    assert again.actions == (), kinds(again)


def done_through(world: World, *dag_ids: str, cycle: datetime = C) -> None:
    """Let the reconciler trigger and Airflow finish these pipelines, in order."""
    for dag_id in dag_ids:
        world.step()
        world.finish(dag_id, cycle)


# --- rows of the table ------------------------------------------------------------------


def test_satisfied_without_a_run_triggers_with_the_cycle_and_deterministic_run_id() -> None:
    world = World(example_graph())
    world.root_run()
    result = world.plan()
    assert kinds(result) == [("trigger", d) for d in MIDDLE]
    action = result.actions[0]
    root = world.run_of(ROOT)
    assert root is not None
    assert root.end_date is not None
    assert action.cycle == action.logical_date == C
    assert action.run_id == "reconciler__2025-06-01T00:00:00+00:00" == run_id_for(C)
    assert action.fingerprint == ((ROOT, root.run_id, root.end_date.isoformat()),)
    assert action.conf == {"reconciler": {
        "commit": "abc123", "cycle": "2025-06-01T00:00:00+00:00",
        "upstreams": [{"dag_id": ROOT, "run_id": root.run_id,
                       "end_date": root.end_date.isoformat()}]}}
    statuses = by_id(result)
    assert statuses["02_pipeline"].state is State.TRIGGERING
    assert statuses["06_pipeline"].reason is Reason.WAITING_FOR
    assert statuses["06_pipeline"].waiting_for == MIDDLE
    assert "02_pipeline (trigger planned)" in statuses["06_pipeline"].message
    assert all(s.commit == "abc123" for s in result.statuses)
    assert_idempotent(world)


def test_the_pipeline_conf_is_sent_beside_the_provenance() -> None:
    world = World(example_graph())
    world.root_run()
    done_through(world, *MIDDLE)
    (action,) = world.plan().actions
    assert action.dag_id == "06_pipeline"
    assert action.conf["target"] == "mart"
    assert [u["dag_id"] for u in action.conf["reconciler"]["upstreams"]] == list(MIDDLE)


@pytest.mark.parametrize("state", ["queued", "running"])
def test_an_upstream_queued_or_running_makes_the_downstream_wait(state: str) -> None:
    world = World(example_graph())
    world.root_run()
    done_through(world, "02_pipeline", "04_pipeline", "05_pipeline")
    world.step()  # 03 triggered
    if state == "running":
        world.start("03_pipeline")
    result = world.plan()
    assert result.actions == ()
    status = by_id(result)["06_pipeline"]
    assert (status.state, status.reason) == (State.WAITING, Reason.WAITING_FOR)
    assert status.waiting_for == ("03_pipeline",)
    assert status.message == f"waiting for 03_pipeline ({state})"
    assert by_id(result)["07_pipeline"].message == \
        "waiting for 06_pipeline (waiting for its upstreams)"


def test_the_root_running_makes_everything_wait_and_roots_are_never_triggered() -> None:
    world = World(example_graph())
    world.queue(ROOT, run_id="scheduled__x")
    result = world.plan()
    assert result.actions == ()
    assert by_id(result)[ROOT].state is State.QUEUED
    assert by_id(result)["02_pipeline"].message == f"waiting for {ROOT} (queued)"
    world.finish(ROOT, state="failed")
    result = world.plan()
    assert result.actions == ()  # a failed root is not re-run by the reconciler either
    assert by_id(result)[ROOT].state is State.FAILED


def test_a_failed_upstream_blocks_and_the_status_says_which() -> None:
    world = World(example_graph())
    world.root_run()
    world.step()
    for d in MIDDLE:
        world.finish(d, state="failed" if d == "04_pipeline" else "success")
    result = world.plan()
    assert result.actions == ()
    s06, s07 = by_id(result)["06_pipeline"], by_id(result)["07_pipeline"]
    assert (s06.state, s06.reason, s06.blocked_by) == (State.BLOCKED, Reason.BLOCKED_BY,
                                                       ("04_pipeline",))
    assert s06.message == "blocked by failed 04_pipeline"
    assert s07.state is State.BLOCKED
    assert s07.message == "blocked by 06_pipeline (blocked by failed 04_pipeline)"
    assert by_id(result)["04_pipeline"].state is State.FAILED


def test_blocked_wins_over_waiting_and_lists_both() -> None:
    world = World(example_graph())
    world.root_run()
    world.step()
    world.finish("04_pipeline", state="failed")
    status = by_id(world.plan())["06_pipeline"]
    assert status.state is State.BLOCKED
    assert status.blocked_by == ("04_pipeline",)
    assert status.waiting_for == ("02_pipeline", "03_pipeline", "05_pipeline")


def test_all_done_treats_a_failed_upstream_as_satisfied_and_fingerprints_it() -> None:
    world = World(example_graph(**{"06_pipeline": {"trigger_rule": "all_done"}}))
    world.root_run()
    world.step()
    for d in MIDDLE:
        world.finish(d, state="failed" if d == "04_pipeline" else "success")
    result = world.plan()
    assert kinds(result) == [("trigger", "06_pipeline")]
    assert "04_pipeline" in [item.upstream for item in result.actions[0].fingerprint]
    assert "all upstreams done" in result.actions[0].reason
    assert_idempotent(world)


def test_all_done_still_waits_for_an_upstream_that_has_not_finished() -> None:
    world = World(example_graph(**{"06_pipeline": {"trigger_rule": "all_done"}}))
    world.root_run()
    world.step()
    world.finish("04_pipeline", state="failed")
    assert by_id(world.plan())["06_pipeline"].state is State.WAITING


@pytest.mark.parametrize("state", ["queued", "running"])
def test_satisfied_and_own_run_queued_or_running_waits(state: str) -> None:
    world = World(example_graph())
    world.root_run()
    world.step()
    if state == "running":
        world.start("02_pipeline")
    result = world.plan()
    assert "02_pipeline" not in [a.dag_id for a in result.actions]
    status = by_id(result)["02_pipeline"]
    assert status.state == state
    assert status.run_id == run_id_for(C)


@pytest.mark.parametrize("outcome", ["success", "failed"])
def test_finished_with_the_same_fingerprint_does_nothing(outcome: str) -> None:
    world = World(example_graph())
    world.root_run()
    world.settle(state_of={"07_pipeline": outcome})
    result = world.plan()
    assert result.actions == ()
    expected = State.DONE if outcome == "success" else State.FAILED
    assert by_id(result)["07_pipeline"].state is expected
    assert all(s.state is State.DONE for d, s in by_id(result).items() if d != "07_pipeline")
    assert all(world.count(d) == 1 for d in world.graph.pipelines if d != ROOT)


def test_scenario_rerun_clears_only_the_downstreams_of_the_rerun_upstream() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("03_pipeline")
    result = world.plan()  # 03 queued again: its downstreams wait, nothing is cleared yet
    assert result.actions == ()
    assert by_id(result)["06_pipeline"].message == "waiting for 03_pipeline (queued)"
    world.finish("03_pipeline")
    result = world.step()
    assert kinds(result) == [("clear", "06_pipeline")]
    assert result.actions[0].run_id == run_id_for(C)
    assert "03_pipeline re-ran" in result.actions[0].reason
    assert by_id(result)["06_pipeline"].state is State.RERUNNING
    assert by_id(result)["07_pipeline"].state is State.WAITING  # not on the old 06
    world.settle()
    assert {d: world.count(d) for d in world.graph.pipelines} == {
        ROOT: 1, "02_pipeline": 1, "03_pipeline": 2, "04_pipeline": 1, "05_pipeline": 1,
        "06_pipeline": 2, "07_pipeline": 2}


def test_below_a_pipeline_that_waits_for_a_rerun_everything_waits() -> None:
    """06 has a finished run but waits for 03 (re-running): 07 must not start on old 06."""
    world = World(example_graph())
    world.root_run()
    world.settle()
    run07 = world.run_of("07_pipeline")
    assert run07 is not None
    del world.runs[("07_pipeline", run07.run_id)]
    world.user_clear("03_pipeline")
    result = world.plan()
    assert result.actions == ()
    assert by_id(result)["07_pipeline"].message == \
        "waiting for 06_pipeline (waiting for its upstreams)"


def test_two_upstreams_rerun_together_give_one_rerun_downstream() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("03_pipeline")
    world.user_clear("05_pipeline")
    world.finish("03_pipeline")
    assert world.plan().actions == ()  # 05 still re-running: 06 waits for both
    world.settle()
    assert world.count("06_pipeline") == 2
    assert world.count("07_pipeline") == 2


def test_stale_fingerprint_of_a_clear_entry_clears_again() -> None:
    """The ledger says 06 was cleared (done) on older upstream runs: one of them re-ran
    after 06 started, so 06 is re-run again."""
    world = World(example_graph())
    world.root_run()
    world.settle()
    entry = world.ledger[(C, "06_pipeline")]
    world.ledger[(C, "06_pipeline")] = replace(entry, action=ActionKind.CLEAR)
    world.user_clear("03_pipeline")
    world.finish("03_pipeline")
    result = world.plan()
    assert kinds(result) == [("clear", "06_pipeline")]
    assert_idempotent(world)


def test_a_downstream_a_user_reran_after_its_upstream_reran_is_adopted_not_cleared() -> None:
    """03 re-runs, then a user re-runs 06 too before the loop looked: 06 already ran on
    03's new run. Clearing it (its ledger fingerprint names 03's old run) would run it a
    third time; its new upstream runs are recorded instead, and 07 re-runs once."""
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("03_pipeline")
    world.finish("03_pipeline")
    world.user_clear("06_pipeline")
    world.finish("06_pipeline")
    result = world.plan()
    assert kinds(result) == [("adopt", "06_pipeline"), ("clear", "07_pipeline")]
    assert "re-run after that" in by_id(result)["06_pipeline"].message
    world.settle()
    assert world.count("06_pipeline") == 2  # the loop's and the user's
    assert world.count("07_pipeline") == 2
    assert world.count("02_pipeline") == 1


def test_a_downstream_a_user_reran_before_its_upstream_ended_is_still_rerun() -> None:
    """The user's re-run of 06 started while 03 was still re-running: it read 03's old
    data, so the loop re-runs it once more after 03 ends."""
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("03_pipeline")
    world.start("03_pipeline")
    world.user_clear("06_pipeline")
    world.finish("06_pipeline")
    world.finish("03_pipeline")
    assert kinds(world.plan()) == [("clear", "06_pipeline")]


def test_an_upstream_added_or_removed_later_does_not_rerun_open_cycles() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    fewer = example_graph(**{"06_pipeline": {"depends_on": ("02_pipeline", "03_pipeline")}})
    more = example_graph(**{"07_pipeline": {"depends_on": ("06_pipeline", "05_pipeline")}})
    for graph in (fewer, more):
        world.graph = graph
        assert world.plan().actions == ()


def test_a_new_run_of_an_upstream_with_another_run_id_changes_the_fingerprint() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    old = world.run_of("05_pipeline")
    assert old is not None
    del world.runs[("05_pipeline", old.run_id)]  # deleted; a user makes another one
    assert kinds(world.step()) == [("trigger", "05_pipeline")]  # ledger without a run
    world.finish("05_pipeline")
    assert kinds(world.step()) == [("clear", "06_pipeline")]


# --- runs the ledger does not vouch for ---------------------------------------------------


def middle_done_manual_06(world: World, *, started_before: bool) -> None:
    """02-05 done; a user runs 06 by hand, before or after the last upstream ended."""
    world.root_run()
    world.step()
    for d in MIDDLE[:-1]:
        world.finish(d)
    world.start("05_pipeline")
    if started_before:
        world.queue("06_pipeline")
        world.start("06_pipeline")
        world.finish("05_pipeline")
    else:
        world.finish("05_pipeline")
        world.queue("06_pipeline")
        world.start("06_pipeline")


def test_manual_run_started_after_all_upstreams_ended_is_adopted() -> None:
    world = World(example_graph())
    middle_done_manual_06(world, started_before=False)
    result = world.plan()
    assert kinds(result) == [("adopt", "06_pipeline")]
    assert result.actions[0].run_id == f"manual__{C.isoformat()}"
    assert by_id(result)["06_pipeline"].reason is Reason.ADOPTING
    assert_idempotent(world)
    world.finish("06_pipeline")
    assert kinds(world.step()) == [("trigger", "07_pipeline")]
    assert world.count("06_pipeline") == 1


def test_manual_run_started_before_an_upstream_ended_is_waited_for_then_cleared() -> None:
    world = World(example_graph())
    middle_done_manual_06(world, started_before=True)
    result = world.plan()
    assert result.actions == ()  # running: never interrupted
    assert "re-run when it ends" in by_id(result)["06_pipeline"].message
    assert by_id(result)["07_pipeline"].state is State.WAITING
    world.finish("06_pipeline")
    result = world.plan()
    assert kinds(result) == [("clear", "06_pipeline")]
    assert "started before its upstreams ended" in result.actions[0].reason
    assert_idempotent(world)


def test_queued_manual_run_that_has_not_started_is_adopted() -> None:
    world = World(example_graph())
    world.root_run()
    # queued before the root ended, but not started: it will read the current data
    world.put(DagRun("02_pipeline", "manual__early", C, "queued", queued_at=C))
    result = world.plan()
    assert ("adopt", "02_pipeline") in kinds(result)
    assert_idempotent(world)


def test_lost_ledger_adopts_our_own_runs_and_triggers_nothing_twice() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.ledger.clear()
    result = world.plan()
    assert sorted(kinds(result)) == sorted(("adopt", d) for d in world.graph.pipelines
                                           if d != ROOT)
    assert_idempotent(world)
    world.settle()
    assert all(world.count(d) == 1 for d in world.graph.pipelines)


def test_finished_run_without_start_date_is_judged_by_queued_at() -> None:
    world = World(example_graph())
    world.root_run()
    root = world.run_of(ROOT)
    assert root is not None
    assert root.end_date is not None
    for queued, kind in ((root.end_date + timedelta(seconds=1), "adopt"),
                         (root.end_date - timedelta(seconds=1), "clear")):
        world.put(DagRun("02_pipeline", "marked", C, "success", queued_at=queued,
                         end_date=world.tick()))
        assert (kind, "02_pipeline") in kinds(world.plan())
    world.put(DagRun("02_pipeline", "marked", C, "success", end_date=world.tick()))
    assert ("clear", "02_pipeline") in kinds(world.plan())


def test_ledger_for_another_run_id_is_not_trusted() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    run = world.run_of("07_pipeline")
    assert run is not None
    del world.runs[("07_pipeline", run.run_id)]
    world.put(replace(run, run_id="manual__other"))  # same timestamps, another id
    result = world.plan()
    assert kinds(result) == [("adopt", "07_pipeline")]
    assert "the ledger records reconciler__" in result.actions[0].reason


# --- crashes and failed calls -------------------------------------------------------------


@pytest.mark.parametrize("state", [LedgerState.INTENT, LedgerState.DONE, LedgerState.FAILED])
def test_ledger_entry_without_a_run_triggers_again_with_the_same_run_id(
        state: LedgerState) -> None:
    """Crash after the intent before the call, a failed call, or a deleted run."""
    world = World(example_graph())
    world.root_run()
    first = world.plan()
    for action in first.actions:
        world.ledger[(C, action.dag_id)] = action.ledger_entry(at=world.tick(), state=state)
    again = world.plan()
    assert [(a.kind, a.dag_id, a.run_id) for a in again.actions] == \
        [(a.kind, a.dag_id, a.run_id) for a in first.actions]
    assert "Airflow has no run" in again.actions[0].reason
    assert_idempotent(world)


def test_trigger_intent_whose_call_went_through_is_adopted() -> None:
    """Crash after the call, before the result: the run is there, the entry says intent."""
    world = World(example_graph())
    world.root_run()
    result = world.plan()
    world.apply(result)
    for action in result.actions:
        world.ledger[(C, action.dag_id)] = action.ledger_entry(at=world.clock)  # intent
    assert kinds(world.plan()) == [("adopt", d) for d in MIDDLE]
    assert_idempotent(world)


def test_clear_intent_is_redone_only_if_the_clear_did_not_happen() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("03_pipeline")
    world.finish("03_pipeline")
    (clear,) = world.plan().actions
    world.ledger[(C, "06_pipeline")] = clear.ledger_entry(at=world.tick())  # crash: no call
    assert kinds(world.plan()) == [("clear", "06_pipeline")]
    world.apply(world.plan())  # the call goes through; the result is not recorded
    world.ledger[(C, "06_pipeline")] = clear.ledger_entry(at=world.tick())
    assert kinds(world.plan()) == [("adopt", "06_pipeline")]  # never cleared twice
    world.finish("06_pipeline")  # also once finished; 07 then follows in the same pass
    assert kinds(world.plan()) == [("adopt", "06_pipeline"), ("clear", "07_pipeline")]


# --- enabled, backfill, window, cycles ----------------------------------------------------


def test_disabled_pipeline_is_never_triggered_and_its_downstreams_wait() -> None:
    world = World(example_graph(**{"03_pipeline": {"enabled": False}}))
    world.root_run()
    world.settle()
    result = world.plan()
    statuses = by_id(result)
    assert world.run_of("03_pipeline") is None
    assert (statuses["03_pipeline"].state, statuses["03_pipeline"].reason) == \
        (State.DISABLED, Reason.DISABLED)
    assert statuses["06_pipeline"].message == "waiting for 03_pipeline (disabled)"
    assert statuses["07_pipeline"].state is State.WAITING
    world.queue("03_pipeline")  # a run by hand does not release the downstreams
    world.finish("03_pipeline")
    assert world.plan().actions == ()
    assert "is not used" in by_id(world.plan())["03_pipeline"].message


def test_reenabling_adopts_the_hand_made_run_and_continues() -> None:
    world = World(example_graph(**{"03_pipeline": {"enabled": False}}))
    world.root_run()
    world.settle()
    world.queue("03_pipeline")
    world.finish("03_pipeline")
    world.graph = example_graph()
    assert kinds(world.step()) == [("adopt", "03_pipeline"), ("trigger", "06_pipeline")]


def test_backfill_false_skips_cycles_opened_before_the_pipeline_was_added() -> None:
    world = World(example_graph(), since={"07_pipeline": C + timedelta(hours=1)})
    world.root_run()
    world.settle()
    result = world.plan()
    status = by_id(result)["07_pipeline"]
    assert (status.state, status.reason) == (State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED)
    assert "backfill: false" in status.message
    assert world.run_of("07_pipeline") is None
    # a later cycle (opened after 07 was added) runs it
    later = C + timedelta(hours=2)
    world.clock = later + timedelta(minutes=1)
    world.root_run(later)
    world.settle()
    assert world.count("07_pipeline", later) == 1


def test_backfill_true_runs_open_cycles_older_than_the_pipeline() -> None:
    graph = example_graph(**{"07_pipeline": {"backfill": True}})
    world = World(graph, since={"07_pipeline": C + timedelta(hours=1)})
    world.root_run()
    world.settle()
    assert world.count("07_pipeline") == 1


def test_backfill_rule_compares_with_the_root_run_queued_at_not_the_logical_date() -> None:
    root = World(example_graph())
    root.root_run()
    run = root.run_of(ROOT)
    assert run is not None
    assert run.queued_at is not None
    for added, expected in ((run.queued_at - timedelta(seconds=1), "trigger"),
                            (run.queued_at, "trigger"),  # at the boundary: was there
                            (run.queued_at + timedelta(microseconds=1), None)):
        world = World(example_graph(), since={"02_pipeline": added})
        world.runs = dict(root.runs)
        actions = {d: k for k, d in kinds(world.plan())}
        assert actions.get("02_pipeline") == expected, added


def test_backfill_rule_does_not_apply_once_the_ledger_has_the_pipeline() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.since = {d: C + timedelta(days=1) for d in world.graph.pipelines}
    world.user_clear("03_pipeline")
    world.finish("03_pipeline")
    assert kinds(world.plan()) == [("clear", "06_pipeline")]


def test_several_roots_the_opening_is_the_earliest_root_run() -> None:
    graph = Graph([Pipeline("a"), Pipeline("b"), Pipeline("j", depends_on=("a", "b"))])
    world = World(graph)
    world.root_run(dag_id="a")
    a_queued = world.run_of("a").queued_at  # type: ignore[union-attr]
    world.root_run(dag_id="b")
    assert a_queued is not None
    world.since = {"j": a_queued + timedelta(microseconds=1)}
    assert by_id(world.plan())["j"].state is State.NOT_IN_CYCLE


def test_window_boundary_is_open_and_older_cycles_are_never_touched() -> None:
    world = World(example_graph())
    root = world.root_run()
    assert root.end_date is not None
    last = root.end_date  # the root run's latest activity: queued, started, ended
    at_edge = plan(world.graph, list(world.runs.values()), {}, last + WINDOW, window=WINDOW)
    assert at_edge.cycles == (C,)
    assert len(at_edge.actions) == 4
    past = plan(world.graph, list(world.runs.values()), {},
                last + WINDOW + timedelta(microseconds=1), window=WINDOW)
    assert (past.cycles, past.actions, past.statuses) == ((), (), ())


def test_a_cycle_is_open_while_its_root_run_is_recent_whatever_its_logical_date() -> None:
    # A weekly root on a data-interval timetable: logical date = the interval's start,
    # the run itself a week later. And a backfill of last month, run now.
    weekly = C - timedelta(days=7)
    backfill = C - timedelta(days=30)
    world = World(example_graph())
    world.root_run(cycle=weekly)
    world.root_run(cycle=backfill)
    result = world.plan()
    assert result.cycles == (backfill, weekly)
    extracts = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
    assert sorted(a.dag_id for a in result.actions if a.cycle == weekly) == extracts
    assert sorted(a.dag_id for a in result.actions if a.cycle == backfill) == extracts
    assert all(a.logical_date == a.cycle for a in result.actions)


def test_a_cycle_whose_root_run_is_old_is_closed_even_if_downstream_runs_are_new() -> None:
    world = World(example_graph())
    world.root_run()
    world.queue("02_pipeline", C, run_id="manual__x")  # someone runs an extract by hand
    later = world.clock + WINDOW + timedelta(seconds=1)
    world.queue("02_pipeline", C, run_id="manual__y")
    result = plan(world.graph, list(world.runs.values()), {}, later, window=WINDOW)
    assert result.cycles == ()
    assert result.actions == ()


def test_a_cycle_in_the_future_is_open_and_waits_for_its_root() -> None:
    world = World(example_graph())
    world.queue(ROOT, cycle=C + timedelta(days=1), run_id="manual__future")
    result = world.plan(now=C)
    assert result.cycles == (C + timedelta(days=1),)
    assert result.actions == ()


def test_several_roots_only_join_runs_with_the_same_logical_date() -> None:
    graph = Graph([Pipeline("a"), Pipeline("b"), Pipeline("only_a", depends_on=("a",)),
                   Pipeline("j", depends_on=("a", "b")), Pipeline("k", depends_on=("j",))])
    world = World(graph)
    c2 = C + timedelta(hours=1)
    world.root_run(C, dag_id="a")
    world.root_run(c2, dag_id="b")
    result = world.plan()
    assert result.cycles == (C, c2)
    assert kinds(result) == [("trigger", "only_a")]
    first, second = by_id(result, C), by_id(result, c2)
    assert first["b"].state is State.NOT_IN_CYCLE
    assert first["j"].message == "waiting for b (no run in this cycle)"
    assert first["j"].waiting_for == ("b",)
    assert first["k"].state is State.WAITING
    # in b's cycle nothing upstream of only_a ran: not this cycle's business
    assert (second["only_a"].state, second["only_a"].reason) == \
        (State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED)
    assert second["j"].state is State.WAITING
    world.root_run(C, dag_id="b")  # b's run for the same logical date: j joins
    assert ("trigger", "j") in kinds(world.plan())


def test_runs_with_a_null_logical_date_are_ignored() -> None:
    world = World(example_graph())
    world.put(DagRun(ROOT, "asset_triggered__x", None, "success", end_date=C))
    assert world.plan().cycles == ()
    world.root_run()
    world.put(DagRun("02_pipeline", "manual__nodate", None, "success", end_date=C))
    assert ("trigger", "02_pipeline") in kinds(world.plan())


def test_several_runs_for_one_cycle_prefer_the_deterministic_run_id() -> None:
    world = World(example_graph())
    world.root_run()
    world.step()
    for d in MIDDLE:
        world.finish(d)
    later = world.tick()
    world.put(DagRun("02_pipeline", "manual__dup", C, "running", later, later))
    runs = list(world.runs.values())
    for order in (runs, runs[::-1]):
        result = plan(world.graph, order, world.ledger, world.clock, window=WINDOW)
        assert by_id(result)["02_pipeline"].run_id == run_id_for(C)
        assert kinds(result) == [("trigger", "06_pipeline")]


def test_output_is_deterministic_whatever_the_order_of_the_runs() -> None:
    world = World(example_graph())
    world.root_run()
    world.root_run(C + timedelta(hours=3))
    world.step()
    world.finish("03_pipeline")
    runs = list(world.runs.values())
    expected = plan(world.graph, runs, world.ledger, world.clock, window=WINDOW)
    rng = random.Random(3)
    for _ in range(5):
        rng.shuffle(runs)
        assert plan(world.graph, runs, world.ledger, world.clock, window=WINDOW) == expected
    assert [a.cycle for a in expected.actions] == sorted(a.cycle for a in expected.actions)


def test_scenario_reconciler_off_triggers_every_missing_run_of_every_open_cycle_once() -> None:
    world = World(example_graph())
    cycles = [C + timedelta(hours=h) for h in (0, 6, 12)]
    old = C - WINDOW - timedelta(hours=1)
    world.clock = old
    world.root_run(old)  # ran, and left the window, before the reconciler starts
    world.clock = C + timedelta(minutes=1)
    for cycle in cycles:
        world.root_run(cycle)
    world.clock = cycles[-1] + timedelta(hours=1)
    world.settle()
    for cycle in cycles:
        assert all(world.count(d, cycle) == 1 for d in world.graph.pipelines)
    assert world.run_of("02_pipeline", C - WINDOW - timedelta(hours=1)) is None


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan(example_graph(), [], {}, datetime(2025, 6, 1), window=WINDOW)


# --- the value types ------------------------------------------------------------------------


def test_run_id_format_is_accepted_by_airflow() -> None:
    for cycle in (C, C + timedelta(microseconds=250_000),
                  datetime(2025, 6, 1, 2, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))):
        run_id = run_id_for(cycle)
        assert AIRFLOW_RUN_ID.match(run_id)
        assert ".." not in run_id
        assert run_id.endswith("+00:00")  # one instant, one run id, whatever the zone
    assert run_id_for(C) == "reconciler__2025-06-01T00:00:00+00:00"


def test_dagrun_from_api_parses_airflow_3_json() -> None:
    run = DagRun.from_api({
        "dag_run_id": "manual__2025-06-01T00:00:00+00:00", "dag_id": "02_pipeline",
        "logical_date": "2025-06-01T00:00:00Z", "queued_at": "2025-06-01T00:01:00.5+00:00",
        "start_date": "2025-06-01T00:01:01.123456Z", "end_date": None, "state": "running",
        "run_type": "manual", "conf": {"x": 1, "reconciler": {"commit": "c"}},
        "run_after": "2025-06-01T00:00:00Z"})
    assert run.logical_date == C
    assert run.queued_at == C + timedelta(minutes=1, milliseconds=500)
    assert run.start_date is not None
    assert run.start_date.tzinfo is not None
    assert (run.end_date, run.state, run.conf, run.finished) == (
        None, "running", {"reconciler": {"commit": "c"}}, False)  # only the provenance
    asset = DagRun.from_api({"dag_run_id": "a", "dag_id": "d", "logical_date": None,
                             "state": "success"})
    assert asset.logical_date is None
    assert asset.finished
    v1 = DagRun.from_api({"dag_run_id": "a", "dag_id": "d", "state": "queued",
                          "execution_date": "2025-06-01T00:00:00+00:00"})
    assert v1.logical_date == C


def test_naive_datetimes_are_refused_in_values() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        DagRun("d", "r", datetime(2025, 6, 1), "success")


def test_ledger_entry_round_trips_through_json() -> None:
    entry = LedgerEntry("reconciler__x", ActionKind.CLEAR,
                        Fingerprint([("b", "r2", "e2"), ("a", "r1", "e1")]), "abc",
                        C, LedgerState.INTENT)
    data = entry.to_json()
    assert data == {"run_id": "reconciler__x", "action": "clear",
                    "fingerprint": [["a", "r1", "e1"], ["b", "r2", "e2"]], "commit": "abc",
                    "at": "2025-06-01T00:00:00+00:00", "state": "intent",
                    "decided": "run-end"}
    assert LedgerEntry.from_json(data) == entry
    assert not entry.confirmed
    with pytest.raises(ValueError, match="delete"):
        LedgerEntry.from_json({**data, "action": "delete"})


def test_action_ledger_entry_records_intent_then_done() -> None:
    action = Action(ActionKind.TRIGGER, "02_pipeline", C, run_id_for(C),
                    Fingerprint([(ROOT, "s", "e")]), "why", commit="abc")
    entry = action.ledger_entry(at=C)
    assert (entry.state, entry.action, entry.commit) == (LedgerState.INTENT,
                                                         ActionKind.TRIGGER, "abc")
    assert action.ledger_entry(at=C, state=LedgerState.DONE).confirmed


def test_fingerprint_changed_only_counts_upstreams_in_both() -> None:
    old = Fingerprint([("a", "r", "1"), ("b", "r", "1")])
    assert old.changed(Fingerprint([("a", "r", "1"), ("b", "r", "2")])) == ("b",)
    assert old.changed(Fingerprint([("a", "r", "1")])) == ()
    assert old.changed(Fingerprint([("a", "r", "1"), ("b", "r", "1"), ("c", "r", "1")])) \
        == ()
    assert old.changed(Fingerprint([("a", "r9", "1"), ("b", "r", "1")])) == ("a",)
    assert old == (("a", "r", "1"), ("b", "r", "1"))  # still a plain tuple


def test_a_suspended_pipeline_is_like_disabled_until_resumed() -> None:
    world = World(example_graph())
    world.root_run()
    held = plan(world.graph, list(world.runs.values()), {}, world.clock, window=WINDOW,
                suspended={"03_pipeline": "alice: incident 42"})
    assert sorted(a.dag_id for a in held.actions) == ["02_pipeline", "04_pipeline",
                                                      "05_pipeline"]
    st = held.status("03_pipeline", C)
    assert st is not None
    assert st.state is State.SUSPENDED
    assert "alice: incident 42" in st.message
    assert "`reconciler resume`" in st.message
    resumed = plan(world.graph, list(world.runs.values()), {}, world.clock, window=WINDOW,
                   suspended={})
    assert "03_pipeline" in {a.dag_id for a in resumed.actions}


def test_suspending_the_namespace_triggers_nothing_but_keeps_cycles_open() -> None:
    world = World(example_graph())
    world.root_run()
    held = plan(world.graph, list(world.runs.values()), {}, world.clock, window=WINDOW,
                suspended={"*": "bob"})
    assert held.actions == ()
    assert held.cycles == (C,)
    states = {s.dag_id: s.state for s in held.statuses}
    assert states["01_pipeline_init"] is State.DONE
    assert {states[d] for d in states if d != "01_pipeline_init"} == {State.SUSPENDED}


def test_suspending_never_changes_the_state_of_what_has_run() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()  # the cycle finished: every pipeline done
    world.suspended = {"03_pipeline": "alice: INC-42"}
    held = world.plan()
    assert held.actions == ()
    statuses = by_id(held)
    assert {d: s.state for d, s in statuses.items()} == dict.fromkeys(statuses, State.DONE)
    assert statuses["03_pipeline"].reason is Reason.DONE
    assert "suspended by an operator (alice: INC-42)" in statuses["03_pipeline"].message
    for dag_id in ("06_pipeline", "07_pipeline"):
        assert statuses[dag_id].run_id == run_id_for(C)
        assert statuses[dag_id].message == (f"run {run_id_for(C)} is success; held while "
                                            "03_pipeline is suspended: not re-run until "
                                            "`reconciler resume`")
    assert statuses["02_pipeline"].message == f"run {run_id_for(C)} is success"
    world.suspended = {"*": "bob: freeze"}
    frozen = world.plan()
    assert frozen.actions == ()
    assert {s.state for s in frozen.statuses} == {State.DONE}


def test_a_suspension_holds_back_what_has_not_run_yet() -> None:
    world = World(example_graph())
    world.root_run()
    done_through(world, *MIDDLE)  # 02-05 triggered and done; 06 not triggered yet
    world.suspended = {"03_pipeline": "alice"}
    held = world.plan()
    assert held.actions == ()
    statuses = by_id(held)
    assert statuses["03_pipeline"].state is State.DONE
    assert statuses["06_pipeline"].state is State.WAITING
    assert statuses["06_pipeline"].message == "waiting for 03_pipeline (suspended)"
    assert statuses["07_pipeline"].state is State.WAITING
    assert "06_pipeline (held: 03_pipeline suspended)" in statuses["07_pipeline"].message
    world.suspended = {}
    assert kinds(world.plan()) == [("trigger", "06_pipeline")]


def test_a_rerun_above_a_suspension_waits_for_resume_and_shows_what_ran() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.suspended = {"03_pipeline": "alice"}
    world.user_clear("02_pipeline")  # someone re-runs 02 while 03 is suspended
    world.finish("02_pipeline")
    held = world.plan()
    assert held.actions == ()  # 06 is not re-run while 03 is suspended
    assert by_id(held)["06_pipeline"].state is State.DONE
    world.suspended = {}
    assert kinds(world.plan()) == [("clear", "06_pipeline")]


# --- the eager path (DESIGN section 5) ----------------------------------------------------


def tasks_done(world: World, dag_id: str, cycle: datetime = C) -> DagRun:
    """Every task of the (running) run is done; Airflow has not closed the run yet."""
    run = world.run_of(dag_id, cycle)
    assert run is not None
    if run.state == "queued":
        run = world.put(replace(run, state="running", start_date=world.tick()))
    return world.put(replace(run, tasks_done_at=world.tick()))


def up_to_05_running() -> World:
    """The example cycle with 02-05 triggered and 02-04 finished; 05 still running."""
    world = World(example_graph())
    world.root_run()
    world.apply(world.plan())  # 02-05 triggered
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline"):
        world.finish(dag_id)
    return world


def test_eager_a_running_upstream_with_every_task_done_counts_as_succeeded() -> None:
    world = up_to_05_running()
    tasks_done(world, "05_pipeline")
    result = world.plan()
    assert kinds(result) == [("trigger", "06_pipeline")]
    (action,) = result.actions
    assert "eager: every task of 05_pipeline is done" in action.reason
    assert action.ledger_entry(at=world.clock).decided == "eager"
    assert kinds(plan(world.graph, list(world.runs.values()), world.ledger, world.clock,
                      window=WINDOW, eager=False)) == []  # --no-eager waits for the run


def test_eager_the_same_run_closing_later_records_its_end_without_a_rerun() -> None:
    world = up_to_05_running()
    tasks_done(world, "05_pipeline")
    world.apply(world.plan())  # 06 triggered eagerly
    world.finish("05_pipeline")  # Airflow closes 05: same run, now with an end date
    result = world.plan()
    assert kinds(result) == [("adopt", "06_pipeline")]
    world.apply(result)
    assert kinds(world.plan()) == []
    entry = world.ledger[(C, "06_pipeline")]
    assert entry.decided == "run-end"


def test_eager_an_upstream_that_ends_failed_after_all_shows_why_and_reruns_later() -> None:
    world = up_to_05_running()
    tasks_done(world, "05_pipeline")
    world.apply(world.plan())
    world.finish("05_pipeline", state="failed")  # e.g. a teardown failed the run
    world.finish("06_pipeline")
    st = by_id(world.plan())["06_pipeline"]
    assert st.state is State.BLOCKED
    assert "eager success of 05_pipeline, whose run then ended failed" in st.message
    world.user_clear("05_pipeline")
    world.finish("05_pipeline")
    assert ("clear", "06_pipeline") in kinds(world.plan())


def test_eager_a_task_up_for_retry_is_not_done() -> None:
    world = up_to_05_running()
    run = world.run_of("05_pipeline")
    assert run is not None
    world.put(replace(run, state="running", start_date=world.tick()))  # no tasks_done_at
    assert kinds(world.plan()) == []


def apply_unconfirmed(world: World, result: Plan, state: LedgerState) -> None:
    """The Airflow call took effect but its answer was lost: the ledger keeps the intent
    (or records the call as failed)."""
    world.apply(result)
    for action in result.actions:
        key = (action.cycle, action.dag_id)
        world.ledger[key] = replace(world.ledger[key], state=state)


@pytest.mark.parametrize("state", [LedgerState.INTENT, LedgerState.FAILED])
def test_eager_an_unconfirmed_trigger_is_adopted_after_its_upstream_closes(
        state: LedgerState) -> None:
    """The downstream started after its upstream's tasks were done, before Airflow closed
    the upstream run: the same execution, so not a run that started too early."""
    world = up_to_05_running()
    tasks_done(world, "05_pipeline")
    eager = world.plan()
    assert kinds(eager) == [("trigger", "06_pipeline")]
    apply_unconfirmed(world, eager, state)  # the POST timed out after it took effect
    world.start("06_pipeline")
    world.finish("05_pipeline")  # closed by the scheduler after 06 had started
    result = world.plan()
    assert kinds(result) == [("adopt", "06_pipeline")]
    world.apply(result)
    world.finish("06_pipeline")
    assert kinds(world.plan()) == [("trigger", "07_pipeline")]
    assert world.executions.count(("06_pipeline", C)) == 1


def test_eager_an_unconfirmed_adopt_is_adopted_again_not_cleared() -> None:
    """Seed 306 of the fault simulation: 06 triggered eagerly (its answer lost), adopted
    once 05 closed; the leader was killed after the adopt's intent reached etcd, before
    its confirmation. An adopt calls nothing: its intent is the decision itself, on this
    very run and these upstream runs. The next leader read it as a stranger's run that
    started before 05's closing end and cleared it: 06 ran twice."""
    world = up_to_05_running()
    tasks_done(world, "05_pipeline")
    apply_unconfirmed(world, world.plan(), LedgerState.FAILED)  # 06: the answer was lost
    world.start("06_pipeline")
    world.finish("05_pipeline")  # closed by the scheduler after 06 had started
    adopt = world.plan()
    assert kinds(adopt) == [("adopt", "06_pipeline")]
    apply_unconfirmed(world, adopt, LedgerState.INTENT)  # killed before the confirmation
    world.finish("06_pipeline")
    again = world.plan()  # the next leader
    assert kinds(again) == [("adopt", "06_pipeline"), ("trigger", "07_pipeline")]
    world.apply(again)
    world.finish("07_pipeline")
    assert kinds(world.plan()) == []
    assert world.executions.count(("06_pipeline", C)) == 1


def test_an_unconfirmed_adopt_on_upstreams_that_re_ran_since_is_re_run() -> None:
    """The adopt's intent vouches for its own upstream runs only: 05 re-ran after it, so
    06 is re-run, as for any run the ledger does not vouch for."""
    world = up_to_05_running()
    world.finish("05_pipeline")
    world.apply(world.plan())  # 06 triggered
    world.finish("06_pipeline")
    entry = world.ledger[(C, "06_pipeline")]
    world.ledger[(C, "06_pipeline")] = replace(entry, action=ActionKind.ADOPT,
                                               state=LedgerState.INTENT)
    world.user_clear("05_pipeline")
    world.finish("05_pipeline")
    assert kinds(world.plan()) == [("clear", "06_pipeline")]


def test_eager_an_unconfirmed_clear_that_took_effect_is_adopted() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("05_pipeline")
    tasks_done(world, "05_pipeline")  # re-ran: every task done, the run not closed yet
    rerun = world.plan()
    assert ("clear", "06_pipeline") in kinds(rerun)
    apply_unconfirmed(world, rerun, LedgerState.INTENT)
    world.start("06_pipeline")
    world.finish("05_pipeline")
    result = world.plan()
    assert ("adopt", "06_pipeline") in kinds(result)
    assert ("clear", "06_pipeline") not in kinds(result)


def test_an_unconfirmed_clear_that_did_not_take_effect_is_sent_again() -> None:
    world = World(example_graph())
    world.root_run()
    world.settle()
    world.user_clear("05_pipeline")
    world.finish("05_pipeline")
    rerun = world.plan()
    assert ("clear", "06_pipeline") in kinds(rerun)
    for action in rerun.actions:  # the intent is written, the POST never arrived
        world.ledger[(action.cycle, action.dag_id)] = action.ledger_entry(at=world.tick())
    assert ("clear", "06_pipeline") in kinds(world.plan())


def test_an_unconfirmed_trigger_on_upstreams_that_re_ran_since_is_re_run() -> None:
    world = World(example_graph())
    world.root_run()
    world.apply(world.plan())
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"):
        world.finish(dag_id)
    apply_unconfirmed(world, world.plan(), LedgerState.FAILED)  # 06 triggered, unconfirmed
    world.start("06_pipeline")
    world.user_clear("05_pipeline")  # 05 re-runs while 06 runs
    world.finish("05_pipeline")
    world.finish("06_pipeline")
    assert ("clear", "06_pipeline") in kinds(world.plan())
