"""The invariant checker: Airflow's whole history against what the reconciler promises.

Replayed in order, each write of the reconciler is judged at the moment it reached
Airflow (with the graph then synced, and the one before: a replica may act on the
previous graph for one pass):

- `action-without-lease`: the leader key named someone else when the request was sent;
- `root-touched`: a root was triggered or cleared (Airflow schedules roots);
- `premature-trigger` / `premature-clear`: an upstream of this cycle had never finished,
  or was running again;
- `clear-of-unfinished-run`: a clear reset a run that was queued or running (a repeated
  clear: the run had already restarted);
- `unneeded-clear`: a clear of a run whose execution started after every upstream's
  last end: it already ran on these upstream executions (a second one on the same).

With several deployments (a pipeline's runs are keyed by (deployment, dag_id, run_id),
its cycles by (dag_id, cycle) across deployments):

- `run-in-two-deployments`: a pipeline's cycle was created in a second deployment (the
  same pipeline and cycle ran, or would run, twice: not exactly once);
- `wrong-deployment`: a trigger sent to a deployment the pipeline does not run in by the
  graph of the moment (nor by the one before, while a replica may still act on it);
- the order checks above look for an upstream's run in whichever deployment it ran.

Once the faults have healed and the quiet steps ran, the end state (`check_final`):

- `never-triggered`: a pipeline due in a cycle (enabled, not suspended, every upstream
  satisfied by its trigger rule, not excluded by `backfill: false`) has no run;
- `stale-downstream`: its run's last execution started before the last end of an
  upstream it was started on (a re-run that never came; an upstream added to it later
  does not count, as core/plan.py decides). The end is the upstream's last task's end,
  also for a user's re-run: one started after it ran on the upstream's final data;
- `unfinished`: a run still queued or running after the quiet steps.

Injected duplicate deliveries (the network's doing) are not held against the reconciler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from reconciler.core.state import run_id_for
from tests.sim.workload import Version, Workload
from tests.sim.world import Event, World

GRAPH_LAG_STEPS = 2
"""Steps after a sync during which a replica may still plan with the graph before it."""


@dataclass
class _Run:
    dag_id: str
    run_id: str
    logical_date: datetime | None
    state: str = "queued"
    start: datetime | None = None
    """When its current execution started (None: queued)."""
    end: datetime | None = None
    tasks_done: datetime | None = None
    """Every task of the current execution succeeded (the eager path), at that time."""
    queued: datetime | None = None
    """When its current execution was asked for (created, or cleared)."""
    by_user: bool = False
    """The current execution was started by a user's clear, not by the reconciler."""
    ended_once: bool = False


@dataclass
class Checker:
    world: World
    workload: Workload
    runs: dict[tuple[str, str, str], _Run] = field(default_factory=dict)
    """(deployment, dag_id, run_id) -> the run."""
    by_cycle: dict[tuple[str, datetime], tuple[str, str]] = field(default_factory=dict)
    """(dag_id, cycle) -> (deployment, run_id) of its run (the first, if two)."""
    started_on: dict[tuple[str, datetime], dict[str, datetime | None]] = field(
        default_factory=dict)
    """(dag, cycle) -> upstream end dates when the reconciler last started it."""

    def violation(self, kind: str, event: Event, why: str) -> None:
        where = f"{event.deployment}:" if event.deployment else ""
        self.world.violation(kind, f"step {event.step}: {event.kind} {where}{event.dag_id} "
                                   f"{event.run_id} by {event.by}: {why}")

    # --- the graph at a step ------------------------------------------------------------

    def _versions(self, step: int) -> list[Version]:
        """The graph synced at `step`, and the one before while a replica may still act
        on it (the pass of the step its watches were told and the next: a watch read
        that failed is read again on the next pass). Not the one before for ever: an
        upstream added long before a cycle opened counts for it."""
        versions = [v for v in self.workload.versions if v.step <= step]
        if len(versions) >= 2 and step > versions[-1].announced + GRAPH_LAG_STEPS:
            return versions[-1:]
        return versions[-2:] if versions else []

    def _ups_both(self, dag_id: str, step: int) -> set[str]:
        sets = []
        for v in self._versions(step):
            p = v.graph.pipelines.get(dag_id)
            sets.append(set(p.depends_on) if p is not None else set())
        return set.intersection(*sets) if sets else set()

    def _upstream_run(self, up: str, cycle: datetime | None) -> _Run | None:
        if cycle is None:
            return None
        found = self.by_cycle.get((up, cycle))
        return self.runs.get((found[0], up, found[1])) if found is not None else None

    # --- the replay ---------------------------------------------------------------------

    def replay(self) -> None:
        for event in self.world.events:
            key = (event.deployment, event.dag_id, event.run_id)
            if event.kind in ("root", "create"):
                if event.kind == "create" and not event.duplicate:
                    self._judge(event, "trigger")
                if key not in self.runs:
                    self.runs[key] = _Run(event.dag_id, event.run_id, event.logical_date,
                                          queued=event.at)
                    if event.logical_date is not None:
                        cycle = (event.dag_id, event.logical_date)
                        other = self.by_cycle.setdefault(cycle, (event.deployment,
                                                                 event.run_id))
                        if other[0] != event.deployment:
                            self.violation("run-in-two-deployments", event,
                                           f"its cycle {event.logical_date.isoformat()} "
                                           f"was created in {other[0]} already "
                                           f"({other[1]})")
            elif event.kind == "start":
                started = self.runs[key]
                started.state, started.start, started.tasks_done = "running", event.at, None
            elif event.kind == "tasks-done":
                done = self.runs[key]
                done.tasks_done, done.ended_once = event.at, True
            elif event.kind == "end":
                ended = self.runs[key]
                ended.state, ended.end, ended.ended_once = event.state, event.at, True
            elif event.kind in ("clear", "user-clear"):
                if event.kind == "clear" and not event.duplicate:
                    self._judge(event, "clear")
                cleared = self.runs.get(key)
                if cleared is not None:
                    cleared.by_user = event.kind == "user-clear"
                    cleared.queued = event.at
                    if cleared.state != "running":
                        cleared.state, cleared.start = "queued", None
                    cleared.end = cleared.tasks_done = None

    def _judge(self, event: Event, action: str) -> None:
        if event.leader is not None and event.leader != event.by:
            self.violation("action-without-lease", event,
                           f"the leader key named {event.leader or 'nobody'}")
        if event.dag_id in self.workload.roots:
            self.violation("root-touched", event, "roots are Airflow's to schedule")
            return
        if action == "trigger" and self.workload.placement:
            versions = self._versions(event.step)
            homes = {v.graph.deployment_of(event.dag_id) for v in versions
                     if event.dag_id in v.graph.pipelines}
            if homes and event.deployment not in homes:
                self.violation("wrong-deployment", event,
                               f"it runs in {'/'.join(sorted(homes))} (its sender planned "
                               f"with commit {event.commit or '-'}; the graph then: "
                               f"{', '.join(v.commit[:12] for v in versions)})")
        cycle = event.logical_date
        for up in sorted(self._ups_both(event.dag_id, event.step)):
            run = self._upstream_run(up, cycle)
            if run is None or not run.ended_once:
                self.violation(f"premature-{action}", event, f"upstream {up} never finished "
                                                             "in this cycle")
            elif action == "clear" and run.state in ("queued", "running") \
                    and run.tasks_done is None:
                self.violation("premature-clear", event, f"upstream {up} is {run.state}")
        if action == "clear":
            if event.state in ("queued", "running"):
                self.violation("clear-of-unfinished-run", event,
                               f"the run was {event.state}: it had already restarted")
            own = self._upstream_run(event.dag_id, cycle)
            # A user's re-run that started while an upstream's tasks were done but its
            # run not closed yet is a race the loop cannot see through: it is judged by
            # the closing end. The loop's own (eager) start, by the last task's end.
            # So is a run queued before the upstream's tasks were done (the loop asked
            # for it on the upstream's previous execution): when the scheduler starts it
            # while the upstream closes, only the closing end tells the loop the order.
            user = own is not None and own.by_user
            ends = [self._end_of(u, cycle, closed=user or self._queued_before_done(
                        own, u, cycle))
                    for u in self._ups_both(event.dag_id, event.step)]
            if own is not None and own.start is not None and ends and all(
                    e is not None and e < own.start for e in ends):
                self.violation("unneeded-clear", event,
                               f"its run started at {own.start.isoformat()}, after every "
                               "upstream's last end: it already ran on these upstream "
                               "executions")
        if cycle is not None:
            # Upstreams it had in both graphs of the moment: one added later does not
            # re-run an open cycle (core/plan.py), so it is not held against it.
            self.started_on[(event.dag_id, cycle)] = {
                u: self._end_of(u, cycle) for u in self._ups_both(event.dag_id, event.step)}

    def _queued_before_done(self, own: _Run | None, up: str,
                            cycle: datetime | None) -> bool:
        run = self._upstream_run(up, cycle)
        return (own is not None and own.queued is not None and run is not None
                and run.tasks_done is not None and own.queued < run.tasks_done)

    def _end_of(self, up: str, cycle: datetime | None, *,
                closed: bool = False) -> datetime | None:
        """When the upstream's current execution ended: its last task's end when the
        eager path could see it done before the scheduler closed the run (`closed`: the
        run's own end only)."""
        run = self._upstream_run(up, cycle)
        if run is None:
            return None
        return run.end if closed else (run.tasks_done or run.end)

    # --- the end state ------------------------------------------------------------------

    def check_final(self) -> None:
        world, workload = self.world, self.workload
        if not workload.versions:
            return
        final = workload.versions[-1]
        graph, since = final.graph, final.since
        everything = "*" in workload.suspended
        every = [r for _, r in world.all_runs()]
        for active in every:
            if active.state in ("queued", "running"):
                world.violation("unfinished", f"{active.dag_id} {active.run_id} is "
                                              f"{active.state}")
        cycles = sorted({r.logical_date for r in every
                         if r.dag_id in workload.roots and r.dag_id in graph.pipelines
                         and r.logical_date is not None})
        for cycle in cycles:
            roots = [r for r in every
                     if r.logical_date == cycle and r.dag_id in workload.roots
                     and r.dag_id in graph.pipelines]
            opened = min(r.queued_at or r.start_date or cycle for r in roots)
            outcome: dict[str, str] = {}
            for dag_id in workload.order:
                p = graph.pipelines.get(dag_id)
                if p is None:
                    continue
                found = world.find_run(dag_id, run_id_for(cycle))
                run = (found[1] if found else None) if p.depends_on else next(
                    (r for r in roots if r.dag_id == dag_id), None)
                if not p.depends_on:
                    outcome[dag_id] = "absent" if run is None else _state(run.state)
                    continue
                if not p.enabled or everything or dag_id in workload.suspended:
                    outcome[dag_id] = "pending"
                    continue
                first = since.get(dag_id)
                if (not p.backfill and first is not None and first > opened
                        and (dag_id, cycle) not in self.started_on):
                    outcome[dag_id] = "absent"
                    continue
                ups = [outcome.get(u, "absent") for u in p.depends_on]
                if all(u == "absent" for u in ups):
                    outcome[dag_id] = "absent"
                    continue
                if any(u in ("absent", "pending") for u in ups):
                    outcome[dag_id] = "pending"
                    continue
                if "blocked" in ups or (p.trigger_rule == "all_success" and "failed" in ups):
                    outcome[dag_id] = "blocked"
                    continue
                # Due: it must have run on its upstreams' last executions.
                where = f"{dag_id} in cycle {cycle.isoformat()}"
                if run is None:
                    world.violation("never-triggered", f"{where}: due, no run")
                    outcome[dag_id] = "pending"
                    continue
                outcome[dag_id] = _state(run.state)
                before = self.started_on.get((dag_id, cycle))
                if before is None:
                    continue
                # By the upstream's last task's end, a user's re-run too: one that started
                # after every task of the upstream's execution had ended ran on its final
                # data, whether the loop saw that (eager) or cleared it again on the
                # closing end (allowed: `unneeded-clear` judges a user's run by that).
                ends = {u: self._end_of(u, cycle) for u in p.depends_on if u in before}
                newer = [u for u, e in ends.items() if e is not None and run.start_date
                         is not None and e > run.start_date]
                if newer:
                    world.violation("stale-downstream",
                                    f"{where}: its run started at "
                                    f"{run.start_date.isoformat() if run.start_date else '-'}"
                                    f" but {', '.join(newer)} ended after that "
                                    f"({_fmt(ends)}): a re-run never came")


def _state(state: str) -> str:
    return {"success": "ok", "failed": "failed"}.get(state, "pending")


def _fmt(ends: dict[str, datetime | None]) -> str:
    return ", ".join(f"{u}@{e.isoformat() if e else '-'}" for u, e in sorted(ends.items()))
