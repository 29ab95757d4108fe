"""One reconcile pass, composed of the roles: observe -> plan -> act -> record.

`Reconciler` holds the roles and nothing else of substance:

- `Leadership` (leadership.py) keeps the lease on its own thread; a pass only asks it.
- `Observer` (observer.py) returns an `Observation` value: graph, runs, ledger, now.
- `plan()` (core/plan.py) decides, purely. A quiet pass reuses the last plan: with the
  same graph, runs and ledger only the window's lower edge could change it.
- `Executor` (executor.py) applies the actions concurrently and returns `Outcome`s,
  writing the intents and results through the one `Ledger` (ledger.py) the observer
  reads: etcd and the loop's memory of it never disagree.
- `Recorder` (recorder.py) mirrors the statuses into etcd, only what changed.

A relisting pass (the first of a term, then every relist_interval) rebuilds the big
long-lived heap; it runs with the cyclic GC paused and ends by freezing that heap out of
the collector's reach (`building_heap`), so later passes do not rescan it.

A pass never sleeps and never retries: it raises, and the runner (runner.py) decides
when the next pass runs. Only the leader observes, acts and records; a standby only
campaigns, so it costs Airflow nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.adapters.clock import SystemClock
from reconciler.core.errors import disposition
from reconciler.core.heap import gc_paused
from reconciler.core.plan import hold_back, hold_moved, plan
from reconciler.core.settings import LoopSettings
from reconciler.core.state import Action, Plan
from reconciler.service.executor import Executor, Outcome
from reconciler.service.leadership import Leadership
from reconciler.service.observability import Metrics
from reconciler.service.observer import Observation, Observer
from reconciler.service.ports import AirflowApi, Clock, Store
from reconciler.service.recorder import Recorder


def default_holder_id() -> str:
    """hostname:pid plus a random part: a restarted container has the same hostname and
    pid 1, and must not be mistaken for the replica it replaces."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class PassReport:
    leader: bool = False
    plan: Plan | None = None
    actions: list[Action] = field(default_factory=list)
    """Actions that took effect in this pass."""
    outcomes: list[Outcome] = field(default_factory=list)
    airflow_requests: int = 0
    etcd_writes: int = 0


class Reconciler:
    """One replica: the roles, and `run_pass` to go through them once."""

    def __init__(self, store: Store, api: AirflowApi, settings: LoopSettings, *,
                 holder: str | None = None, clock: Clock | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.api = api
        self.settings = settings
        self.holder = holder or default_holder_id()
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.leadership = Leadership(store, self.holder, settings.lease_ttl, self.clock)
        self.observer = Observer(store, api, settings, self.clock)
        self.observer.leave_behind = True  # a slow deployment must not slow the others
        self._held: tuple[Plan, tuple[Any, ...], Plan] | None = None
        """(plan, what held it back, the plan held back): see held_back."""
        self.ledger = self.observer.ledger
        """The run ledger: the observer reads it, the executor writes it through."""
        self.executor = Executor(self.ledger, api, self.leadership, self.clock,
                                 concurrency=settings.concurrency,
                                 call_deadline=settings.action_deadline,
                                 metrics=self.metrics, interval=settings.interval,
                                 margin=min(1.0, settings.lease_ttl / 6))
        self.recorder = Recorder(store, self.holder, self.metrics)
        self.metrics.leader.set_function(lambda: 1.0 if self.leadership.is_leader() else 0.0)
        self.metrics.clock_skew.set_function(lambda: self.observer.skew or 0.0)
        self.leadership.on_error = self._count_error
        self._term = 0
        self._plan_key: tuple[str, int, int, int] | None = None
        self._plan: Plan | None = None
        self._forgotten_at: float | None = None

    def _count_error(self, exc: BaseException) -> None:
        """An error outside a pass (the leadership thread's), in the errors metric."""
        how = disposition(exc, 1, interval=self.settings.interval)
        self.metrics.errors.labels(how.dependency, how.kind).inc()

    def run_pass(self) -> PassReport:
        report = PassReport()
        requests0, writes0 = self.api.request_count, self.store.writes
        self.leadership.ensure()
        report.leader = self.leadership.is_leader()
        if report.leader:
            self._lead(report)
        report.airflow_requests = self.api.request_count - requests0
        report.etcd_writes = self.store.writes - writes0
        self.metrics.passes.inc()
        self.metrics.airflow_requests.inc(report.airflow_requests)
        self.metrics.etcd_writes.inc(report.etcd_writes)
        return report

    def _lead(self, report: PassReport) -> None:
        if self.leadership.term != self._term:
            # A new term: another leader may have written the ledger and the mirror.
            self._term = self.leadership.term
            self.ledger.reset()
            # The head too: a standby's watch may have missed a sync (etcd cut off, the
            # watch re-made), and a graph from before a move routes to the wrong Airflow.
            self.observer.head_dirty.set()
            self.observer.suspended = None
            self.observer.cache.listed_at = None
            self.recorder.reset()
            self._plan_key = None
            self._forgotten_at = None
        relisting = self.observer.cache.listed_at is None or (
            self.clock.monotonic() - self.observer.cache.listed_at
            >= self.settings.relist_interval)
        with building_heap(relisting):
            self._reconcile(report, relisting)

    def _reconcile(self, report: PassReport, relisting: bool) -> None:
        if self.recorder.mirror is None:
            # First of a term: read what etcd holds before the runs and the plan are
            # built, so its transient dicts are not held beside them (peak memory).
            self.recorder.load()
        seen = self.observer.observe()
        if seen.desired is None:
            return
        self._note_deployments()
        commit = seen.desired.commit
        result = self.held_back(self.plan(seen))
        report.plan = result
        if relisting:
            self._forget_closed(seen, result)
        if result.actions:
            report.outcomes = self.executor.execute(self._placed(result.actions))
            self._apply(report.outcomes)
            report.actions = [o.action for o in report.outcomes if o.took_effect]
            if report.actions:
                # Plan again on what the actions changed, so the recorded status is current.
                seen = self.observer.observe(refresh=False)
                result = report.plan = self.held_back(self.plan(seen))
        self.recorder.record(result, seen.runs)
        self.recorder.heartbeat(seen.now, self.clock.monotonic(), commit,
                                len(result.cycles))

    def plan(self, seen: Observation) -> Plan:
        """plan() on an observation; the last plan when its inputs are unchanged."""
        assert seen.desired is not None
        key = (seen.desired.commit, seen.runs_version, seen.ledger_version,
               seen.suspended_version)
        horizon = seen.now - self.settings.window
        if self._plan is not None and key == self._plan_key and not any(
                c < horizon for c in self._plan.cycles):
            return self._plan
        result = plan(seen.desired.graph, seen.runs.values(), seen.ledger, seen.now,
                      window=self.settings.window, since=seen.desired.since,
                      commit=seen.desired.commit, suspended=seen.suspended,
                      eager=self.settings.eager)
        self._plan_key, self._plan = key, result
        return result

    def _note_deployments(self) -> None:
        if not getattr(self.api, "declares", False):
            return
        names = self.api.deployment_names()  # type: ignore[attr-defined]
        for deployment in names:
            self.metrics.deployment_reachable.labels(deployment).set(
                0 if deployment in self.observer.unreachable else 1)

    def _placed(self, actions: tuple[Action, ...]) -> tuple[Action, ...]:
        """Each action with the deployment its call goes to (recorded in the ledger), when
        the graph declares deployments: where the run was seen, else where the pipeline
        runs now."""
        if not getattr(self.api, "declares", False):
            return actions
        where_run = self.api.where_run  # type: ignore[attr-defined]
        return tuple(replace(a, deployment=where_run(a.dag_id, a.run_id)[0])
                     for a in actions)

    def held_back(self, result: Plan) -> Plan:
        """Several deployments: nothing is asked of one that cannot be reached, and the
        statuses of its pipelines (and of what waits on them) say so. The actions of one
        whose listing is still under way wait for it, silently (its runs are as last
        seen, and a slow deployment's calls would only hold the executor's threads)."""
        where = getattr(self.api, "where", None)
        late, unreachable = self.observer.late, self.observer.unreachable
        unread = self.observer.moved_unread
        if where is None or not (late or unreachable or unread):
            return result
        held = result
        if unreachable or unread:
            inputs = (tuple(sorted(unreachable.items())), tuple(sorted(unread.items())),
                      self.ledger.version)
            if self._held is not None and self._held[0] is result \
                    and self._held[1] == inputs:
                # The same plan held back the same way: the same statuses, so the
                # recorder skips them (not 50,000 compared on every pass while one is down).
                held = self._held[2]
            else:
                def deployment_of(name: str) -> str:
                    return str(where(name)[0])
                # A trigger of a moved pipeline whose last call went to a deployment it
                # left, which cannot be read now, waits (the run may be there).
                held = hold_moved(result, self.ledger.entries(),
                                  {**unread, **unreachable}, deployment_of)
                if unreachable:
                    held = hold_back(held, unreachable, deployment_of)
                self._held = (result, inputs, held)
        if late:  # the statuses stay the same object (the recorder sees no change)
            held = replace(held, actions=tuple(
                a for a in held.actions if where(a.dag_id)[0] not in late))
        return held

    def _apply(self, outcomes: list[Outcome]) -> None:
        # The ledger needs nothing here: the executor wrote it through (ledger.py).
        for outcome in outcomes:
            if outcome.run is not None:
                self.observer.cache.put(outcome.run)

    def _forget_closed(self, seen: Observation, result: Plan) -> None:
        horizon = seen.now - self.settings.window
        closed = self.recorder.forget_closed(result.cycles, {c for c, _ in seen.ledger},
                                             horizon)
        self.ledger.forget(closed)
        self.observer.cache.prune(horizon, result.cycles)

    def close(self) -> None:
        self.observer.close()
        self.executor.close()


@contextlib.contextmanager
def building_heap(active: bool) -> Iterator[None]:
    """A relisting pass builds the long-lived heap anew: the runs, the ledger and the
    mirror, millions of objects at 50,000 pipelines. The cyclic GC is paused meanwhile
    (each of its full collections would rescan the growing heap); once the pass is done
    the heap is collected once and frozen (settle_heap)."""
    if not active:
        yield
        return
    with gc_paused():
        yield
    settle_heap()


def settle_heap() -> None:
    """Collect once, then freeze what is left (the runs, the ledger, the mirror: millions
    of objects at 50,000 pipelines) out of the cyclic GC's reach, so its collections stop
    rescanning them pass after pass. What is frozen is acyclic values, freed by reference
    counting as usual when the next relist replaces them; nothing is thawed (gc.unfreeze
    would thaw what others froze too, and cost a scan of everything)."""
    gc.collect()
    gc.freeze()
