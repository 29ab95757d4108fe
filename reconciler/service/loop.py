"""The reconcile loop (DESIGN section 6): observe -> plan -> act -> record, once per pass.

A pass never sleeps; `run_forever` decides when the next one runs (an etcd watch wakes it
early, else every --interval, with capped exponential backoff and jitter while a
dependency is down). Only the holder of the leader lease acts; every ledger write is a
transaction that compares the leader key (fencing), and the intent is written before the
Airflow call, the result after it. A quiet pass costs one Airflow request (the
incremental list) and no etcd write: the ledger and the observed mirror are cached in
memory and written only when they change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from reconciler.adapters.store import EtcdStore, StoreConflict, StoreError
from reconciler.core.graph import Graph
from reconciler.core.plan import plan
from reconciler.core.settings import LoopSettings
from reconciler.core.state import (
    Action,
    ActionKind,
    DagRun,
    LedgerEntry,
    LedgerState,
    PipelineStatus,
    Plan,
    iso,
    parse_time,
)
from reconciler.service.observability import Health, Metrics, event

# An incremental list asks for runs updated since the watermark minus this overlap, so a
# run updated in the same instant as the previous answer is never missed.
WATERMARK_OVERLAP = timedelta(seconds=2)
MAX_BACKOFF = 60.0
# Test-only failpoint (as etcd's gofail): "after-intent:<kind>:<dag_id>" makes the process
# kill itself between recording an intent and calling Airflow. Unset in production.
FAILPOINT = os.environ.get("RECONCILER_FAILPOINT", "")


class AirflowApi(Protocol):
    request_count: int

    def list_runs(self, *, dag_ids: Iterable[str] | None = None,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None) -> list[dict[str, Any]]: ...

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]: ...

    def clear(self, dag_id: str, run_id: str) -> Any: ...


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def default_holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def classify(exc: BaseException) -> tuple[str, str]:
    """(dependency, kind) of an error: the one place that says what happens next.

    kind "transient" = retry with backoff; "human" = needs someone (bad credentials, a
    DAG missing in Airflow), retried slowly; "lost-leadership" = stop acting now.
    """
    from reconciler.adapters import airflow as af

    if isinstance(exc, StoreConflict):
        return "etcd", "lost-leadership"
    if isinstance(exc, StoreError):
        return "etcd", "transient"
    if isinstance(exc, af.AirflowAuthError):
        return "airflow", "human"
    if isinstance(exc, af.AirflowUnavailable):
        return "airflow", "transient"
    if isinstance(exc, af.AirflowError):
        return "airflow", "human"
    return "internal", "transient"


class RunCache:
    """The informer: the runs of the graph's DAGs inside the window, kept up to date by
    one incremental request per pass and a periodic full relist."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], DagRun] = {}
        self.watermark: datetime | None = None
        self.listed_at: float | None = None
        self.version = 0
        """Bumped on every change of `runs`: an unchanged version means the same runs."""

    def relist(self, api: AirflowApi, dag_ids: set[str], since: datetime, mono: float,
               now: datetime) -> None:
        raw = api.list_runs(dag_ids=sorted(dag_ids), logical_date_gte=since)
        self.runs = {}
        self.version += 1
        self._absorb(raw, dag_ids, now)
        self.listed_at = mono

    def refresh(self, api: AirflowApi, dag_ids: set[str], now: datetime) -> int:
        """One request: the runs updated since the watermark. Returns how many changed."""
        assert self.watermark is not None
        raw = api.list_runs(dag_ids=sorted(dag_ids),
                            updated_at_gte=self.watermark - WATERMARK_OVERLAP)
        return self._absorb(raw, dag_ids, now)

    def _absorb(self, raw: list[dict[str, Any]], dag_ids: set[str], now: datetime) -> int:
        changed = 0
        newest = self.watermark
        for item in raw:
            updated = parse_time(item.get("updated_at"))
            if updated is not None and (newest is None or updated > newest):
                newest = updated
            if item.get("dag_id") not in dag_ids:
                continue
            run = DagRun.from_api(item)
            key = (run.dag_id, run.run_id)
            if self.runs.get(key) != run:
                self.runs[key] = run
                self.version += 1
                changed += 1
        if newest is None or not any(item.get("updated_at") for item in raw):
            # No updated_at in the answer (or nothing at all): fall back to our clock.
            newest = max(newest or now, now - WATERMARK_OVERLAP) if raw else (newest or now)
        self.watermark = newest
        return changed

    def put(self, run: DagRun) -> None:
        self.runs[(run.dag_id, run.run_id)] = run
        self.version += 1

    def prune(self, oldest: datetime) -> None:
        kept = {k: r for k, r in self.runs.items()
                if r.logical_date is None or r.logical_date >= oldest}
        if len(kept) != len(self.runs):
            self.runs = kept
            self.version += 1


@dataclass
class PassReport:
    actions: list[Action] = field(default_factory=list)
    plan: Plan | None = None
    leader: bool = False
    airflow_requests: int = 0
    etcd_writes: int = 0


@dataclass
class Desired:
    commit: str
    graph: Graph
    since: dict[str, datetime]


class Reconciler:
    """One replica of the reconciler; `run_pass` is one observe -> plan -> act -> record."""

    def __init__(self, store: EtcdStore, api: AirflowApi, settings: LoopSettings, *,
                 holder: str | None = None, clock: Clock | None = None,
                 metrics: Metrics | None = None, health: Health | None = None,
                 pull: Callable[[], None] | None = None,
                 pull_interval: float = 30.0) -> None:
        self.store = store
        self.api = api
        self.settings = settings
        self.holder = holder or default_holder_id()
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.pull = pull
        self.pull_interval = pull_interval
        self._pulled_at: float | None = None
        self.desired: Desired | None = None
        self.head_dirty = threading.Event()
        self.head_dirty.set()
        self.wake = threading.Event()
        self.runs = RunCache()
        self.ledger: dict[tuple[datetime, str], LedgerEntry] | None = None
        self.observed: dict[tuple[str, str], dict[str, Any]] | None = None
        self.lease: Any = None
        self._lease_refreshed = 0.0
        self._retry_after: dict[tuple[datetime, str], float] = {}
        self._last_status: dict[tuple[datetime, str], tuple[str, str]] = {}
        self._cancel_watch: Callable[[], None] | None = None
        self._plan_cache: tuple[tuple[str, int, int], Plan] | None = None
        self._ledger_version = 0
        self._recorded: Plan | None = None
        self._watches: list[Any] = []

    # --- the pass ---

    def run_pass(self) -> PassReport:
        report = PassReport()
        requests0, writes0 = self.api.request_count, self.store.writes
        self._maybe_pull()
        self._load_desired()
        report.leader = self._keep_leadership()
        if self.desired is None:
            return report
        now = self.clock.now()
        self._observe(now)
        if report.leader and self.ledger is None:
            self._load_ledger()
        result = self._plan(now, leader=report.leader)
        report.plan = result
        if report.leader:
            for action in result.actions:
                if self._act(action, now):
                    report.actions.append(action)
            if report.actions:
                # Plan again on what the actions changed, so the recorded status is current.
                result = self._plan(now, leader=True)
                report.plan = result
            if result is not self._recorded:  # a reused plan was recorded already
                self._record(result)
                self._recorded = result
        self.metrics.passes.inc()
        self.metrics.open_cycles.set(len(result.cycles))
        report.airflow_requests = self.api.request_count - requests0
        report.etcd_writes = self.store.writes - writes0
        self.metrics.airflow_requests.inc(report.airflow_requests)
        self.metrics.etcd_writes.inc(report.etcd_writes)
        return report

    def _plan(self, now: datetime, *, leader: bool) -> Plan:
        """plan() on the current inputs; a quiet pass reuses the last plan, because with
        the same graph, runs and ledger only the window's lower edge can change it."""
        assert self.desired is not None
        if not leader or self.ledger is None:
            self._plan_cache = None  # a standby reads the ledger it does not own each pass
            return plan(self.desired.graph, self.runs.runs.values(), self._read_ledger(), now,
                        window=self.settings.window, since=self.desired.since,
                        commit=self.desired.commit)
        key = (self.desired.commit, self.runs.version, self._ledger_version)
        if self._plan_cache is not None:
            cached_key, cached = self._plan_cache
            if cached_key == key and all(c >= now - self.settings.window
                                         for c in cached.cycles):
                return cached
        result = plan(self.desired.graph, self.runs.runs.values(), self.ledger, now,
                      window=self.settings.window, since=self.desired.since,
                      commit=self.desired.commit)
        self._plan_cache = (key, result)
        return result

    # --- desired state ---

    def _maybe_pull(self) -> None:
        mono = self.clock.monotonic()
        if self.pull is None:
            return
        if self._pulled_at is not None and mono - self._pulled_at < self.pull_interval:
            return
        self.pull()
        self._pulled_at = mono

    def _load_desired(self) -> None:
        if not self.head_dirty.is_set() and self.desired is not None:
            return
        self.head_dirty.clear()
        from reconciler.service.sync import read_since, read_synced_graph

        head, _ = self.store.read_head()
        if head is None:
            if self.desired is None:
                event("no graph synced yet; run `reconciler sync` (or start with --repo)",
                      logging.WARNING)
            return
        if self.desired is not None and head.commit == self.desired.commit:
            return
        commit, graph = read_synced_graph(self.store, head.commit)
        self.desired = Desired(commit, graph, read_since(self.store, commit))
        self.runs.listed_at = None  # the set of DAGs may have changed: list again
        event("desired graph loaded", commit=commit[:12], pipelines=len(graph),
              edges=graph.edge_count())

    # --- leadership ---

    def _keep_leadership(self) -> bool:
        mono = self.clock.monotonic()
        ttl = self.settings.lease_ttl
        if self.lease is not None:
            if mono - self._lease_refreshed < ttl / 3:
                return True
            if self.store.refresh(self.lease):
                self._lease_refreshed = mono
                return True
            self._lose_leadership("the lease expired")
        lease = self.store.campaign(self.holder, ttl)
        if lease is None:
            self.metrics.leader.set(0)
            return False
        self.lease = lease
        self._lease_refreshed = mono
        self.ledger = None  # read it again: the previous leader may have written to it
        self.metrics.leader.set(1)
        event("became leader", holder=self.holder)
        return True

    def _lose_leadership(self, why: str) -> None:
        if self.lease is not None:
            level = logging.INFO if why == "shutting down" else logging.WARNING
            event("leadership released" if why == "shutting down" else "lost leadership",
                  level, holder=self.holder, why=why)
        self.lease = None
        self.ledger = None
        self.metrics.leader.set(0)

    def resign(self) -> None:
        if self.lease is not None:
            # if etcd is down, the lease lapses by itself within its TTL
            with contextlib.suppress(StoreError):
                self.store.resign(self.lease)
            self._lose_leadership("shutting down")

    # --- observe ---

    def _observe(self, now: datetime) -> None:
        assert self.desired is not None
        dag_ids = set(self.desired.graph.pipelines)
        oldest = now - self.settings.window
        mono = self.clock.monotonic()
        stale = (self.runs.listed_at is None
                 or mono - self.runs.listed_at >= self.settings.relist_interval)
        if stale:
            self.runs.relist(self.api, dag_ids, oldest, mono, now)
            if self.ledger is not None and self.observed is not None:
                self._forget_closed_cycles()
        else:
            self.runs.refresh(self.api, dag_ids, now)
        self.runs.prune(oldest)

    # --- ledger ---

    def _read_ledger(self) -> dict[tuple[datetime, str], LedgerEntry]:
        out = {}
        for (cycle, dag_id), data in self.store.read_ledger().items():
            parsed = parse_time(cycle)
            if parsed is None:
                continue
            try:
                out[(parsed, dag_id)] = LedgerEntry.from_json(data)
            except (KeyError, ValueError) as exc:
                event("unreadable ledger entry ignored", logging.WARNING, cycle=cycle,
                      dag_id=dag_id, error=str(exc))
        return out

    def _load_ledger(self) -> None:
        self.ledger = self._read_ledger()
        self._ledger_version += 1
        self.observed = self.store.read_observed()
        self._forget_closed_cycles()

    def _forget_closed_cycles(self) -> None:
        """Delete ledger and observed keys of cycles that left the window (leader only)."""
        assert self.ledger is not None
        assert self.observed is not None
        oldest = self.clock.now() - self.settings.window
        closed = {c for c, _ in self.ledger if c < oldest}
        for cycle_text, _ in self.observed:
            parsed = parse_time(cycle_text)
            if parsed is not None and parsed < oldest:
                closed.add(parsed)
        for cycle in sorted(closed):
            self.store.delete_cycle(iso(cycle))
            event("closed cycle forgotten", cycle=iso(cycle))
        self.ledger = {k: v for k, v in self.ledger.items() if k[0] not in closed}
        self._ledger_version += 1
        self.observed = {k: v for k, v in self.observed.items()
                         if parse_time(k[0]) not in closed}

    def _write_ledger(self, action: Action, entry: LedgerEntry) -> None:
        self.store.put_ledger(self.holder, iso(action.cycle), action.dag_id, entry.to_json())
        assert self.ledger is not None
        self.ledger[(action.cycle, action.dag_id)] = entry
        self._ledger_version += 1

    # --- act ---

    def _act(self, action: Action, now: datetime) -> bool:
        """Intent, Airflow call, result. Returns True when the action took effect."""
        key = (action.cycle, action.dag_id)
        mono = self.clock.monotonic()
        if self._retry_after.get(key, 0.0) > mono:
            return False
        self._write_ledger(action, action.ledger_entry(at=now, state=LedgerState.INTENT))
        if f"after-intent:{action.kind.value}:{action.dag_id}" == FAILPOINT:
            os.kill(os.getpid(), signal.SIGKILL)  # the e2e crash test: die right here
        try:
            if action.kind is ActionKind.TRIGGER:
                raw, created = self.api.trigger(action.dag_id, action.run_id,
                                                action.logical_date, action.conf)
                self.runs.put(DagRun.from_api({**raw, "dag_id": action.dag_id}))
                result = "triggered" if created else "adopted (409: already there)"
            elif action.kind is ActionKind.CLEAR:
                self.api.clear(action.dag_id, action.run_id)
                self._mark_cleared(action, now)
                result = "cleared (re-run)"
            else:
                result = "adopted"
        except Exception as exc:
            dependency, kind = classify(exc)
            if dependency == "internal":
                raise
            self._retry_after[key] = mono + (5.0 if kind == "transient" else 60.0)
            self.metrics.actions.labels(action.kind.value, "error").inc()
            event("action failed", logging.ERROR, action=action.kind.value,
                  dag_id=action.dag_id, cycle=iso(action.cycle), run_id=action.run_id,
                  error=str(exc), next=kind)
            # if this fails, the intent stays: the next pass decides from Airflow's state
            with contextlib.suppress(StoreError):
                self._write_ledger(action, action.ledger_entry(at=now,
                                                               state=LedgerState.FAILED))
            if dependency == "airflow" and kind == "transient":
                raise
            return False
        self._write_ledger(action, action.ledger_entry(at=now, state=LedgerState.DONE))
        self._retry_after.pop(key, None)
        self.metrics.actions.labels(action.kind.value, "ok").inc()
        event(result, action=action.kind.value, dag_id=action.dag_id,
              cycle=iso(action.cycle), run_id=action.run_id, reason=action.reason)
        return True

    def _mark_cleared(self, action: Action, now: datetime) -> None:
        """Until the next list shows it, treat a cleared run as queued again."""
        for (dag_id, run_id), run in list(self.runs.runs.items()):
            if dag_id == action.dag_id and run_id == action.run_id:
                self.runs.put(replace(run, state="queued", start_date=None, end_date=None,
                                      queued_at=now))

    # --- record ---

    def _record(self, result: Plan) -> None:
        """Mirror the observed state into etcd, only what changed; log state changes."""
        assert self.observed is not None
        changed: list[tuple[str, bytes]] = []
        counts: dict[str, int] = {}
        for status in result.statuses:
            counts[status.state.value] = counts.get(status.state.value, 0) + 1
            key = (status.dag_id, iso(status.cycle))
            summary = (status.state.value, status.message)
            if self._last_status.get((status.cycle, status.dag_id)) != summary:
                if (status.cycle, status.dag_id) in self._last_status or status.state.value in (
                        "done", "failed", "blocked"):
                    event("state", dag_id=status.dag_id, cycle=iso(status.cycle),
                          state=status.state.value, reason=status.reason.value,
                          message=status.message)
                self._last_status[(status.cycle, status.dag_id)] = summary
            data = self._observed_record(status)
            if self.observed.get((key[1], key[0])) != data:
                self.observed[(key[1], key[0])] = data
                changed.append((self.store.observed_key(key[1], key[0]), _dumps(data)))
        for state in ("waiting", "blocked"):
            self.metrics.waiting.labels(state).set(counts.get(state, 0))
        for start in range(0, len(changed), 100):
            if not self.store.put_fenced(self.holder, changed[start:start + 100]):
                raise StoreConflict("not the leader any more while recording status")

    def _observed_record(self, status: PipelineStatus) -> dict[str, Any]:
        run = None
        if status.run_id:
            run = self.runs.runs.get((status.dag_id, status.run_id))
        data = status.to_json()
        if run is not None:
            data["run"] = {"state": run.state,
                           "start_date": iso(run.start_date) if run.start_date else None,
                           "end_date": iso(run.end_date) if run.end_date else None}
        return data

    # --- the loop ---

    def run_forever(self, stop: threading.Event) -> None:
        failures = 0
        self.health.started = True
        while not stop.is_set():
            self.wake.clear()
            delay = self.settings.interval
            try:
                self._ensure_watch()
                started = self.clock.monotonic()
                self.run_pass()
                self.metrics.pass_seconds.observe(self.clock.monotonic() - started)
                for dependency in ("etcd", "airflow"):
                    if self.health.set_ready(dependency):
                        event(f"{dependency} reachable again")
                failures = 0
            except Exception as exc:
                dependency, kind = classify(exc)
                self.metrics.errors.labels(dependency, kind).inc()
                if kind == "lost-leadership":
                    self._lose_leadership(str(exc))
                    continue
                if dependency == "internal":
                    event("unexpected error in a pass", logging.ERROR, exc_info=True,
                          error=repr(exc))
                elif self.health.set_unready(dependency, str(exc)):
                    event(f"{dependency} unavailable, retrying", logging.WARNING,
                          error=str(exc), next=kind)
                if dependency == "etcd":
                    self._drop_watch()
                failures += 1
                base = self.settings.interval * (2 ** min(failures, 6))
                delay = min(MAX_BACKOFF, base) * random.uniform(0.5, 1.0)
                if kind == "human":
                    delay = max(delay, 30.0)
            self.metrics.ready.set(1 if self.health.ready else 0)
            if stop.is_set():
                break
            self._sleep(delay, stop)
        self._drop_watch()
        self.resign()

    def _sleep(self, delay: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + delay
        while not stop.is_set() and not self.wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.wake.wait(min(remaining, 0.5))

    def _ensure_watch(self) -> None:
        if self._cancel_watch is not None and not any(
                getattr(h, "broken", threading.Event()).is_set() for h in self._watches):
            return
        self._drop_watch()
        head = threading.Event()
        wake = self.wake
        dirty = self.head_dirty

        class _Both(threading.Event):
            def set(self) -> None:
                dirty.set()
                wake.set()

        # desired/head changes mark the graph dirty; events/ only wakes the loop.
        cancel_head = self.store.watch([self.store.head_key()], _Both())
        cancel_events = self.store.watch([self.store.events_prefix()], wake)
        self._watches = [cancel_head, cancel_events]
        del head

        def cancel() -> None:
            cancel_head()
            cancel_events()

        self._cancel_watch = cancel

    def _drop_watch(self) -> None:
        if self._cancel_watch is not None:
            try:
                self._cancel_watch()
            finally:
                self._cancel_watch = None


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
