"""The pure planning core: desired graph + observed runs + ledger + now -> actions and status.

`plan()` implements DESIGN section 5 and does no I/O at all (no etcd, no HTTP, no clock:
`now` is a parameter). The loop observes, calls `plan()`, applies the actions (recording
intent, calling Airflow, recording the result) and publishes the statuses.

Cycles and the window
---------------------
A cycle is the `logical_date` of a run of a root pipeline (runs with a null logical date
never make a cycle). A cycle is open while its root run is recent: queued, started or
ended inside the window (`now - window <= t`, the boundary itself is open), whatever its
logical date. So a weekly root on a data-interval timetable (logical date a week before
it runs) and a backfill of last month are reconciled, and a cycle whose root runs are
all older is never touched: its runs, ledger entries and statuses are not looked at. A
root run with none of those times (never seen by Airflow's scheduler) is judged by its
logical date. A cycle in the future (a root run whose logical date is after `now`) is
open too: its downstreams simply wait for it.

The run of P for cycle C is P's run whose `logical_date == C`. Airflow 3 restored the
unique constraint on `(dag_id, logical_date)` (AIP-83 amendment, apache/airflow#46295), so
normally there is at most one. If several are observed anyway (Airflow 2 era data, a
stale observation), the one chosen is, in this order: the deterministic run id
`run_id_for(C)`, the run id recorded in the ledger, the most recently queued, the
greatest run id.

Per cycle, pipelines are walked once in topological order, so each upstream's outcome in
this pass is known before its downstreams are decided. An upstream's outcome is one of:

- ok / failed: it has a finished run, its own upstreams are satisfied, and no action is
  planned for it in this pass;
- pending: it has no run yet, its run is queued or running, it waits for its own
  upstreams, it is disabled, or a trigger/re-run of it is planned in this very pass
  (so a downstream never starts on data that is about to be replaced: this is what
  merges several concurrent upstream re-runs into one re-run of the downstream);
- blocked: it, or something above it, is stuck on a failed upstream (all_success);
- absent: nothing will ever come in this cycle (a root without a run for this cycle, a
  pipeline not scheduled by the backfill rule, or whose upstreams are all absent).

A non-root enabled pipeline P is satisfied when every upstream is ok (all_success) or ok
or failed (all_done). Then the table of DESIGN section 5 applies:

| P's run | ledger entry for (C, P) | action |
| none | none, or any (deleted run; crash after intent before the call) | trigger |
| queued/running | confirmed for that run | wait (a stale fingerprint re-runs it once it ends) |
| finished | confirmed, fingerprint unchanged | nothing (done, or failed stays failed) |
| finished | confirmed, an upstream's run id or end date changed | clear (re-run) |
| finished, re-run (by a user) after those upstreams ended | confirmed, changed | adopt |
| any | none, for another run id, or not confirmed (intent, failed call) | adopt / clear |

"Confirmed" means `state == done` and the same run id. An unconfirmed entry is the
trace of a crash or a failed call: the run's own timestamps decide, as for a manual run
or a lost ledger. Adopt if the run started after all its upstreams' runs ended (a
finished run without `start_date` is judged by `queued_at`; a queued run that has not
started yet is adopted: it will read the current data); otherwise clear it once it is
finished. A run still running that started too early is never interrupted: it is waited
for and re-run when it ends. Airflow resets `start_date` and sets a new `queued_at` when
a finished run is cleared, so a clear that did go through is adopted next pass, never
cleared twice.

The fingerprint is the sorted `(upstream id, run id, end_date ISO)` of the upstream runs
P is started on (with all_done, failed ones included). A re-run needs an upstream present
both in the stored and the current fingerprint with a different run id or end date: an
upstream added to or removed from P's `depends_on` later does not re-run open cycles.

Other rules and their edge cases
--------------------------------
- Roots are never triggered, cleared or adopted (Airflow schedules them).
- A pipeline already started (in the ledger) on the same upstream run ids in another
  cycle is not triggered again: an upstream run whose logical date changed in Airflow
  moves to another cycle, and its downstreams are not run twice on it (NotScheduled,
  the message names the cycle and run it was started as).
- Several roots: a downstream joins runs with the same logical date only. A pipeline
  reachable from a root that has no run for the cycle waits, and its status says
  "waiting for <root> (no run in this cycle)"; when none of its upstreams has anything
  for the cycle it is `not_in_cycle` (reason NotScheduled) instead: that cycle belongs
  to other roots.
- Suspended (`reconciler suspend`, key `suspended/<dag_id>` or `suspended/*`): like
  `enabled: false` for a non-root until resumed: never triggered, cleared or adopted,
  and what is below it is held (nothing triggered or re-run on it). A suspension holds
  back only what has not run yet; it never changes the state of what has run: a
  suspended pipeline, or one held below it, that has a run in the cycle shows that run's
  own state (done, failed, running), its message saying what holds it; one without a run
  shows Suspended, or WaitingFor ... (suspended). Roots keep opening cycles, so resuming
  catches up every open cycle.
- `enabled: false`: never triggered, cleared or adopted; its downstreams wait for it
  (status Disabled; downstreams WaitingFor ... (disabled)), even if someone ran it by
  hand: git took it out of the chain, re-enabling it puts it back (its run is then
  adopted or re-run by the rule above). A disabled root still opens cycles.
- Backfill: P was "added after the cycle opened" when `since[P]` (when P was first
  synced) is later than the cycle's opening time, the earliest `queued_at` (else
  `start_date`, else the logical date) over the root runs of that cycle. `queued_at` and
  not the logical date, because a scheduled run's logical date is the start of its data
  interval, long before the run exists. With `backfill: false` such a P gets nothing in
  that cycle (status NotScheduled) and its downstreams wait for it; `backfill: true`
  ignores the rule. A P missing from `since` (or `since=None`) counts as always there.
  A P that already has a ledger entry for the cycle is managed as usual (it was in the
  graph then).
- An upstream that is being re-run (cleared: queued/running again) makes its
  downstreams wait; when it ends with a new end date, the fingerprint differs and they
  are re-run, one after the other down the graph.
- A blocked pipeline stays blocked until the failed run is re-run successfully; with
  all_done, a failed upstream counts as done, but an upstream that never ran because it
  is blocked does not (it has no run in the cycle).
- Unknown run states are treated as not finished: waiting is the safe side.

The result is idempotent: once the actions are applied and the ledger records them
(`Action.ledger_entry(..., state=done)`), planning again on the new observation yields
no action. Output order is deterministic: cycles oldest first, then the graph's
topological order.

Cost: one pass over the runs to index them by cycle and pipeline, then one walk of the
topological order per open cycle, so O(runs + cycles x (pipelines + edges)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from reconciler.core.graph import Graph, Pipeline
from reconciler.core.state import (
    EAGER,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCESS,
    Action,
    ActionKind,
    DagRun,
    Fingerprint,
    FingerprintItem,
    LedgerEntry,
    LedgerState,
    PipelineStatus,
    Plan,
    Reason,
    State,
    eager_item,
    execution_start,
    fingerprint_item,
    iso,
    run_id_for,
)

__all__ = ["plan"]

# Outcome kinds of a pipeline in a cycle, as seen by its downstreams. Held is pending
# because of a suspension only: what has already run below it keeps its own state.
_OK, _FAILED, _PENDING, _BLOCKED, _ABSENT, _HELD = range(6)


class _Outcome(NamedTuple):
    kind: int
    run: DagRun | None = None
    note: str = ""
    """Pending/absent: why, for the downstream's message ("running", "disabled", ...)."""
    causes: tuple[str, ...] = ()
    """Blocked: the failed pipelines at the origin. Held: the suspended ones."""
    item: FingerprintItem | None = None
    """Ok/failed: the run's fingerprint item, computed once per cycle, not per downstream."""


_NO_RUN = _Outcome(_ABSENT, None, "no run in this cycle")
_UPSTREAMS_ABSENT = _Outcome(_ABSENT, None, "nothing upstream in this cycle")
_NOT_SCHEDULED = _Outcome(_ABSENT, None, "not scheduled in this cycle")
_DISABLED = _Outcome(_PENDING, None, "disabled")
_WAITING = _Outcome(_PENDING, None, "waiting for its upstreams")
_TRIGGER_PLANNED = _Outcome(_PENDING, None, "trigger planned")
_RERUN_PLANNED = _Outcome(_PENDING, None, "re-run planned")
_NOT_IN_GRAPH = _Outcome(_ABSENT, None, "not in the graph")

_StatusFn = Callable[..., None]


def plan(
    graph: Graph,
    runs: Iterable[DagRun],
    ledger: Mapping[tuple[datetime, str], LedgerEntry],
    now: datetime,
    *,
    window: timedelta,
    since: Mapping[str, datetime] | None = None,
    commit: str = "",
    suspended: Mapping[str, str] | None = None,
    eager: bool = True,
) -> Plan:
    """Decide what to do in every open cycle; see the module docstring for the rules.

    `runs`: observed runs of any DAGs (others than the graph's are ignored).
    `ledger`: entries keyed by (cycle, dag_id). `now`: aware datetime. `window`: lookback.
    `since`: dag_id -> when it was first synced (backfill rule). `commit`: the graph's
    commit, put in statuses, provenance and ledger entries. `suspended`: dag_id (or
    "*" for the whole namespace) -> why, from an operator's `reconciler suspend`; such a
    pipeline is treated like `enabled: false` until resumed. `eager`: a running upstream
    whose every task is done (`DagRun.tasks_done_at`) counts as succeeded.
    """
    if now.tzinfo is None:
        raise ValueError("plan(): now must be timezone-aware")
    horizon = now - window
    pipelines = graph.pipelines

    # Index the runs once: logical date -> dag_id -> the run of that pipeline.
    by_date: dict[datetime, dict[str, DagRun]] = {}
    opened: dict[datetime, datetime] = {}
    recent: dict[datetime, datetime] = {}
    for run in runs:
        date = run.logical_date
        if date is None:
            continue
        pipeline = pipelines.get(run.dag_id)
        if pipeline is None:
            continue
        bucket = by_date.get(date)
        if bucket is None:
            bucket = by_date[date] = {}
        previous = bucket.get(run.dag_id)
        bucket[run.dag_id] = run if previous is None else _prefer(
            previous, run, date, ledger.get((date, run.dag_id)))
        if not pipeline.depends_on:
            at = run.queued_at or run.start_date or date
            if date not in opened or at < opened[date]:
                opened[date] = at
            active = max((t for t in (run.queued_at, run.start_date, run.end_date)
                          if t is not None), default=date)
            if date not in recent or active > recent[date]:
                recent[date] = active

    cycles = sorted(c for c in opened if recent[c] >= horizon)
    order = graph.topological_order()
    upstreams = {d: tuple(sorted(pipelines[d].depends_on)) for d in order}
    actions: list[Action] = []
    statuses: list[PipelineStatus] = []
    triggered = _TriggeredOn(ledger)
    # Where each pipeline runs now, when the graph declares deployments: a confirmed run
    # recorded in another one is the run of a pipeline moved since (docs/design.md 13).
    placed = {d: graph.deployment_of(d) for d in order} if graph.deployments else {}
    for cycle in cycles:
        _plan_cycle(
            cycle=cycle, opened_at=opened[cycle], bucket=by_date[cycle], order=order,
            pipelines=pipelines, upstreams=upstreams, ledger=ledger, since=since,
            commit=commit, actions=actions, statuses=statuses, suspended=suspended or {},
            eager=eager, triggered=triggered, placed=placed,
        )
    return Plan(actions=tuple(actions), statuses=tuple(statuses), cycles=tuple(cycles))


class _TriggeredOn:
    """Which cycle each pipeline was already started for on a given set of upstream runs
    (the run ids of its ledger entries' fingerprints), built on first use: the plan asks
    only before a first trigger.

    An upstream run belongs to one cycle, its logical date; so the same upstream runs in
    another cycle mean a run whose logical date changed between listings (edited in
    Airflow's database). Triggering again there would run the pipeline twice on the
    same upstream executions."""

    def __init__(self, ledger: Mapping[tuple[datetime, str], LedgerEntry]) -> None:
        self._ledger = ledger
        self._index: dict[tuple[str, tuple[tuple[str, str], ...]],
                          tuple[datetime, str]] | None = None

    def elsewhere(self, dag_id: str, items: Sequence[FingerprintItem],
                  cycle: datetime) -> tuple[datetime, str] | None:
        """(cycle, run id) of an earlier start of `dag_id` on the runs of `items` in
        another cycle than `cycle`, if any."""
        if self._index is None:
            self._index = {}
            for (when, name), entry in self._ledger.items():
                if entry.fingerprint:
                    key = (name, tuple((i.upstream, i.run_id) for i in entry.fingerprint))
                    self._index.setdefault(key, (when, entry.run_id))
        if not items:
            return None
        hit = self._index.get((dag_id, tuple((i.upstream, i.run_id) for i in items)))
        return hit if hit is not None and hit[0] != cycle else None


def _prefer(a: DagRun, b: DagRun, cycle: datetime, entry: LedgerEntry | None) -> DagRun:
    """Of two runs of one pipeline with the same logical date, the one that is "the" run."""
    wanted = run_id_for(cycle)
    recorded = entry.run_id if entry is not None else None

    def key(r: DagRun) -> tuple[bool, bool, str, str]:
        when = r.queued_at or r.start_date
        return (r.run_id == wanted, r.run_id == recorded, iso(when) if when else "", r.run_id)

    return a if key(a) >= key(b) else b


def _plan_cycle(
    *,
    cycle: datetime,
    opened_at: datetime,
    bucket: Mapping[str, DagRun],
    order: list[str],
    pipelines: Mapping[str, Pipeline],
    upstreams: Mapping[str, tuple[str, ...]],
    ledger: Mapping[tuple[datetime, str], LedgerEntry],
    since: Mapping[str, datetime] | None,
    commit: str,
    actions: list[Action],
    statuses: list[PipelineStatus],
    placed: Mapping[str, str],
    suspended: Mapping[str, str],
    eager: bool,
    triggered: _TriggeredOn,
) -> None:
    outcome: dict[str, _Outcome] = {}
    everything = suspended.get("*")
    deterministic = run_id_for(cycle)

    def status(dag_id: str, state: State, reason: Reason, message: str,
               run: DagRun | None = None, waiting_for: tuple[str, ...] = (),
               blocked_by: tuple[str, ...] = ()) -> None:
        statuses.append(PipelineStatus(
            dag_id=dag_id, cycle=cycle, state=state, reason=reason, message=message,
            run_id=run.run_id if run is not None else None, waiting_for=waiting_for,
            blocked_by=blocked_by, commit=commit))

    for dag_id in order:
        pipeline = pipelines[dag_id]
        run = bucket.get(dag_id)
        ups = upstreams[dag_id]

        if not pipeline.enabled:
            extra = f"; run {run.run_id} is {run.state} but is not used" if run else ""
            status(dag_id, State.DISABLED, Reason.DISABLED,
                   "disabled in the graph (enabled: false): never triggered, "
                   f"downstreams wait{extra}", run)
            outcome[dag_id] = _DISABLED
            continue

        if not ups:
            outcome[dag_id] = _root(dag_id, run, status, eager)
            continue

        why = suspended.get(dag_id, everything)
        if why is not None:
            who = "suspended" if dag_id in suspended else "the namespace is suspended"
            held = (f"{who} by an operator ({why}): not triggered or re-run until "
                    "`reconciler resume`")
            if run is None:
                status(dag_id, State.SUSPENDED, Reason.SUSPENDED, held)
            else:  # it has run: that stays the truth, the suspension holds what is next
                _own_run_status(dag_id, run, status, f"; {held}")
            outcome[dag_id] = _Outcome(_HELD, run, "suspended", (dag_id,))
            continue

        entry = ledger.get((cycle, dag_id))
        if entry is None and not pipeline.backfill and since is not None:
            first = since.get(dag_id)
            if first is not None and first > opened_at:
                status(dag_id, State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED,
                       f"added to the graph at {iso(first)}, after this cycle opened at "
                       f"{iso(opened_at)} (backfill: false)", run)
                outcome[dag_id] = _NOT_SCHEDULED
                continue

        # Where do the upstreams stand? Nearly always all satisfied: that walk builds only
        # the fingerprint; the notes of a wait or a block are built when there is one.
        all_done = pipeline.trigger_rule == "all_done"
        inputs: list[DagRun] = []
        items: list[FingerprintItem] = []
        for up in ups:
            o = outcome.get(up, _NOT_IN_GRAPH)
            kind = o.kind
            if kind == _OK or (kind == _FAILED and all_done):
                inputs.append(o.run)  # type: ignore[arg-type]  # ok/failed carry a run
                items.append(o.item)  # type: ignore[arg-type]
            else:
                outcome[dag_id] = _unsatisfied(dag_id, run, ups, all_done, entry, outcome,
                                               status)
                break
        else:
            outcome[dag_id] = _satisfied(
                dag_id=dag_id, cycle=cycle, run=run, entry=entry, pipeline=pipeline,
                inputs=inputs, items=items, outcome=outcome, deterministic=deterministic,
                commit=commit, actions=actions, status=status, eager=eager,
                triggered=triggered, placed=placed.get(dag_id))


def _unsatisfied(dag_id: str, run: DagRun | None, ups: tuple[str, ...], all_done: bool,
                 entry: LedgerEntry | None, outcome: Mapping[str, _Outcome],
                 status: _StatusFn) -> _Outcome:
    """Some upstream is not done: blocked (a failure above) or waiting; the status says
    which upstreams and why."""
    waiting: list[str] = []
    notes: list[str] = []
    blocked: list[str] = []
    blocked_notes: list[str] = []
    causes: set[str] = set()
    suspensions: set[str] = set()
    absent = held = 0
    for up in ups:
        o = outcome.get(up, _NOT_IN_GRAPH)
        kind = o.kind
        if kind == _OK or (kind == _FAILED and all_done):
            continue
        if kind == _FAILED:
            blocked.append(up)
            blocked_notes.append(f"failed {up}")
            causes.add(up)
        elif kind == _BLOCKED:
            blocked.append(up)
            blocked_notes.append(f"{up} (blocked by {_failed_list(o.causes)})")
            causes.update(o.causes)
        else:
            waiting.append(up)
            notes.append(f"{up} ({o.note})")
            absent += kind == _ABSENT
            if kind == _HELD:
                held += 1
                suspensions.update(o.causes)

    if blocked:
        turned = [i.upstream for i in (entry.fingerprint if entry else ())
                  if i.upstream in blocked and i.end_date.startswith(EAGER)]
        status(dag_id, State.BLOCKED, Reason.BLOCKED_BY,
               "blocked by " + ", ".join(blocked_notes)
               + (f"; also waiting for {', '.join(notes)}" if notes else "")
               + (f"; its run started on an eager success of {', '.join(turned)}, "
                  "whose run then ended failed" if turned else ""),
               run, waiting_for=tuple(waiting), blocked_by=tuple(blocked))
        return _Outcome(_BLOCKED, None, "blocked", tuple(sorted(causes)))
    if held and held == len(waiting):
        # Held by a suspension above, and by nothing else: its own run (if any) is shown
        # as it is; nothing is triggered or re-run until `reconciler resume`.
        names = ", ".join(sorted(suspensions))
        if run is None:
            status(dag_id, State.WAITING, Reason.WAITING_FOR,
                   "waiting for " + ", ".join(notes), waiting_for=tuple(waiting))
        else:
            _own_run_status(dag_id, run, status, f"; held while {names} "
                            f"{'is' if len(suspensions) == 1 else 'are'} suspended: not "
                            "re-run until `reconciler resume`")
        return _Outcome(_HELD, run, f"held: {names} suspended", tuple(sorted(suspensions)))
    if absent == len(ups):
        status(dag_id, State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED,
               "no upstream has a run in this cycle: " + ", ".join(notes), run,
               waiting_for=tuple(waiting))
        return _UPSTREAMS_ABSENT
    status(dag_id, State.WAITING, Reason.WAITING_FOR,
           "waiting for " + ", ".join(notes), run, waiting_for=tuple(waiting))
    return _WAITING


def _satisfied(*, dag_id: str, cycle: datetime, run: DagRun | None,
               entry: LedgerEntry | None, pipeline: Pipeline, inputs: list[DagRun],
               items: list[FingerprintItem], outcome: Mapping[str, _Outcome],
               deterministic: str, commit: str, actions: list[Action], status: _StatusFn,
               eager: bool, triggered: _TriggeredOn, placed: str | None = None) -> _Outcome:
    """Every upstream is done: the table of DESIGN section 5."""
    all_done = pipeline.trigger_rule == "all_done"
    fingerprint = Fingerprint.presorted(items)  # `ups` is sorted

    if run is None and entry is not None and entry.confirmed and placed is not None \
            and entry.deployment is not None and entry.deployment != placed:
        # Moved since it ran: its run is in the deployment it left, which cannot be
        # seen now (down, or the run deleted there). Never a second run in the new one.
        status(dag_id, State.DONE, Reason.DONE,
               f"ran as {entry.run_id} in deployment {entry.deployment} before it moved "
               f"to {placed}; that run cannot be seen now: not run again")
        return _Outcome(_ABSENT, None, f"ran in deployment {entry.deployment}")
    if run is None:
        earlier = triggered.elsewhere(dag_id, items, cycle) if entry is None else None
        if earlier is not None:
            status(dag_id, State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED,
                   f"already started as {earlier[1]} in cycle {iso(earlier[0])} on these "
                   "same upstream runs (an upstream run's logical date changed in "
                   "Airflow): not triggered again")
            return _Outcome(_ABSENT, None, f"started in cycle {iso(earlier[0])}")
        if entry is None:
            eager_ups = [i.upstream for i in items if i.end_date.startswith(EAGER)]
            eager_note = (f" (eager: every task of {', '.join(eager_ups)} is done)"
                          if eager_ups else "")
            why = "all upstreams " + ("done" if all_done else "succeeded") + eager_note
        else:
            why = (f"the ledger has {entry.action} ({entry.state}) of {entry.run_id} "
                   "but Airflow has no run for this cycle: triggering again")
        actions.append(Action(
            kind=ActionKind.TRIGGER, dag_id=dag_id, cycle=cycle, run_id=deterministic,
            fingerprint=fingerprint, reason=why, commit=commit,
            conf=_conf(pipeline.conf, commit, cycle, fingerprint)))
        status(dag_id, State.TRIGGERING, Reason.TRIGGERING,
               f"triggering {deterministic}: {why}")
        return _TRIGGER_PLANNED

    if entry is not None and entry.state is LedgerState.DONE and entry.run_id == run.run_id:
        # Confirmed: the ledger vouches for this run.
        changed = entry.fingerprint.changed(fingerprint)
        closed = _closed_after_eager(entry.fingerprint, changed, outcome) if changed else ()
        if closed and len(closed) == len(changed):
            # The eager path's upstream run has ended, as the same execution: record
            # its end date, nothing to re-run.
            actions.append(_adopt(dag_id, cycle, run, fingerprint,
                                  f"{', '.join(closed)} ended after the eager trigger "
                                  "(the same run): recording its end date", commit))
            changed = ()
        how = " (triggered on the eager path)" if entry.decided == "eager" else ""
        if not run.finished:
            later = (f"; {', '.join(changed)} re-ran meanwhile: it will be re-run when "
                     "it ends") if changed else ""
            _own_run_status(dag_id, run, status, how + later)
            return _done(run, eager) if not changed else _Outcome(_PENDING, run, run.state)
        if changed and _ran_since(run, changed, inputs):
            # Someone (a user in the UI) re-ran it after those upstreams ended again: it
            # already ran on these upstream executions; a clear would run it once more.
            why = (f"{', '.join(changed)} re-ran, and run {run.run_id} was re-run after "
                   "that: recording the new upstream runs")
            actions.append(_adopt(dag_id, cycle, run, fingerprint, why, commit))
            _own_run_status(dag_id, run, status, "", reason=Reason.ADOPTING, text=why)
            return _finished(run)
        if changed:
            why = f"{', '.join(changed)} re-ran since run {run.run_id} was started"
            actions.append(_clear(dag_id, cycle, run, fingerprint, why, commit))
            status(dag_id, State.RERUNNING, Reason.RERUNNING, f"re-running: {why}", run)
            return _RERUN_PLANNED
        _own_run_status(dag_id, run, status, how)
        return _finished(run)

    # A run the ledger does not vouch for: a manual run, a lost ledger, or the
    # trace of a crash or failed call. The run's own timestamps decide.
    if entry is None:
        origin = "not in the ledger"
    elif entry.run_id != run.run_id:
        origin = f"the ledger records {entry.run_id} instead"
    else:
        origin = f"the ledger's {entry.action} is unconfirmed ({entry.state})"
        if _took_effect(entry, run) and _same_inputs(entry.fingerprint, fingerprint, outcome):
            # Our own call whose answer was lost, on the upstream executions it was decided
            # on. Timestamps would mislead after an eager decision: the upstream run closes
            # after this run started, and a clear would run it twice.
            why = (f"adopting {run.run_id} ({origin}): the {entry.action} took effect, on "
                   "the same upstream runs")
            actions.append(_adopt(dag_id, cycle, run, fingerprint, why, commit))
            _own_run_status(dag_id, run, status, "", reason=Reason.ADOPTING, text=why)
            return _finished(run) if run.finished else _Outcome(_PENDING, run, run.state)
    ends = [e for e in (r.end_date or r.tasks_done_at for r in inputs) if e is not None]
    latest_end = max(ends) if ends else None
    started = run.start_date
    if not run.finished:
        if started is None or latest_end is None or started > latest_end:
            why = (f"adopting {run.run_id} ({origin}): it "
                   + ("has not started yet" if started is None
                      else "started after all upstreams ended"))
            actions.append(_adopt(dag_id, cycle, run, fingerprint, why, commit))
            _own_run_status(dag_id, run, status, "", reason=Reason.ADOPTING, text=why)
        else:
            _own_run_status(dag_id, run, status,
                            f"; it started before its upstreams ended ({origin}): "
                            "it will be re-run when it ends")
        return _Outcome(_PENDING, run, run.state)
    started = started or run.queued_at
    if started is not None and (latest_end is None or started > latest_end):
        why = f"adopting {run.run_id} ({origin}): it started after all upstreams ended"
        actions.append(_adopt(dag_id, cycle, run, fingerprint, why, commit))
        _own_run_status(dag_id, run, status, "", reason=Reason.ADOPTING, text=why)
        return _finished(run)
    why = (f"run {run.run_id} ({origin}) started before its upstreams ended"
           if started is not None else
           f"run {run.run_id} ({origin}) has no start date to vouch for it")
    actions.append(_clear(dag_id, cycle, run, fingerprint, why, commit))
    status(dag_id, State.RERUNNING, Reason.RERUNNING, f"re-running: {why}", run)
    return _RERUN_PLANNED


def _root(dag_id: str, run: DagRun | None, status: _StatusFn, eager: bool) -> _Outcome:
    if run is None:
        status(dag_id, State.NOT_IN_CYCLE, Reason.NOT_SCHEDULED,
               "root without a run for this cycle (Airflow schedules roots)")
        return _NO_RUN
    _own_run_status(dag_id, run, status, "")
    return _done(run, eager)


def _done(run: DagRun, eager: bool) -> _Outcome:
    """A pipeline's own run as its downstreams see it: finished, or (eager) running with
    every task done, or still pending."""
    if run.finished:
        return _finished(run)
    if eager and run.state == RUNNING and run.tasks_done_at is not None:
        return _Outcome(_OK, run, item=eager_item(run))
    return _Outcome(_PENDING, run, run.state)


def _took_effect(entry: LedgerEntry, run: DagRun) -> bool:
    """Whether the unconfirmed call of `entry` made `run` what it is: a trigger made the
    run (its id is ours); a clear restarted it (queued or running again, or ended at
    another time than the end it cleared); an adopt calls nothing, its intent is the
    decision itself (a leader killed before confirming it: the next one must not take
    the run for a stranger's and clear an eager run that started before its upstream
    closed)."""
    if entry.action in (ActionKind.TRIGGER, ActionKind.ADOPT):
        return True
    if entry.action is ActionKind.CLEAR and entry.cleared_end is not None:
        return not run.finished or run.end_date != entry.cleared_end
    return False


def _same_inputs(recorded: Fingerprint, current: Fingerprint,
                 outcome: Mapping[str, _Outcome]) -> bool:
    """The upstream runs are the executions `recorded` was decided on (an eager item's
    run has since closed, as the same execution)."""
    changed = recorded.changed(current)
    return len(_closed_after_eager(recorded, changed, outcome)) == len(changed)


def _closed_after_eager(recorded: Fingerprint, changed: tuple[str, ...],
                        outcome: Mapping[str, _Outcome]) -> tuple[str, ...]:
    """Of the `changed` upstreams, those recorded on the eager path whose run has since
    ended as the same execution (same run id and start): not a re-run of their data."""
    by_upstream = {i.upstream: i for i in recorded}
    same = []
    for up in changed:
        item = by_upstream[up]
        o = outcome.get(up)
        if (o is not None and o.run is not None and item.end_date.startswith(EAGER)
                and o.run.run_id == item.run_id and o.kind in (_OK, _FAILED)
                and item.end_date == EAGER + execution_start(o.run)):
            same.append(up)
    return tuple(same)


def _finished(run: DagRun) -> _Outcome:
    return _Outcome(_OK if run.state == SUCCESS else _FAILED, run, "", (), fingerprint_item(run))


def _own_run_status(dag_id: str, run: DagRun, status: _StatusFn, suffix: str, *,
                    reason: Reason | None = None, text: str = "") -> None:
    """Status from the pipeline's own run: done, failed, queued or running."""
    if run.state == SUCCESS:
        state, default = State.DONE, Reason.DONE
    elif run.state == FAILED:
        state, default = State.FAILED, Reason.FAILED
    elif run.state == QUEUED:
        state, default = State.QUEUED, Reason.QUEUED
    else:
        state, default = State.RUNNING, Reason.RUNNING
    status(dag_id, state, reason or default, (text or f"run {run.run_id} is {run.state}")
           + suffix, run)


def _failed_list(causes: tuple[str, ...]) -> str:
    return "failed " + ", ".join(causes)


def _ran_since(run: DagRun, changed: Sequence[str], inputs: Sequence[DagRun]) -> bool:
    """Whether the current execution of `run` started after every `changed` upstream's
    run ended (its end, or on the eager path its last task's end): the same rule as for
    adopting a run the ledger does not vouch for."""
    started = run.start_date
    if started is None:
        return False
    ends = {r.dag_id: r.end_date or r.tasks_done_at for r in inputs}
    return all((end := ends.get(up)) is not None and started > end for up in changed)


def _clear(dag_id: str, cycle: datetime, run: DagRun, fingerprint: Fingerprint, why: str,
           commit: str) -> Action:
    return Action(kind=ActionKind.CLEAR, dag_id=dag_id, cycle=cycle, run_id=run.run_id,
                  fingerprint=fingerprint, reason=why, commit=commit,
                  cleared_end=run.end_date)


def _adopt(dag_id: str, cycle: datetime, run: DagRun, fingerprint: Fingerprint, why: str,
           commit: str) -> Action:
    return Action(kind=ActionKind.ADOPT, dag_id=dag_id, cycle=cycle, run_id=run.run_id,
                  fingerprint=fingerprint, reason=why, commit=commit)


def _conf(conf: Mapping[str, Any], commit: str, cycle: datetime,
          fingerprint: Fingerprint) -> dict[str, Any]:
    """The pipeline's conf plus the provenance of this run (which wins on a key clash)."""
    provenance = {
        "commit": commit,
        "cycle": iso(cycle),
        "upstreams": [{"dag_id": u, "run_id": r, "end_date": e} for u, r, e in fingerprint],
    }
    return {**conf, "reconciler": provenance}


_HELD_STATES = frozenset({State.TRIGGERING, State.RERUNNING, State.WAITING, State.QUEUED,
                   State.RUNNING, State.BLOCKED})
"""States a deployment that cannot be reached may be holding: what has ended stays as
the last look showed it."""


def hold_back(result: Plan, unreachable: Mapping[str, str],
              deployment_of: Callable[[str], str]) -> Plan:
    """The plan without the actions on pipelines of deployments that cannot be reached
    (their runs are as last seen; a call would only wait out its deadline), each such
    pipeline's status saying so, and a downstream waiting on one saying which deployment
    it waits for. Nothing else changes: the next pass plans again from what is seen."""
    if not unreachable:
        return result
    held = {name for name in {s.dag_id for s in result.statuses}
            if deployment_of(name) in unreachable}
    if not held:
        return result
    actions = tuple(a for a in result.actions if a.dag_id not in held)
    statuses: list[PipelineStatus] = []
    for st in result.statuses:
        if st.dag_id in held and st.state in _HELD_STATES:
            deployment = deployment_of(st.dag_id)
            why = unreachable[deployment].removeprefix(f"deployment {deployment}: ")
            was = st.message if st.state not in (State.TRIGGERING, State.RERUNNING) else (
                f"then: {st.message}")
            state = State.WAITING if st.state in (State.TRIGGERING, State.RERUNNING) \
                else st.state
            reason = Reason.WAITING_FOR if state is State.WAITING else st.reason
            st = PipelineStatus(st.dag_id, st.cycle, state, reason,
                                f"deployment {deployment} unreachable ({why}); "
                                f"{was}", st.run_id, st.waiting_for, st.blocked_by, st.commit)
        elif st.state is State.WAITING and any(w in held for w in st.waiting_for):
            where = sorted({deployment_of(w) for w in st.waiting_for if w in held})
            st = PipelineStatus(st.dag_id, st.cycle, st.state, st.reason,
                                f"{st.message} (deployment {', '.join(where)} unreachable)",
                                st.run_id, st.waiting_for, st.blocked_by, st.commit)
        statuses.append(st)
    return Plan(actions, tuple(statuses), result.cycles)


def hold_moved(result: Plan, ledger: Mapping[tuple[datetime, str], LedgerEntry],
               unreadable: Mapping[str, str], deployment_of: Callable[[str], str]) -> Plan:
    """The plan without the triggers of pipelines whose ledger entry for that cycle is in
    a deployment they left that cannot be read now (`unreadable`: deployment -> why).
    The plan triggers where the pipeline runs now because it sees no run; but a run of
    that cycle may be in the deployment left, unseen (a clear sent there, a trigger whose
    answer was lost): a second run in another Airflow is not idempotent. The trigger
    waits until the deployment left answers; its listing then shows the run, or shows
    there is none. (A confirmed entry is never triggered again: `_satisfied`.)"""
    if not unreadable or not result.actions:
        return result
    held: dict[tuple[datetime, str], tuple[LedgerEntry, str]] = {}
    for a in result.actions:
        if a.kind is not ActionKind.TRIGGER:
            continue
        entry = ledger.get((a.cycle, a.dag_id))
        if entry is not None and entry.deployment is not None \
                and entry.deployment in unreadable \
                and entry.deployment != deployment_of(a.dag_id):
            held[(a.cycle, a.dag_id)] = (entry, deployment_of(a.dag_id))
    if not held:
        return result
    actions = tuple(a for a in result.actions if (a.cycle, a.dag_id) not in held)
    statuses: list[PipelineStatus] = []
    for st in result.statuses:
        found = held.get((st.cycle, st.dag_id))
        if found is not None and st.state is State.TRIGGERING:
            entry, now_in = found
            left = entry.deployment
            assert left is not None
            why = unreadable[left].removeprefix(f"deployment {left}: ")
            st = PipelineStatus(
                st.dag_id, st.cycle, State.WAITING, Reason.WAITING_FOR,
                f"its {entry.action.value} of {entry.run_id} ({entry.state.value}) was "
                f"sent to deployment {left}, which it has left since and which cannot be "
                f"read now ({why}): a run of this cycle may be there, so it is not "
                f"triggered in {now_in} until {left} answers",
                st.run_id, st.waiting_for, st.blocked_by, st.commit)
        statuses.append(st)
    return Plan(actions, tuple(statuses), result.cycles)
