"""The observer: desired state from etcd, actual runs from Airflow, the ledger; as values.

`observe()` returns an `Observation` (the graph of the synced head, the runs of its DAGs,
the ledger, and the time it was taken) that `plan()`, the `plan` and `status` commands
and the loop all use. Like an informer it lists everything once (the runs updated inside
the window, paginated), then asks only for what changed (`updated_at_gte` the watermark
minus an overlap: one request when nothing did), and relists every `relist_interval`.
The window, the watermark and the observation's `now` are Airflow's clock (its `Date`
header, see `Observer.now`), not this machine's: a local clock off by hours or days
neither delays nor loses a run; the skew is logged once per change and kept in `skew`.

Stored values that cannot be read are quarantined: one log line naming the key, and the
rest goes on (a ledger entry is then simply absent: the run's own timestamps decide, and
the next write of that key replaces the bad value; a head or graph that cannot be read
leaves the last good graph in force).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from reconciler.adapters.store import StoreCorrupt, Unreadable
from reconciler.core.errors import ReconcilerError
from reconciler.core.graph import Graph
from reconciler.core.settings import LoopSettings
from reconciler.core.state import DagRun, LedgerEntry, parse_time
from reconciler.service.ledger import Ledger, read_ledger
from reconciler.service.observability import event
from reconciler.service.ports import AirflowApi, Clock, Store

T = TypeVar("T")

TASKS_DONE = frozenset({"success", "skipped"})
"""Task states that count as done on the eager path: what the scheduler needs to close
the run as a success. `removed` task instances (no longer in the DAG) are not counted."""

WATERMARK_OVERLAP = timedelta(seconds=3)
"""An incremental list asks for runs updated since the watermark minus this, so a run
updated in the same instant as the previous answer is never missed. The watermark is
Airflow's clock read from its `Date` header, truncated to the second (up to 1 s early)
and moved on locally since: the overlap covers both."""


@runtime_checkable
class PagedRuns(Protocol):
    """An Airflow client that can hand over a listing page by page (AirflowClient): a
    relist then holds one page of the API's dicts at a time, not 150,000 of them."""

    def iter_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None) -> Iterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class Desired:
    commit: str
    graph: Graph
    since: Mapping[str, datetime]


@dataclass(frozen=True)
class Observation:
    """One look at the world. `runs` and `ledger` are read-only views (no copy: a quiet
    pass at 50,000 pipelines must not copy 150,000 runs); the versions change whenever
    their content does, so a consumer can tell "the same inputs" cheaply."""

    desired: Desired | None
    runs: Mapping[tuple[str, str], DagRun]
    runs_version: int
    ledger: Mapping[tuple[datetime, str], LedgerEntry]
    ledger_version: int
    now: datetime
    suspended: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """dag_id (or "*") -> who suspended it and why (`reconciler suspend`)."""
    suspended_version: int = 0


class RunCache:
    """The runs of the graph's DAGs that matter: updated inside the window, or belonging
    to an open cycle."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], DagRun] = {}
        self.watermark: datetime | None = None
        self.listed_at: float | None = None
        self.version = 0

    def replace_all(self, raw: Iterable[Mapping[str, Any]], dag_ids: Set[str],
                    now: datetime, mono: float) -> None:
        """The cache becomes what `raw` lists. `raw` may be a listing still under way (page
        by page): if it fails midway the cache is left as it was."""
        previous, self.runs = self.runs, {}
        try:
            self.absorb(raw, dag_ids)
        except BaseException:
            self.runs = previous
            raise
        self.version += 1
        self.watermark = now
        self.listed_at = mono

    def replace_some(self, raw: Iterable[Mapping[str, Any]], dag_ids: Set[str]) -> None:
        """The runs of `dag_ids` become what `raw` lists; the others stay (one deployment
        relisted). If the listing fails midway the cache is left as it was."""
        previous = self.runs
        self.runs = {k: r for k, r in previous.items() if k[0] not in dag_ids}
        try:
            self.absorb(raw, dag_ids)
        except BaseException:
            self.runs = previous
            raise
        self.version += 1

    def absorb(self, raw: Iterable[Mapping[str, Any]], dag_ids: Set[str]) -> int:
        changed = 0
        for item in raw:
            if item.get("dag_id") not in dag_ids:
                continue
            try:
                run = DagRun.from_api(item)
            except (KeyError, TypeError, ValueError) as exc:
                event("run with unreadable fields ignored", logging.WARNING,
                      dag_id=item.get("dag_id"), run_id=item.get("dag_run_id"), error=str(exc))
                continue
            key = (run.dag_id, run.run_id)
            old = self.runs.get(key)
            if (old is not None and old.tasks_done_at is not None and run.state == "running"
                    and run.start_date == old.start_date):
                # The same execution, still running: the eager finding stands.
                run = replace(run, tasks_done_at=old.tasks_done_at)
            if old != run:
                self.runs[key] = run
                self.version += 1
                changed += 1
        return changed

    def put(self, run: DagRun) -> None:
        if self.runs.get((run.dag_id, run.run_id)) != run:
            self.runs[(run.dag_id, run.run_id)] = run
            self.version += 1

    def prune(self, horizon: datetime, open_cycles: Iterable[datetime]) -> None:
        """Forget runs that left the window and belong to no open cycle."""
        keep = set(open_cycles)

        def recent(r: DagRun) -> bool:
            last = max((t for t in (r.queued_at, r.start_date, r.end_date) if t is not None),
                       default=r.logical_date)
            return last is None or last >= horizon

        kept = {k: r for k, r in self.runs.items() if r.logical_date in keep or recent(r)}
        if len(kept) != len(self.runs):
            self.runs = kept
            self.version += 1


class Observer:
    def __init__(self, store: Store, api: AirflowApi, settings: LoopSettings,
                 clock: Clock, ledger: Ledger | None = None) -> None:
        self.store = store
        self.api = api
        self.settings = settings
        self.clock = clock
        self.desired: Desired | None = None
        self.head_dirty = threading.Event()
        """Set by the etcd watch on desired/head: read the head on the next observe."""
        self.head_dirty.set()
        self.cache = RunCache()
        self._ids: tuple[Desired, frozenset[str]] | None = None
        self._task_events: set[tuple[str, str]] = set()
        self._events_lock = threading.Lock()
        self.suspended: dict[str, str] | None = None
        self.suspended_dirty = threading.Event()
        """Set by the etcd watch on suspended/: read the marks on the next observe."""
        self.suspended_version = 0
        self.quarantined: dict[str, str] = {}
        """key -> why, for every stored value that could not be read (logged once)."""
        self.log_quarantine = True
        """False for a one-shot command, which names each key in its own output."""
        self.ledger = ledger if ledger is not None else Ledger(store, self.quarantine,
                                                               self.release)
        """The run ledger, shared with the executor that writes it through (ledger.py)."""
        self.skew: float | None = None
        """Seconds our clock is ahead of Airflow's (negative: behind), at the last look."""
        self._skewed = False
        self._probed = False
        self.unreachable: dict[str, str] = {}
        """Deployment -> why its last listing failed (several deployments: the others
        go on, and the loop holds back the actions of these)."""
        self._moved: tuple[tuple[Any, int], dict[str, set[str]]] | None = None
        """(graph, ledger version) -> deployment left -> pipelines moved from it."""
        self._groups: tuple[frozenset[str], dict[str, list[str]]] | None = None
        self._watermarks: dict[str, datetime] = {}
        """Per deployment: Airflow's clock when its last listing started."""

    # --- desired state ---

    def load_desired(self) -> Desired | None:
        if self.desired is not None and not self.head_dirty.is_set():
            return self.desired
        self.head_dirty.clear()
        try:
            head, _ = self._read_or_stay_dirty(self.store.read_head, self.head_dirty)
            if head is None:
                if self.desired is None:
                    event("no graph synced yet; run `reconciler sync` (or start with --repo)",
                          logging.WARNING)
                return self.desired
            if self.desired is not None and head.commit == self.desired.commit:
                return self.desired
            graph = self._read_or_stay_dirty(lambda: self.store.read_graph(head.commit),
                                             self.head_dirty)
            if graph is None:
                raise StoreCorrupt(f"desired/graphs/{head.commit}",
                                   "the head names a graph that is not stored")
            since = self._read_or_stay_dirty(lambda: self.store.read_since(head.commit),
                                             self.head_dirty)
        except StoreCorrupt as exc:
            self.quarantine(exc.key, exc.why)
            return self.desired  # the last good graph stays in force
        self.desired = Desired(head.commit, graph, MappingProxyType(dict(since)))
        configure = getattr(self.api, "configure", None)
        if configure is not None:  # AirflowFleet: route by this graph's deployments
            configure(graph)
        self.cache.listed_at = None  # the set of DAGs may have changed: list again
        event("desired graph loaded", commit=head.commit[:12], pipelines=len(graph),
              edges=graph.edge_count())
        return self.desired

    @staticmethod
    def _read_or_stay_dirty(read: Callable[[], T], dirty: threading.Event) -> T:
        """`read()`; when it fails (etcd paused, cut off) the watch's mark is set again,
        so the next pass reads again: the change it announced is not lost until the
        next one (a resume or a new graph ignored for hours)."""
        try:
            return read()
        except StoreCorrupt:
            raise  # quarantined by the caller: read again when it is rewritten
        except BaseException:
            dirty.set()
            raise

    def quarantine(self, key: str, why: str) -> None:
        if self.quarantined.get(key) != why:
            if self.log_quarantine:
                event("unreadable stored value quarantined (ignored until rewritten)",
                      logging.ERROR, key=key, error=why)
            self.quarantined[key] = why

    def load_suspended(self) -> dict[str, str]:
        if self.suspended is not None and not self.suspended_dirty.is_set():
            return self.suspended
        self.suspended_dirty.clear()
        marks: dict[str, str] = {}
        stored = self._read_or_stay_dirty(self.store.read_suspended, self.suspended_dirty)
        for target, mark in stored.items():
            if isinstance(mark, Unreadable):
                self.quarantine(mark.key, mark.why)
                marks[target] = "a mark that cannot be read"  # still suspends: the safe side
            elif isinstance(mark, dict):
                who, why = mark.get("by", "someone"), mark.get("reason", "")
                marks[target] = f"{who}: {why}" if why else str(who)
            else:
                marks[target] = str(mark)
        if marks != self.suspended:
            if self.suspended is not None or marks:
                event("suspensions", suspended=",".join(sorted(marks)) or "none")
            self.suspended = marks
            self.suspended_version += 1
        return self.suspended

    # --- actual state ---

    def _dag_ids(self) -> frozenset[str]:
        """The graph's DAG ids, built once per graph (a quiet pass must not build 50,000)."""
        assert self.desired is not None
        if self._ids is None or self._ids[0] is not self.desired:
            self._ids = (self.desired, frozenset(self.desired.graph.pipelines))
        return self._ids[1]

    def observe_runs(self, now: datetime) -> None:
        assert self.desired is not None
        dag_ids = self._dag_ids()
        horizon = now - self.settings.window
        mono = self.clock.monotonic()
        stale = (self.cache.listed_at is None
                 or mono - self.cache.listed_at >= self.settings.relist_interval)
        by_deployment = self._by_deployment(dag_ids)
        if len(by_deployment) > 1:
            self._observe_deployments(by_deployment, horizon, now, mono, stale)
        else:
            self.unreachable = {}
            self._observe_all(dag_ids, horizon, now, mono, stale)
        if getattr(self.api, "declares", False):
            self._observe_moved(horizon)

    def _by_deployment(self, dag_ids: frozenset[str]) -> Mapping[str, list[str]]:
        """The graph's pipelines by deployment, built once per graph (not on every quiet
        pass); nothing when the graph declares no deployments (all in one)."""
        if not getattr(self.api, "declares", False):
            return {}
        if self._groups is None or self._groups[0] is not dag_ids:
            self._groups = (dag_ids, self.api.groups(dag_ids))  # type: ignore[attr-defined]
        return self._groups[1]

    def _observe_all(self, dag_ids: frozenset[str], horizon: datetime, now: datetime,
                     mono: float, stale: bool) -> None:
        if stale:
            self.relist(dag_ids, horizon, now, mono)
        else:
            # `now` is Airflow's clock when this listing starts: its 1 s resolution and the
            # time the server took to answer are inside the overlap.
            assert self.cache.watermark is not None
            raw = self.api.list_runs(dag_ids,
                                     updated_at_gte=self.cache.watermark - WATERMARK_OVERLAP)
            self.cache.absorb(raw, dag_ids)
            self.cache.watermark = now

    def _observe_deployments(self, by_deployment: Mapping[str, list[str]],
                             horizon: datetime, now: datetime, mono: float,
                             stale: bool) -> None:
        """One deployment at a time: one that fails keeps its runs as last seen, is
        named in `unreachable`, and the others go on. When it answers again it is listed
        from its own watermark (or relisted), so nothing it did meanwhile is missed.
        Raises only when every deployment failed (the runner then backs off)."""
        fleet: Any = self.api
        failed: dict[str, str] = {}
        last: ReconcilerError | None = None
        for deployment, names in sorted(by_deployment.items()):
            group = frozenset(names)
            start = fleet.server_now_of(deployment) or now
            watermark = self._watermarks.get(deployment)
            try:
                if stale or watermark is None:
                    self.cache.replace_some(
                        fleet.iter_runs_of(deployment, names, updated_at_gte=horizon), group)
                    self._relist_old_cycles(deployment, group, horizon)
                else:
                    self.cache.absorb(fleet.iter_runs_of(
                        deployment, names, updated_at_gte=watermark - WATERMARK_OVERLAP),
                        group)
            except ReconcilerError as exc:
                text = str(exc)
                failed[deployment] = text if text.startswith(f"deployment {deployment}:") \
                    else f"deployment {deployment}: {text}"
                last = exc
                if stale:
                    self._watermarks.pop(deployment, None)  # relist it when it is back
                continue
            self._watermarks[deployment] = start
        for deployment in sorted(set(failed) - set(self.unreachable)):
            event("deployment unreachable: its pipelines wait, the others go on",
                  logging.WARNING, deployment=deployment, error=failed[deployment])
        for deployment in sorted(set(self.unreachable) - set(failed)):
            event("deployment answers again", deployment=deployment)
        self.unreachable = failed
        if last is not None and len(failed) == len(by_deployment):
            raise last
        self.cache.watermark = now
        if stale:
            self.cache.listed_at = mono

    def _observe_moved(self, horizon: datetime) -> None:
        """The earlier runs of pipelines moved to another deployment, from the one they
        left (the ledger records where each run is): a cycle a pipeline already ran there
        is seen as run, so it is not run again where it runs now. A deployment left that
        cannot be reached is logged; the plan then counts a confirmed entry of it as done
        (core/plan.py), never runs it twice."""
        fleet: Any = self.api
        entries = self.ledger.entries()
        key = (self.desired, self.ledger.version)
        if self._moved is None or self._moved[0] != key:  # a quiet pass scans nothing
            moved: dict[str, set[str]] = {}
            names_now = self._dag_ids()
            for (_, name), entry in entries.items():
                if entry.deployment and name in names_now \
                        and entry.deployment != fleet.where(name)[0]:
                    moved.setdefault(entry.deployment, set()).add(name)
            self._moved = (key, moved)
        for deployment, names in sorted(self._moved[1].items()):
            try:
                self.cache.absorb(fleet.iter_runs_of(deployment, sorted(names), moved=True,
                                                     updated_at_gte=horizon),
                                  frozenset(names))
            except ReconcilerError as exc:
                event("runs of pipelines moved away cannot be read", logging.WARNING,
                      deployment=deployment, pipelines=",".join(sorted(names)),
                      error=str(exc))

    def _relist_old_cycles(self, deployment: str, group: frozenset[str],
                           horizon: datetime) -> None:
        """`relist`'s second half for one deployment: its non-roots' runs of cycles open
        although older than the window (the roots may run in another deployment)."""
        assert self.desired is not None
        graph = self.desired.graph
        roots = {d for d, p in graph.pipelines.items() if not p.depends_on}
        old_cycles = sorted({r.logical_date for r in self.cache.runs.values()
                             if r.logical_date is not None and r.logical_date < horizon
                             and r.dag_id in roots})
        others = sorted(d for d in group if graph.pipelines[d].depends_on)
        fleet: Any = self.api
        for cycle in old_cycles:
            if others:
                self.cache.absorb(fleet.iter_runs_of(deployment, others,
                                                     logical_date_gte=cycle,
                                                     logical_date_lte=cycle), group)

    def _listing(self, dag_ids: Iterable[str],
                 **filters: datetime) -> Iterable[dict[str, Any]]:
        # Page by page when the client can: each page is parsed into DagRuns and dropped
        # before the next is asked for (the relist's peak memory is one page of dicts).
        if isinstance(self.api, PagedRuns):
            return self.api.iter_runs(dag_ids, **filters)
        return self.api.list_runs(dag_ids, **filters)

    def relist(self, dag_ids: Set[str], horizon: datetime, now: datetime, mono: float) -> None:
        """Every run updated inside the window, then the other runs of cycles that are
        open although their logical date is older (a backfill, a weekly root)."""
        self.cache.replace_all(self._listing(dag_ids, updated_at_gte=horizon),
                               dag_ids, now, mono)
        assert self.desired is not None
        graph = self.desired.graph
        old_cycles = sorted({r.logical_date for r in self.cache.runs.values()
                             if r.logical_date is not None and r.logical_date < horizon
                             and not graph.pipelines[r.dag_id].depends_on})
        others = sorted(d for d, p in graph.pipelines.items() if p.depends_on)
        for cycle in old_cycles:
            if others:
                self.cache.absorb(self._listing(others, logical_date_gte=cycle,
                                                logical_date_lte=cycle), dag_ids)

    # --- the eager path ---

    def on_event(self, key: str, value: bytes) -> None:
        """An `events/<dag_id>/<run_id>` put from the Airflow listener (watch thread): a
        task-level one makes that run a candidate for the eager check."""
        rest = key[len(self.store.events_prefix()):] if key.startswith(
            self.store.events_prefix()) else ""
        dag_id, _, run_id = rest.partition("/")
        name_of = getattr(self.api, "name_of", None)
        if dag_id.startswith("@"):  # events/@<deployment>/<dag_id>/<run_id>
            deployment = dag_id[1:]
            dag_id, _, run_id = run_id.partition("/")
            name = name_of(deployment, dag_id) if name_of is not None and dag_id else None
            if name is None:
                return
            dag_id = name
        elif name_of is not None and self.desired is not None:
            default = self.desired.graph.default_deployment
            dag_id = (name_of(default, dag_id) if default else None) or dag_id
        if not dag_id or not run_id:
            return
        try:
            kind = json.loads(value).get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind in (None, "task"):
            with self._events_lock:
                self._task_events.add((dag_id, run_id))

    def check_tasks(self, now: datetime) -> int:
        """For runs with a task-level event: are all their tasks done? (`GET
        .../taskInstances`, one request per such run). Marks the cached run with
        `tasks_done_at`; returns how many runs became eager-done."""
        with self._events_lock:
            pending, self._task_events = self._task_events, set()
        if not self.settings.eager or self.desired is None or not pending:
            return 0
        graph = self.desired.graph
        feeds = {u for p in graph.pipelines.values() for u in p.depends_on}
        found = 0
        for n, (dag_id, run_id) in enumerate(sorted(pending)):
            run = self.cache.runs.get((dag_id, run_id))
            if dag_id not in feeds or run is None or run.state != "running" \
                    or run.tasks_done_at is not None:
                continue
            try:
                tis = self.api.task_instances(dag_id, run_id)
            except Exception:
                with self._events_lock:  # ask again on the next pass
                    self._task_events.update(sorted(pending)[n:])
                raise
            done = tasks_done_at(tis, now)
            if done is not None:
                self.cache.put(replace(run, tasks_done_at=done))
                found += 1
        return found

    # --- the ledger ---

    def read_ledger(self) -> dict[tuple[datetime, str], LedgerEntry]:
        """The ledger as etcd holds it now (for `plan` and `status`; the loop plans on
        `self.ledger`, which it writes through)."""
        return read_ledger(self.store, self.quarantine)

    def release(self, key: str) -> None:
        """A quarantined key was rewritten with a good value."""
        self.quarantined.pop(key, None)

    # --- Airflow's clock ---

    def now(self, *, refresh: bool = True) -> datetime:
        """Airflow's clock (its `Date` header, moved on by monotonic time), which dates
        every run: the window and the informer's watermark follow it, so a local clock
        hours or days off neither delays nor loses a run. Our clock only when Airflow's
        is not known (no answer with a Date yet)."""
        local = self.clock.now()
        server_now = getattr(self.api, "server_now", None)
        if server_now is None:
            return local
        server = server_now()
        if server is None and refresh and not self._probed:
            # Before the first listing: one cheap call (no auth) to read Airflow's clock.
            health = getattr(self.api, "health", None)
            if health is not None:
                try:
                    health()
                except ReconcilerError as exc:
                    # Only its Date header is wanted (read even from a bad answer); an
                    # Airflow that cannot answer fails the listing that follows.
                    event("clock probe failed", logging.DEBUG, error=str(exc))
            self._probed = True
            server = server_now()
        if server is None:
            return local
        self._note_skew((local - server).total_seconds())
        return server

    def _note_skew(self, skew: float) -> None:
        self.skew = skew
        skewed = abs(skew) > self.settings.max_clock_skew
        if skewed != self._skewed:
            self._skewed = skewed
            if skewed:
                # The amount in the text too: a one-shot command shows only the text.
                event(f"this machine's clock disagrees with Airflow's by {skew:+.0f} s; "
                      "following Airflow's", logging.WARNING, skew_seconds=round(skew, 1),
                      threshold=self.settings.max_clock_skew)
            else:
                event("this machine's clock agrees with Airflow's again",
                      skew_seconds=round(skew, 1))

    # --- one look ---

    def observe(self, *, with_ledger: bool = True, refresh: bool = True) -> Observation:
        """Desired graph, runs and (if asked) the ledger, now. The ledger is read from
        etcd once per term and then written through by the executor (ledger.py).
        `refresh=False` asks nothing of Airflow: the runs as the cache holds them.
        `now` is Airflow's clock (see `now()`)."""
        now = self.now(refresh=refresh)
        desired = self.load_desired()
        suspended = self.load_suspended()
        ledger: Mapping[tuple[datetime, str], LedgerEntry] = MappingProxyType({})
        if with_ledger:
            # Before the runs: the ledger's transient dicts are then not held beside them.
            ledger = self.ledger.entries()
        if desired is not None and refresh:
            self.observe_runs(now)
            self.check_tasks(now)
        return Observation(desired=desired, runs=MappingProxyType(self.cache.runs),
                           runs_version=self.cache.version,
                           ledger=ledger, ledger_version=self.ledger.version,
                           now=now, suspended=MappingProxyType(suspended),
                           suspended_version=self.suspended_version)


def tasks_done_at(task_instances: Iterable[Mapping[str, Any]], now: datetime) -> datetime | None:
    """The latest task end when every task instance is done (success or skipped), else
    None: a task queued, running, up for retry, failed, or not scheduled yet is not done."""
    ends: list[datetime] = []
    counted = 0
    for ti in task_instances:
        state = ti.get("state")
        if state == "removed":
            continue
        if state not in TASKS_DONE:
            return None
        counted += 1
        end = parse_time(ti.get("end_date"))
        if end is not None:
            ends.append(end)
    if counted == 0:
        return None
    return max(ends) if ends else now
