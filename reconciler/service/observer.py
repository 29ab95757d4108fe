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

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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

EAGER_CHECK_BUDGET = 2.0
"""Seconds a pass spends at most on the eager check (`check_tasks`)."""


class _OutOfTime(Exception):
    """The eager check's budget is spent."""


MAX_LISTING_THREADS = 16
"""Deployments listed at once (more wait for a thread)."""

LEAVE_BEHIND_AFTER = 0.02
"""Seconds the loop waits for the other listings once the first has ended, at least (and
as long again as that first one took): a listing still running then is left behind. Too
short costs little: a listing left behind is merged on the next pass."""


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


def parse_runs(raw: Iterable[Mapping[str, Any]], dag_ids: Set[str]) -> Iterator[DagRun]:
    """The runs of `dag_ids` in an API listing; one with unreadable fields is logged and
    skipped."""
    for item in raw:
        if item.get("dag_id") not in dag_ids:
            continue
        try:
            yield DagRun.from_api(item)
        except (KeyError, TypeError, ValueError) as exc:
            event("run with unreadable fields ignored", logging.WARNING,
                  dag_id=item.get("dag_id"), run_id=item.get("dag_run_id"), error=str(exc))


@dataclass(slots=True)
class TaskCheck:
    """What the eager reads found (possibly on a thread): runs whose tasks are all done,
    by key, with their latest task end; the runs put off to the next pass, and why."""

    done: dict[tuple[str, str], datetime] = field(default_factory=dict)
    put_off: list[tuple[str, str]] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(slots=True)
class Listed:
    """What one deployment's listing found, parsed on a thread of its own: the main
    thread merges it into the cache (nothing else touches the cache concurrently)."""

    deployment: str
    group: frozenset[str]
    kind: str
    """"relist" (the group's runs become these), "since" (changes since the watermark)
    or "old-cycles" (the runs of cycles open although older than the window)."""
    start: datetime
    """The deployment's clock when the listing started: its next watermark."""
    desired: Any
    """The graph it was asked for: a listing that outlived its graph is dropped."""
    runs: list[DagRun] = field(default_factory=list)
    error: ReconcilerError | None = None


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

    def replace_group(self, runs: Iterable[DagRun], group: Set[str]) -> None:
        """The runs of `group` (one deployment's pipelines) become `runs`, already listed
        and parsed; the others stay."""
        self.runs = {k: r for k, r in self.runs.items() if k[0] not in group}
        self.absorb_runs(runs)
        self.version += 1

    def absorb(self, raw: Iterable[Mapping[str, Any]], dag_ids: Set[str]) -> int:
        return self.absorb_runs(parse_runs(raw, dag_ids))

    def absorb_runs(self, runs: Iterable[DagRun]) -> int:
        changed = 0
        for run in runs:
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
        self._feeds_of: tuple[Desired, frozenset[str]] | None = None
        self.moved_unread: dict[str, str] = {}
        """Deployment left -> why the runs of the pipelines moved from it could not be
        read on the last look (a trigger of theirs waits: core/plan.py `hold_moved`)."""
        self._groups: tuple[frozenset[str], dict[str, list[str]],
                            dict[str, frozenset[str]]] | None = None
        """The graph's names -> (by deployment, the same as sets), kept per graph."""
        self._watermarks: dict[str, datetime] = {}
        """Per deployment: Airflow's clock when its last listing started."""
        self.concurrent_listing = True
        """Several deployments are listed at once, a thread each (the simulation lists
        them in turn: its replay must not depend on thread timing)."""
        self.leave_behind = False
        """The loop does not wait for a deployment's listing much slower than the others'
        (a one-shot command waits for every one)."""
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future[Listed]] = {}
        self._last_failure: ReconcilerError | None = None

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
        if by_deployment:  # declared deployments, one or several
            self._observe_deployments(by_deployment, horizon, now, mono, stale)
        else:
            self.unreachable = {}
            self._inflight.clear()  # left behind under a graph of several deployments
            self._observe_all(dag_ids, horizon, now, mono, stale)
        if getattr(self.api, "declares", False):
            self._observe_moved(horizon)

    def _by_deployment(self, dag_ids: frozenset[str]) -> Mapping[str, list[str]]:
        """The graph's pipelines by deployment, built once per graph (not on every quiet
        pass); nothing when the graph declares no deployments (all in one)."""
        if not getattr(self.api, "declares", False):
            return {}
        if self._groups is None or self._groups[0] is not dag_ids:
            groups = self.api.groups(dag_ids)  # type: ignore[attr-defined]
            self._groups = (dag_ids, groups, {d: frozenset(n) for d, n in groups.items()})
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
        """Every deployment at once, each listed on a thread of its own and parsed there;
        the main thread merges. One that fails keeps its runs as last seen, is named in
        `unreachable`, and the others go on; when it answers again it is listed from its
        own watermark (or relisted), so nothing it did meanwhile is missed. In the loop
        (`leave_behind`) a listing much slower than the others' is not waited for: the
        pass goes on with that deployment's runs as last seen and defers its actions
        (`late`), and merges the listing on the pass it has ended. Raises only when every
        deployment failed (the runner then backs off)."""
        fleet: Any = self.api
        jobs: dict[str, Callable[[], Listed]] = {}
        for deployment, names in sorted(by_deployment.items()):
            if deployment in self._inflight:
                continue  # still listing since an earlier pass
            watermark = self._watermarks.get(deployment)
            start = fleet.server_now_of(deployment) or now
            group = self._groups[2][deployment] if self._groups else frozenset(names)
            if stale or watermark is None:
                jobs[deployment] = self._list_job(deployment, names, group, "relist", start,
                                                  updated_at_gte=horizon)
            else:
                jobs[deployment] = self._list_job(
                    deployment, names, group, "since", start,
                    updated_at_gte=watermark - WATERMARK_OVERLAP)
        self._last_failure = None
        merged = self._merge(self._gather(jobs))
        old = self._old_cycle_jobs(merged, horizon)
        if old:
            self._merge(self._gather(old))
        self.unreachable = {d: why for d, why in self.unreachable.items() if d in by_deployment}
        self.cache.watermark = now
        if stale:
            self.cache.listed_at = mono
        if self._last_failure is not None and by_deployment and all(
                d in self.unreachable for d in by_deployment):
            last, self._last_failure = self._last_failure, None
            raise last

    def _list_job(self, deployment: str, names: list[str], group: frozenset[str],
                  kind: str, start: datetime, **filters: datetime) -> Callable[[], Listed]:
        """One deployment's listing of `names` (as the set `group`) as a job for a
        thread: it parses page by page into its own list (the cache is the main
        thread's)."""
        fleet: Any = self.api
        desired = self.desired

        def job() -> Listed:
            listed = Listed(deployment, group, kind, start, desired)
            try:
                listed.runs.extend(parse_runs(
                    fleet.iter_runs_of(deployment, names, **filters), group))
            except ReconcilerError as exc:
                listed.error = exc
                listed.runs.clear()
            return listed
        return job

    def _gather(self, jobs: Mapping[str, Callable[[], Listed]]) -> list[Listed]:
        """Run `jobs` (deployment -> listing) concurrently and return every listing that
        has ended: these, and any left behind by an earlier pass. Waits for all of them
        except, in the loop, one still running when the others have ended and as long
        again has passed (a deployment hanging to its timeout adds nothing to the others'
        passes), and except deployments already unreachable (their retry runs behind)."""
        if not self.concurrent_listing:
            return [job() for _, job in sorted(jobs.items())]
        for deployment, job in jobs.items():
            self._inflight[deployment] = self._submit(job)
        if self.leave_behind:
            waited = {self._inflight[d] for d in jobs if d not in self.unreachable} or {
                self._inflight[d] for d in jobs}
        else:
            waited = set(self._inflight.values())
        began, deadline = time.monotonic(), None
        pending = waited
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                break
            if self.leave_behind and deadline is None:
                deadline = time.monotonic() + max(LEAVE_BEHIND_AFTER,
                                                  time.monotonic() - began)
        ended = sorted(d for d, f in self._inflight.items() if f.done())
        return [self._inflight.pop(d).result() for d in ended]

    def _merge(self, listings: list[Listed]) -> list[Listed]:
        """Merge ended listings (main thread); returns the relists that succeeded."""
        relisted = []
        for listed in listings:
            deployment = listed.deployment
            if listed.desired is not self.desired:
                self._watermarks.pop(deployment, None)  # asked for another graph
                continue
            if listed.error is not None:
                text = str(listed.error)
                why = text if text.startswith(f"deployment {deployment}:") \
                    else f"deployment {deployment}: {text}"
                if deployment not in self.unreachable:
                    event("deployment unreachable: its pipelines wait, the others go on",
                          logging.WARNING, deployment=deployment, error=why)
                self.unreachable[deployment] = why
                self._last_failure = listed.error
                if listed.kind == "relist":
                    self._watermarks.pop(deployment, None)  # relist it when it is back
                continue
            if listed.kind == "relist":
                self.cache.replace_group(listed.runs, listed.group)
                relisted.append(listed)
            else:
                self.cache.absorb_runs(listed.runs)
            if listed.kind != "old-cycles":
                self._watermarks[deployment] = listed.start
            if self.unreachable.pop(deployment, None) is not None:
                event("deployment answers again", deployment=deployment)
        return relisted

    def _old_cycle_jobs(self, relisted: list[Listed], horizon: datetime
                        ) -> dict[str, Callable[[], Listed]]:
        """`relist`'s second half for each deployment just relisted: its non-roots' runs
        of cycles open although older than the window. Asked once every deployment is
        merged: the roots may run in another one."""
        if not relisted:
            return {}
        assert self.desired is not None
        graph = self.desired.graph
        old_cycles = self._old_open_cycles(horizon)
        jobs: dict[str, Callable[[], Listed]] = {}
        for listed in relisted:
            others = sorted(d for d in listed.group if graph.pipelines[d].depends_on)
            if not others or not old_cycles:
                continue
            jobs[listed.deployment] = self._old_cycles_job(listed, others, old_cycles)
        return jobs

    def _old_cycles_job(self, listed: Listed, others: list[str],
                        cycles: list[datetime]) -> Callable[[], Listed]:
        group = frozenset(others)
        jobs = [self._list_job(listed.deployment, others, group, "old-cycles", listed.start,
                               logical_date_gte=c, logical_date_lte=c) for c in cycles]

        def job() -> Listed:
            out = Listed(listed.deployment, group, "old-cycles", listed.start,
                         listed.desired)
            for one in jobs:
                part = one()
                if part.error is not None:
                    out.error, out.runs = part.error, []
                    break
                out.runs.extend(part.runs)
            return out
        return job

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=MAX_LISTING_THREADS,
                                            thread_name_prefix="list")
        return self._pool.submit(fn, *args)

    @property
    def late(self) -> frozenset[str]:
        """Deployments whose listing is still under way (left behind by `_gather`): the
        loop defers their actions until it has ended."""
        return frozenset(self._inflight)

    def close(self) -> None:
        """Stop the listing threads (a listing under way ends by its own deadline)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._inflight.clear()

    def _observe_moved(self, horizon: datetime) -> None:
        """The earlier runs of pipelines moved to another deployment, from the one they
        left (the ledger records where each run is): a cycle a pipeline already ran there
        is seen as run, so it is not run again where it runs now. A deployment left that
        cannot be reached is logged and named in `moved_unread`: the plan counts a
        confirmed entry of it as done, and a trigger of a pipeline whose entry is there
        waits for it (core/plan.py `hold_moved`), never runs it twice."""
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
        unread: dict[str, str] = {}
        for deployment, names in sorted(self._moved[1].items()):
            try:
                self.cache.absorb(fleet.iter_runs_of(deployment, sorted(names), moved=True,
                                                     updated_at_gte=horizon),
                                  frozenset(names))
            except ReconcilerError as exc:
                event("runs of pipelines moved away cannot be read", logging.WARNING,
                      deployment=deployment, pipelines=",".join(sorted(names)),
                      error=str(exc))
                unread[deployment] = str(exc)
        self.moved_unread = unread

    def _old_open_cycles(self, horizon: datetime) -> list[datetime]:
        """The cycles of roots' runs in the cache older than the window: their other
        runs are listed by logical date (a backfill, a weekly root)."""
        assert self.desired is not None
        pipelines = self.desired.graph.pipelines
        return sorted({r.logical_date for r in self.cache.runs.values()
                       if r.logical_date is not None and r.logical_date < horizon
                       and not pipelines[r.dag_id].depends_on})

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
        old_cycles = self._old_open_cycles(horizon)
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
        .../taskInstances` for one such run, one batch listing for several). Marks the
        cached run with `tasks_done_at`; returns how many runs became eager-done. Best
        effort, within `EAGER_CHECK_BUDGET` seconds: what is not asked in time, or not
        answered (an API server drowning in requests), waits for the next pass, and the
        pass goes on (the listing sees those runs end anyway); it never holds every
        trigger back."""
        asked = self._task_candidates()
        return self._apply_task_check(self._ask_tasks(asked, now)) if asked else 0

    def _task_candidates(self, *, keep_unseen: bool = False) -> list[tuple[str, str]]:
        """The runs with a task-level event worth a read (taken off the pending set): a
        run of a pipeline something depends on, running as last seen, not done yet.
        `keep_unseen`: the events of runs not (yet) seen running stay pending (asked
        before the listing, whose runs may include them)."""
        with self._events_lock:
            pending, self._task_events = self._task_events, set()
        if not self.settings.eager or self.desired is None or not pending:
            return []
        feeds = self._feeds()
        asked, unseen = [], []
        for key in sorted(pending):
            run = self.cache.runs.get(key)
            if key[0] not in feeds or (run is not None and run.tasks_done_at is not None):
                continue
            if run is not None and run.state == "running":
                asked.append(key)
            elif keep_unseen:
                unseen.append(key)
        if unseen:
            with self._events_lock:
                self._task_events.update(unseen)
        return asked

    def _feeds(self) -> frozenset[str]:
        """The pipelines something depends on, built once per graph (an event pass must
        not walk 50,000 pipelines before its reads go out)."""
        assert self.desired is not None
        if self._feeds_of is None or self._feeds_of[0] is not self.desired:
            graph = self.desired.graph
            self._feeds_of = (self.desired, frozenset(
                u for p in graph.pipelines.values() for u in p.depends_on))
        return self._feeds_of[1]

    def _ask_tasks(self, asked: list[tuple[str, str]], now: datetime) -> TaskCheck:
        """Read the task instances of `asked` within the budget; touches no cache (it
        may run on a thread beside the listing)."""
        check = TaskCheck()
        began = self.clock.monotonic()
        deadline_of = getattr(self.api, "deadline_of", None)
        batch = getattr(self.api, "task_instances_of", None)
        if batch is not None and len(asked) > 1:
            # Many runs (roots ending together, a wide fan-out's last tasks): one listing.
            try:
                with deadline_of(EAGER_CHECK_BUDGET) if deadline_of is not None \
                        else contextlib.nullcontext():
                    found = batch(asked)
            except BaseException as exc:
                check.put_off, check.error = list(asked), exc
                return check
            for key in asked:
                done = tasks_done_at(found.get(key, ()), now)
                if done is not None:
                    check.done[key] = done
            return check
        for n, (dag_id, run_id) in enumerate(asked):
            left = EAGER_CHECK_BUDGET - (self.clock.monotonic() - began)
            try:
                if left <= 0:
                    raise _OutOfTime
                with deadline_of(left) if deadline_of is not None else contextlib.nullcontext():
                    tis = self.api.task_instances(dag_id, run_id)
            except BaseException as exc:
                check.put_off = asked[n:]
                check.error = exc
                break
            done = tasks_done_at(tis, now)
            if done is not None:
                check.done[(dag_id, run_id)] = done
        return check

    def _apply_task_check(self, check: TaskCheck) -> int:
        """Main thread: mark the runs found done (still running in the cache: the listing
        may have seen one end meanwhile); what was put off is asked on the next pass."""
        found = 0
        for key, done in check.done.items():
            run = self.cache.runs.get(key)
            if run is not None and run.state == "running" and run.tasks_done_at is None:
                self.cache.put(replace(run, tasks_done_at=done))
                found += 1
        if check.put_off:
            with self._events_lock:
                self._task_events.update(check.put_off)
            exc = check.error
            if not isinstance(exc, ReconcilerError | _OutOfTime):
                raise exc  # type: ignore[misc]
            event("eager check put off to the next pass", logging.INFO,
                  runs=len(check.put_off), why=str(exc) or "out of time")
        return found

    def _observe_runs_and_tasks(self, now: datetime) -> None:
        """The listing, and beside it (not after it: the event path then waits for one
        round trip, not two) the eager reads of runs already seen running; then the
        reads of runs the listing has just shown running."""
        asked = self._task_candidates(keep_unseen=True)
        reading = self._submit(self._ask_tasks, asked, now) if asked else None
        try:
            self.observe_runs(now)
        except BaseException:
            if reading is not None:
                reading.result()  # within the budget; nothing is left on a thread
            with self._events_lock:  # asked again on the next pass
                self._task_events.update(asked)
            raise
        if reading is not None:
            self._apply_task_check(reading.result())
        self.check_tasks(now)

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
            if self.concurrent_listing:
                self._observe_runs_and_tasks(now)
            else:  # the simulation: one call at a time, in a fixed order
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
