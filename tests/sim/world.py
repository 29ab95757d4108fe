"""The simulated world of one seed: time, the fake Airflow, the replicas, the history.

- The fake Airflow (tests/fakes/fake_airflow.py) runs in-process on Airflow's simulated
  clock; each replica's real `AirflowClient` reaches it through a `SimSession`
  (transport.py), where the Airflow faults are injected.
- Each replica is a real `Reconciler` (reconciler/service/loop.py) on the simulated clock,
  with its own holder id, sharing one real etcd client through a `SimStore` that can cut
  it off from etcd or kill it at any call. A killed replica is dropped mid-pass without
  cleanup; its lease lapses `lease_ttl` simulated seconds later (revoked then, as etcd
  does when a lease expires); a new replica with a new holder id replaces it. etcd's own
  lease timer runs on real time, so the leases are granted far longer there: only the
  simulated clock lapses them.
- The history (`events`) is every change of Airflow's state, in order: runs created by a
  trigger or by the scheduler, started, ended, cleared by the reconciler or by a user,
  each with Airflow's time and, for the reconciler's writes, who sent it and who held
  the leader key at that moment. invariants.py checks it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_fleet import AirflowFleet
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.bounded_http import Watchdog
from reconciler.adapters.store import EtcdStore, StoreError, StoreUnavailable
from reconciler.core.graph import Deployment
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.core.state import parse_time
from reconciler.service.loop import Reconciler
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.sim.clock import SimTime
from tests.sim.transport import CLEAR, TRIGGER, Killed, SimSession

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?")


GENERATIONS: dict[str, str | None] = {"v2": None, "v1": "2.11.2", "v1-2.5": "2.5.3"}
"""The Airflow a seed may run against, and its version for the v1 fake and client: API v2
(Airflow 3), API v1 of Airflow 2.11, and API v1 of Airflow 2.5, whose run listing has no
`updated_at` filter (the client finds changes by state and end date instead)."""


@dataclass
class Event:
    """One change of Airflow's state."""

    at: datetime
    """Airflow's clock."""
    kind: str
    """root | create | start | tasks-done | end | clear | user-clear"""
    dag_id: str
    run_id: str
    logical_date: datetime | None = None
    by: str = ""
    """the replica's holder id (create, clear), "scheduler" or "user"."""
    state: str = ""
    """end: the state it ended in; clear: the state it was in before."""
    duplicate: bool = False
    """A second delivery of one request (an injected duplicate): the network's doing."""
    leader: str | None = None
    """Who held the leader key when the request was sent (None: etcd did not answer)."""
    step: int = 0
    deployment: str = ""
    """The deployment whose Airflow changed ("": the seed runs one, the implicit one)."""
    commit: str = ""
    """The reconciler's writes: the graph commit its sender planned with (what to read
    when a write went to the wrong deployment)."""


REAL_LEASE_FACTOR = 60
"""How much longer than asked the real etcd's leases are granted (see SimStore)."""


class SimStore:
    """One replica's view of the shared EtcdStore: killed -> `Killed`, cut off ->
    `StoreUnavailable`; every other call goes through to the real etcd."""

    def __init__(self, store: EtcdStore, world: World, replica: Replica) -> None:
        self._store = store
        self._world = world
        self._replica = replica

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value) or name.endswith("_key") or name.endswith("_prefix"):
            return value
        replica, world = self._replica, self._world

        def call(*args: Any, **kwargs: Any) -> Any:
            if replica.dead:
                raise Killed(replica.holder)
            if replica.cut:
                raise StoreUnavailable(f"etcd is unreachable from {replica.holder} "
                                       "(simulated partition)")
            world.crash_point(replica, f"before etcd {name}")
            if name == "campaign":
                # etcd's lease runs on real time: granted REAL_LEASE_FACTOR times longer,
                # it never lapses while a seed runs however loaded the machine; it lapses
                # on the simulated clock instead (World.lapse_leases), TTL seconds after
                # its last refresh, and the replica is told the TTL it asked for.
                result = value(args[0], int(args[1]) * REAL_LEASE_FACTOR, *args[2:],
                               **kwargs)
            elif name == "refresh":
                left = value(*args, **kwargs)
                result = min(left, float(world.settings.lease_ttl)) if left > 0 else left
            else:
                result = value(*args, **kwargs)
            world.leases.note(name, args, result, world.time.monotonic())
            world.crash_point(replica, f"after etcd {name}")
            return result

        return call

    @property
    def writes(self) -> int:
        return self._store.writes

    @property
    def last_contact(self) -> float | None:
        return self._store.last_contact

    @property
    def last_failure(self) -> tuple[float, str] | None:
        return self._store.last_failure


class Leases:
    """Each lease granted to a replica, and when (simulated monotonic time) it was last
    granted or refreshed, with the TTL etcd answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[int, tuple[Any, float]] = {}

    def note(self, call: str, args: tuple[Any, ...], result: Any, mono: float) -> None:
        with self._lock:
            if call == "campaign" and result is not None:
                self._until[result.id] = (result, mono + float(args[1]))
            elif call == "refresh" and args and args[0].id in self._until:
                if result > 0:
                    self._until[args[0].id] = (args[0], mono + float(result))
            elif call == "resign" and args:
                self._until.pop(args[0].id, None)

    def expired(self, mono: float) -> list[Any]:
        with self._lock:
            return [lease for lease, until in self._until.values() if until <= mono]

    def drop(self, lease: Any) -> None:
        with self._lock:
            self._until.pop(lease.id, None)


@dataclass
class Replica:
    holder: str
    reconciler: Reconciler | None = None
    dead: bool = False
    cut: bool = False
    killed_at_step: int | None = None
    kill_pending: bool = False
    """Killed at some call of its next pass (a crash point), or at its end."""


@dataclass
class World:
    seed: int
    store: EtcdStore
    probe: EtcdStore
    """A second etcd client: who holds the leader key when a write is sent."""
    dag_ids: list[str]
    settings: LoopSettings
    faults: Any = None
    """faults.FaultPlan (set by the runner)."""
    time: SimTime = field(default_factory=SimTime)
    step: int = 0
    events: list[Event] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    later: list[Callable[[], Any]] = field(default_factory=list)
    """Requests that reach Airflow after their client gave up (the `delayed` fault)."""
    leases: Leases = field(default_factory=lambda: Leases())
    tasks_done: dict[tuple[str, str, str], datetime] = field(default_factory=dict)
    """Runs still running whose every task has succeeded (the eager path), and when."""
    injected: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    violations: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _holders: int = 0

    generation: str = "v2"
    """Which Airflow the seed runs against (GENERATIONS): its fake and its client."""
    deployments: dict[str, str] = field(default_factory=dict)
    """Several deployments (name -> its generation), the first the graph's default: one
    fake Airflow each (every DAG of the universe deployed in each, as during a
    migration), replicas on an `AirflowFleet`. Empty: one Airflow (`generation`), the
    implicit deployment, as before deployments were declared."""
    down: dict[str, str] = field(default_factory=dict)
    """Deployments failing every request now (faults.py): name -> how (refused, 503,
    hang, 401, 403)."""

    def __post_init__(self) -> None:
        for generation in (self.generation, *self.deployments.values()):
            if generation not in GENERATIONS:
                raise ValueError(f"unknown generation {generation!r}")
        if self.deployments:
            self.generation = next(iter(self.deployments.values()))
        names = list(self.deployments) or [""]
        self.fakes: dict[str, FakeAirflow] = {
            name: self._make_fake(self.deployments.get(name, self.generation))
            for name in names}
        self.fake: FakeAirflow = self.fakes[names[0]]
        """The (first) deployment's fake Airflow."""

    def _make_fake(self, generation: str) -> FakeAirflow:
        version = GENERATIONS[generation]
        return (FakeAirflow(self.dag_ids, now=self.time.airflow) if version is None
                else FakeAirflowV1(self.dag_ids, now=self.time.airflow, version=version))

    # --- deployments ----------------------------------------------------------------------

    def declarations(self) -> list[Deployment]:
        """The deployments as the graph declares them (none for a one-Airflow seed)."""
        return [Deployment(name, f"http://{name}.sim",
                           api="v2" if GENERATIONS[gen] is None else "v1",
                           auth={"kind": "password", "username": "admin",
                                 "password_env": f"{name.upper()}_PASSWORD"},
                           default=i == 0)
                for i, (name, gen) in enumerate(self.deployments.items())]

    def generation_of(self, deployment: str) -> str:
        return self.deployments.get(deployment, self.generation)

    def fake_of(self, deployment: str) -> FakeAirflow:
        return self.fakes[deployment]

    def all_runs(self) -> list[tuple[str, Any]]:
        """(deployment, run) of every deployment's fake, in a fixed order (not the fakes'
        ids: concurrent triggers get them in thread order)."""
        return sorted(((d, r) for d, fake in self.fakes.items() for r in fake.runs()),
                      key=lambda dr: (dr[1].dag_id, dr[1].run_id, dr[0]))

    def find_run(self, dag_id: str, run_id: str) -> tuple[str, Any] | None:
        """The run in whichever deployment has it (the first, if two have: a violation
        invariants.py reports on its own)."""
        for deployment, fake in self.fakes.items():
            run = fake.run(dag_id, run_id)
            if run is not None:
                return deployment, run
        return None

    # --- replicas -----------------------------------------------------------------------

    def new_replica(self) -> Replica:
        self._holders += 1
        replica = Replica(f"sim-{self.seed}-r{self._holders}")
        # Every clock of the client on the simulated timeline (its deadlines, its retries'
        # waits, Airflow's clock carried forward from the Date header), and no watchdog
        # thread (no socket to shut): real time, and so the machine's load, never reaches
        # a seed's decisions.
        clock = self.time.reconciler

        def client(deployment: str) -> Any:
            settings = AirflowSettings(url=f"http://{deployment or 'airflow'}.sim",
                                       username="admin", password="secret-pw", timeout=2,
                                       retries=3)
            wiring: dict[str, Any] = {
                "session": SimSession(self, replica, deployment), "backoff_initial": 0.2,
                "backoff_max": 2.0, "clock": clock,
                "watchdog": Watchdog(clock.monotonic, threaded=False)}
            version = GENERATIONS[self.generation_of(deployment)]
            return (AirflowClient(settings, **wiring) if version is None
                    else AirflowV1Client(settings, airflow_version=version, **wiring))

        api: Any
        if self.deployments:
            # As `reconciler loop` wires it (cli/loop_cmds.py airflow_fleet): the default
            # client first, a client per declared deployment made on its first call.
            api = AirflowFleet(client(next(iter(self.deployments))),
                               lambda declaration: client(declaration.name))
        else:
            api = client("")
        replica.reconciler = Reconciler(SimStore(self.store, self, replica),  # type: ignore[arg-type]
                                        api, self.settings, holder=replica.holder,
                                        clock=self.time.reconciler)
        # Deployments are listed in turn, not on threads: the replay of a seed must not
        # depend on thread timing (the merge is the same: in the main thread, in order).
        replica.reconciler.observer.concurrent_listing = False
        self.replicas.append(replica)
        return replica

    def kill(self, replica: Replica) -> None:
        """kill -9: nothing of it runs on; its lease lapses after the TTL."""
        if replica.dead:
            return
        replica.dead = True
        replica.killed_at_step = self.step
        self.injected["replica:killed"] += 1
        r = replica.reconciler
        if r is not None:
            pool = r.executor._pool
            if pool is not None:
                pool.shutdown(wait=False)

    def crash_point(self, replica: Replica, where: str) -> None:
        if replica.dead:
            raise Killed(replica.holder)
        if replica.kill_pending and self.faults is not None and \
                self.faults.kill_here(replica.holder, self.step, where):
            replica.kill_pending = False
            self.kill(replica)
            raise Killed(f"{replica.holder} at {where}")

    def lapse_leases(self) -> None:
        """etcd lets a lease go TTL seconds after its last refresh: in simulated time here
        (a seed lasts a real second or two), so the lease of a killed, cut-off or stuck
        replica lapses when it would."""
        for lease in self.leases.expired(self.time.monotonic()):
            try:
                self.store.resign(lease)
            except StoreError:
                continue  # etcd down: tried again on the next step
            self.leases.drop(lease)

    def notify_watches(self, head: bool = False, suspended: bool = False) -> None:
        """The etcd watches of the live replicas fire (head or suspend marks changed)."""
        for replica in self.replicas:
            r = replica.reconciler
            if replica.dead or r is None or replica.cut:
                continue
            if head:
                r.observer.head_dirty.set()
            if suspended:
                r.observer.suspended_dirty.set()

    def relative(self, text: str) -> str:
        """`text` with each timestamp as seconds since the seed started: what a fault is
        drawn from, so that a replay on another day draws the same faults."""
        start = self.time.true_now() - timedelta(seconds=self.time.elapsed)

        def offset(match: re.Match[str]) -> str:
            at = parse_time(match.group(0))
            return match.group(0) if at is None else f"T{(at - start).total_seconds():+.0f}"

        return _TIMESTAMP.sub(offset, text)

    # --- the eager path: task-level events and task instances ------------------------

    def all_tasks_done(self, dag_id: str, run_id: str, deployment: str = "") -> None:
        """Every task of a running run succeeded; the scheduler has not closed it yet.
        The listener plugin writes a task-level event to etcd (under `@<deployment>/`
        when several are declared); the watch delivers it."""
        now = self.time.airflow()
        self.tasks_done[(deployment, dag_id, run_id)] = now
        run = self.fake_of(deployment).run(dag_id, run_id)
        self.add(Event(now, "tasks-done", dag_id, run_id,
                       run.logical_date if run else None, by="scheduler",
                       deployment=deployment))
        key = (self.store.key("events", f"@{deployment}", dag_id, run_id) if deployment
               else self.store.event_key(dag_id, run_id))
        value = json.dumps({"kind": "task", "dag_id": dag_id, "run_id": run_id,
                            "task_id": "work", "state": "success"}).encode()
        try:
            self.store.put(key, value)
        except StoreError:
            return  # the plugin could not write it: the run's own end will do
        for replica in self.replicas:
            r = replica.reconciler
            if not replica.dead and not replica.cut and r is not None:
                r.observer.on_event(key, value)

    def task_instance_batch(self, body: Any, deployment: str = ""
                            ) -> tuple[int, dict[str, Any]]:
        """The answer of POST .../taskInstances/list: the task of every run whose DAG is
        in `dag_ids` and whose id is in `dag_run_ids` (filtered apart, as Airflow does),
        paged by `page_offset`/`page_limit`."""
        if not isinstance(body, dict):
            return 422, {"detail": "the body is not an object"}
        dag_ids, run_ids = set(body.get("dag_ids") or ()), set(body.get("dag_run_ids") or ())
        tis = []
        for run in sorted(self.fake_of(deployment).runs(), key=lambda r: (r.dag_id, r.run_id)):
            if run.dag_id in dag_ids and run.run_id in run_ids:
                status, one = self.task_instances(run.dag_id, run.run_id, deployment)
                if status == 200:
                    tis.extend({**ti, "dag_id": run.dag_id, "dag_run_id": run.run_id}
                               for ti in one["task_instances"])
        offset, limit = int(body.get("page_offset") or 0), int(body.get("page_limit") or 100)
        return 200, {"task_instances": tis[offset:offset + limit], "total_entries": len(tis)}

    def task_instances(self, dag_id: str, run_id: str, deployment: str = ""
                       ) -> tuple[int, dict[str, Any]]:
        """The answer of GET .../taskInstances: one task, done or not."""
        run = self.fake_of(deployment).run(dag_id, run_id)
        if run is None:
            return 404, {"detail": "not found"}
        done = self.tasks_done.get((deployment, dag_id, run_id))
        if run.state == "success":
            state, end = "success", run.end_date
        elif done is not None and run.state == "running":
            state, end = "success", done
        else:
            state, end = ("failed" if run.state == "failed" else "running"), run.end_date
        ti = {"task_id": "work", "map_index": -1, "state": state, "try_number": 1,
              "start_date": run.start_date.isoformat() if run.start_date else None,
              "end_date": end.isoformat() if end else None}
        return 200, {"task_instances": [ti], "total_entries": 1}

    # --- the history --------------------------------------------------------------------

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def leader_now(self) -> str | None:
        try:
            return self.probe.leader() or ""
        except StoreError:
            return None

    def add(self, event: Event) -> None:
        with self._lock:
            event.step = self.step
            self.events.append(event)

    def run_state_before_clear(self, path: str, deployment: str = ""
                               ) -> tuple[str, datetime | None] | None:
        parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
        run = self.fake_of(deployment).run(parts[3], parts[5]) if len(parts) >= 6 else None
        return None if run is None else (run.state, run.end_date)

    def record_write(self, replica: Replica, route: str, path: str, body: bytes,
                     answer: bytes, duplicate: bool, before: Any, leader: str | None,
                     deployment: str = "") -> None:
        parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
        dag_id = parts[3]
        r = replica.reconciler
        desired = r.observer.desired if r is not None else None
        commit = desired.commit[:12] if desired is not None else ""
        if route == TRIGGER:
            data = json.loads(body)
            # v1 sends the date as `execution_date`
            when = data.get("logical_date") or data.get("execution_date")
            self.add(Event(self.time.airflow(), "create", dag_id, data["dag_run_id"],
                           parse_time(when), by=replica.holder,
                           duplicate=duplicate, leader=leader, deployment=deployment,
                           commit=commit))
            self.actions["trigger"] += 0 if duplicate else 1
        elif route == CLEAR:
            run = self.fake_of(deployment).run(dag_id, parts[5])
            self.add(Event(self.time.airflow(), "clear", dag_id, parts[5],
                           run.logical_date if run else None, by=replica.holder,
                           state=before[0] if before else "", duplicate=duplicate,
                           leader=leader, deployment=deployment, commit=commit))
            self.actions["clear"] += 0 if duplicate else 1

    def violation(self, kind: str, detail: str) -> None:
        with self._lock:
            self.violations.append((kind, detail))


class LogWatch(logging.Handler):
    """Every log record with a traceback (exc_info) while a seed runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            with contextlib.suppress(Exception):
                self.tracebacks.append(f"{record.name}: {record.getMessage()}: "
                                       f"{record.exc_info[1]!r}")
