"""The random workload of one seed: a graph, its changes, root runs, Airflow's scheduler
and the users.

- The graph: one or two roots and 4-12 pipelines, each depending on earlier ones as a
  chain, a fan-out from one upstream, or a fan-in of 2-4 (some `all_done`). Its changes,
  mid-cycle: a pipeline added (with or without backfill), removed, disabled or enabled,
  rewired, suspended or resumed (`suspended/<dag|*>`). Each change is synced as CI
  would, as a new commit: head, graph, since-map and history in one guarded transaction
  (`EtcdStore.write_sync`, as `reconciler sync` writes them); a sync that meets an etcd
  fault is retried on the next step.
- Roots open cycles (scheduled runs; two roots sometimes on the same logical date).
- Airflow's scheduler starts queued runs and ends running ones, some failed.
- Users clear finished runs (re-runs, upstreams included) and retry failed ones.
- Several deployments (a seed with them, runner.py `deployments_of`): each pipeline is
  placed in one (`placement`, drawn per pipeline, so edges cross back and forth), the
  graph declares them; half such seeds move one pipeline to the other deployment
  mid-seed (a new commit synced). Drawn from generators of their own: the rest of the
  workload is the one the seed had before deployments.

Every change of Airflow's state is recorded in the world's history.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from reconciler.adapters.store import StoreError
from reconciler.core.graph import Graph, Pipeline
from reconciler.service.sync import build_head, carry_since
from tests.sim.transport import stable_random
from tests.sim.world import Event, World


@dataclass
class Version:
    """A graph as synced, and when (the simulation's step)."""

    step: int
    commit: str
    graph: Graph
    since: dict[str, datetime]
    notified: int | None = None
    """The step the replicas' watches were told of it, when later than `step`: a sync
    whose write timed out but was applied is only found out (and announced) when the
    sync is tried again; until then a replica may plan with the graph before it."""

    @property
    def announced(self) -> int:
        return self.step if self.notified is None else max(self.step, self.notified)


@dataclass
class Workload:
    world: World
    rng: random.Random
    roots: list[str]
    order: list[str]
    """Every dag id that may ever be in the graph, upstreams before downstreams."""
    pipelines: dict[str, Pipeline]
    versions: list[Version] = field(default_factory=list)
    suspended: set[str] = field(default_factory=set)
    fail_rate: dict[str, float] = field(default_factory=dict)
    unsynced: bool = False
    """A change waits to be synced (the last attempt met an etcd fault)."""
    pending: Version | None = None
    """The sync whose write met an etcd fault: a timed-out write may still be applied
    (etcd resumes and commits it), so the next attempt looks before writing again."""
    suspend_unsure: bool = False
    """A suspend or resume write met an etcd fault: applied or not, etcd will tell."""
    placement: dict[str, str] = field(default_factory=dict)
    """Several deployments: pipeline -> the deployment it runs in (empty: one Airflow)."""
    move_at: int | None = None
    """The step a pipeline moves to the other deployment at (None: none moves)."""

    @classmethod
    def draw(cls, world: World, rng: random.Random) -> Workload:
        roots = ["root_a", "root_b"][:rng.choice([1, 1, 2])]
        nodes = [f"p{i:02d}" for i in range(rng.randint(4, 12))]
        spare = [f"q{i:02d}" for i in range(4)]
        pipelines = {r: Pipeline(r) for r in roots}
        for i, name in enumerate(nodes):
            pipelines[name] = Pipeline(name, depends_on=_upstreams(rng, roots, nodes[:i]),
                                       trigger_rule="all_done" if rng.random() < 0.15
                                       else "all_success", conf={"n": i})
        w = cls(world, rng, roots, roots + nodes + spare, pipelines)
        w.fail_rate = {d: rng.choice([0.0, 0.0, 0.1, 0.3]) for d in w.order}
        names = list(world.deployments)
        if names:
            split = stable_random(world.seed, "placement")
            w.placement = {d: split.choice(names) for d in w.order}
            if len({w.placement[d] for d in pipelines}) < 2:  # each runs something
                w.placement[nodes[-1]] = next(n for n in names
                                              if n != w.placement[nodes[-1]])
            moving = stable_random(world.seed, "move")
            if moving.random() < 0.5:
                w.move_at = moving.randint(3, 18)
        return w

    @staticmethod
    def universe(rng_seed: int) -> list[str]:
        return ["root_a", "root_b"] + [f"p{i:02d}" for i in range(12)] + \
            [f"q{i:02d}" for i in range(4)]

    # --- the graph ----------------------------------------------------------------------

    def sync(self, *, at: datetime | None = None) -> bool:
        """Sync the current graph as a new commit; False when etcd refused (retried)."""
        world = self.world
        graph = Graph((replace(p, deployment=self.placement[d])
                       for d, p in self.pipelines.items()) if self.placement
                      else self.pipelines.values(), deployments=world.declarations())
        now = at or world.time.true_now()
        try:
            head, mod_revision = world.store.read_head()
            pending, self.pending = self.pending, None
            if pending is not None and head is not None and head.commit == pending.commit:
                # The write that "failed" was applied: the reconciler has been planning
                # with that graph since, so the oracle must judge with it too.
                self.versions.append(replace(pending, notified=world.step))
                if pending.graph.digest() == graph.digest():
                    self.unsynced = False
                    world.notify_watches(head=True)
                    return True
            commit = hashlib.sha1(f"{world.seed}:{len(self.versions)}:{graph.digest()}"
                                  .encode()).hexdigest()
            previous = self.versions[-1].since if self.versions else {}
            since = carry_since(previous, graph.pipelines, now)
            self.pending = Version(world.step, commit, graph, since)
            world.store.write_sync(build_head(commit, graph.digest(), now=now, source="sim",
                                              previous=head, forced=False),
                                   mod_revision, graph.compressed(), since, split=True)
        except StoreError:
            self.unsynced = True
            return False
        self.unsynced = False
        self.pending = None
        self.versions.append(Version(world.step, commit, graph, since))
        world.notify_watches(head=True)
        world.injected["workload:sync"] += 1
        return True

    def change_graph(self) -> None:
        rng = self.rng
        present = [d for d in self.order if d in self.pipelines]
        non_roots = [d for d in present if d not in self.roots]
        absent = [d for d in self.order if d not in self.pipelines and d not in self.roots]
        what = rng.choice(["add", "remove", "toggle", "rewire", "rule"])
        if what == "add" and absent:
            name = rng.choice(absent)
            earlier = [d for d in present if self.order.index(d) < self.order.index(name)]
            ups = _upstreams(rng, [r for r in self.roots if r in earlier],
                             [d for d in earlier if d not in self.roots])
            self.pipelines[name] = Pipeline(name, depends_on=ups,
                                            backfill=rng.random() < 0.5)
        elif what == "remove" and len(non_roots) > 1:
            name = rng.choice(non_roots)
            gone = self.pipelines.pop(name)
            for other, p in list(self.pipelines.items()):
                if name in p.depends_on:
                    ups = tuple(u for u in p.depends_on if u != name) or gone.depends_on
                    self.pipelines[other] = replace(p, depends_on=tuple(sorted(set(ups))))
        elif what == "toggle" and non_roots:
            name = rng.choice(non_roots)
            p = self.pipelines[name]
            self.pipelines[name] = replace(p, enabled=not p.enabled)
        elif what == "rewire" and non_roots:
            name = rng.choice(non_roots)
            earlier = [d for d in present if self.order.index(d) < self.order.index(name)]
            ups = _upstreams(rng, [r for r in self.roots if r in earlier],
                             [d for d in earlier if d not in self.roots])
            self.pipelines[name] = replace(self.pipelines[name], depends_on=ups)
        elif what == "rule" and non_roots:
            name = rng.choice(non_roots)
            p = self.pipelines[name]
            self.pipelines[name] = replace(p, trigger_rule="all_done"
                                           if p.trigger_rule == "all_success"
                                           else "all_success")
        else:
            return
        self.world.injected[f"workload:graph-{what}"] += 1
        self.sync()

    def move(self) -> None:
        """One pipeline (not a root: Airflow schedules those) moves to the other
        deployment, as a migration moves it: one line of its YAML, a new commit synced.
        Both deployments have its DAG."""
        present = [d for d in self.order if d in self.pipelines and d not in self.roots]
        if not present:
            return
        name = stable_random(self.world.seed, "moved").choice(present)
        self.placement[name] = next(n for n in self.world.deployments
                                    if n != self.placement[name])
        self.world.injected["workload:graph-move"] += 1
        self.sync()

    def deployment_of(self, dag_id: str) -> str:
        return self.placement.get(dag_id, "")

    def suspend_or_resume(self) -> None:
        world, rng = self.world, self.rng
        try:
            if self.suspended and rng.random() < 0.6:
                target = rng.choice(sorted(self.suspended))
                world.store.delete_suspend(target)
                self.suspended.discard(target)
                world.injected["workload:resume"] += 1
            else:
                non_roots = [d for d in self.pipelines if d not in self.roots]
                target = "*" if rng.random() < 0.2 else rng.choice(non_roots)
                world.store.put_suspend(target, {"by": "sim", "at": "", "reason": "sim"})
                self.suspended.add(target)
                world.injected["workload:suspend"] += 1
        except StoreError:
            # A timed-out put or delete may still be applied: read etcd's marks back.
            self.suspend_unsure = True
            return
        world.notify_watches(suspended=True)

    def settle(self) -> None:
        """Retry what an etcd fault left uncertain: the pending sync, and the suspend
        marks, which the oracle then takes from etcd (what the reconciler reads)."""
        if self.unsynced:
            self.sync()
        if self.suspend_unsure:
            try:
                marks = self.world.store.read_suspended()
            except StoreError:
                return
            self.suspend_unsure = False
            if set(marks) != self.suspended:
                self.suspended = set(marks)
                self.world.notify_watches(suspended=True)

    # --- Airflow's side -----------------------------------------------------------------

    def open_cycles(self) -> None:
        world, rng = self.world, self.rng
        now = world.time.airflow()
        logical = now.replace(microsecond=0) - timedelta(seconds=rng.randint(0, 3) * 60)
        which = [r for r in self.roots if rng.random() < 0.5] or [rng.choice(self.roots)]
        for root in which:
            run_id = f"scheduled__{logical.isoformat()}"
            deployment = self.deployment_of(root)
            fake = world.fake_of(deployment)
            if fake.run(root, run_id) is not None:
                continue
            fake.add_run(root, run_id, logical, run_type="scheduled", queued_at=now,
                         run_after=now)
            world.add(Event(now, "root", root, run_id, logical, by="scheduler",
                            deployment=deployment))
            world.injected["workload:root-run"] += 1

    def schedule(self, *, finish: bool = False) -> None:
        """Airflow's scheduler: queued runs start, running ones end (some failed)."""
        world, rng = self.world, self.rng
        now = world.time.airflow()
        # In a fixed order (world.all_runs), so a seed draws the same numbers every time.
        for deployment, run in world.all_runs():
            fake = world.fake_of(deployment)
            key = (deployment, run.dag_id, run.run_id)
            if run.state == "queued" and (finish or rng.random() < 0.7):
                world.tasks_done.pop(key, None)
                fake.advance(run.dag_id, run.run_id, "running", at=now)
                world.add(Event(now, "start", run.dag_id, run.run_id, run.logical_date,
                                by="scheduler", deployment=deployment))
            elif run.state == "running" and key not in world.tasks_done \
                    and (finish or rng.random() < 0.5):
                if rng.random() < self.fail_rate.get(run.dag_id, 0):
                    fake.advance(run.dag_id, run.run_id, "failed", at=now)
                    world.add(Event(now, "end", run.dag_id, run.run_id, run.logical_date,
                                    by="scheduler", state="failed", deployment=deployment))
                elif rng.random() < 0.5:
                    world.all_tasks_done(run.dag_id, run.run_id, deployment)  # closed later
                else:
                    self._close(deployment, run.dag_id, run.run_id, now)
            elif run.state == "running" and (finish or rng.random() < 0.6):
                self._close(deployment, run.dag_id, run.run_id, now)

    def _close(self, deployment: str, dag_id: str, run_id: str, now: datetime) -> None:
        """The scheduler closes a run whose tasks all succeeded."""
        world = self.world
        run = world.fake_of(deployment).advance(dag_id, run_id, "success", at=now)
        world.tasks_done.pop((deployment, dag_id, run_id), None)
        world.add(Event(now, "end", dag_id, run_id, run.logical_date, by="scheduler",
                        state="success", deployment=deployment))

    def user_clears(self) -> None:
        """A user re-runs a finished run, or retries a failed one."""
        world, rng = self.world, self.rng
        finished = [(d, r) for d, r in world.all_runs() if r.state in ("success", "failed")]
        failed = [(d, r) for d, r in finished if r.state == "failed"]
        pick = None
        if failed and rng.random() < 0.3:
            pick = rng.choice(failed)
        elif finished and rng.random() < 0.1:
            pick = rng.choice(finished)
        if pick is None:
            return
        deployment, run = pick
        now = world.time.airflow()
        before = run.state
        world.tasks_done.pop((deployment, run.dag_id, run.run_id), None)
        world.fake_of(deployment).advance(run.dag_id, run.run_id, "queued", at=now)
        world.add(Event(now, "user-clear", run.dag_id, run.run_id, run.logical_date,
                        by="user", state=before, deployment=deployment))
        world.injected["workload:user-clear"] += 1

    def step(self) -> None:
        rng = self.rng
        self.settle()
        if rng.random() < 0.25:
            self.open_cycles()
        self.user_clears()
        if rng.random() < 0.08:
            self.change_graph()
        if rng.random() < 0.04:
            self.suspend_or_resume()
        if self.world.step == self.move_at:
            self.move()


def _upstreams(rng: random.Random, roots: list[str], earlier: list[str]) -> tuple[str, ...]:
    """A chain (the previous one), a fan-out (one of the earlier), or a fan-in (2-4)."""
    candidates = roots + earlier
    shape = rng.random()
    if shape < 0.35 and earlier:
        return (earlier[-1],)
    if shape < 0.6 or len(candidates) < 2:
        return (rng.choice(candidates),)
    return tuple(sorted(rng.sample(candidates, min(len(candidates), rng.randint(2, 4)))))
