"""One seed of the fault simulation, start to verdict: `run_seed(seed, env)`.

A seed draws everything from `random.Random(seed)`: the Airflow it runs against (API v2,
or v1 of Airflow 2.11 or 2.5: `generation_of`; a third of the seeds two deployments,
`deployments_of`), the workload (workload.py), the fault
schedule (faults.py), the loop's settings (1-3 replicas, concurrency 1 or 4, relist
interval). Then, step by step (one step = one loop interval of simulated time):

1. requests that reached Airflow late (`delayed`) take effect; killed replicas' leases
   lapse once their TTL has passed; scheduled faults start or heal;
2. the workload moves (roots, scheduler, users, graph changes and syncs);
3. each live replica runs one pass (`Reconciler.run_pass`), in a seeded order; a killed
   replica is replaced by a new one (a new holder id) two steps later.

After `fault_steps` steps every fault heals and the quiet steps run (no workload but
Airflow's scheduler) until nothing is left to do, at least one relist interval long.
Then invariants.py judges the history, and a pass that died of an error outside the
reconciler's error hierarchy, or a traceback in the logs, is a violation too.

A seed is replayed by running it again: `replay_command(seed)`. The real etcd (its
timing, its elections) is the one thing a seed does not fix, so a replay takes the same
decisions but etcd may answer a little differently.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from reconciler.adapters.store import EtcdStore, StoreError
from reconciler.core.errors import LostLeadership, ReconcilerError
from reconciler.core.settings import EtcdSettings, LoopSettings
from tests.sim.faults import FaultPlan, Injector
from tests.sim.invariants import Checker
from tests.sim.transport import Killed, Runaway, stable_random
from tests.sim.workload import Workload
from tests.sim.world import GENERATIONS, LogWatch, Replica, World

if TYPE_CHECKING:
    from tests.fixtures.etcd import EtcdCluster

INTERVAL = 5.0
FAULT_STEPS = 24
QUIET_STEPS_MAX = 60
CALM_STEPS = 14
"""Quiet steps with nothing to do before the end: longer than the longest backoff of an
action (core/errors.py MAX_BACKOFF, 60 s), so a deferred action gets its retry."""
REPLAY = ".venv/bin/python benchmarks/bench_sim.py --seed {seed}"


def replay_command(seed: int, *, single: bool = False, two: bool | None = None) -> str:
    """The one command that runs `seed` again (`single`: it ran on one etcd server;
    `two`: it ran with two deployments, or with one, when that is not its own)."""
    forced = "" if two is None or two == bool(deployments_of(seed)) else (
        " --deployments two" if two else " --deployments one")
    return REPLAY.format(seed=seed) + (" --single" if single else "") + forced


@dataclass
class SimEnv:
    """Where seeds run: etcd settings (a fresh namespace per seed) and, for the etcd
    faults, the cluster those settings name."""

    etcd: EtcdSettings
    cluster: EtcdCluster | None = None


@dataclass
class SeedResult:
    seed: int
    seconds: float = 0.0
    steps: int = 0
    passes: int = 0
    replicas: int = 0
    faults: str = ""
    injected: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    violations: list[tuple[str, str]] = field(default_factory=list)
    single: bool = False
    """Ran on one etcd server (no etcd faults), not on the 3-member cluster."""
    generation: str = "v2"
    """The Airflow it ran against (world.GENERATIONS)."""
    deployments: dict[str, str] = field(default_factory=dict)
    """Two deployments (name -> generation), or none: one Airflow (`generation`)."""
    history: list[str] = field(default_factory=list)
    """Airflow's history, one line an event (a seed with violations only): what to read
    when a violation does not replay (the real etcd's timing differed)."""

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def airflow(self) -> str:
        """`API v2`, or the deployments: `af1 v1 + af2 v2`."""
        if not self.deployments:
            return f"API {self.generation}"
        return " + ".join(f"{n} {g}" for n, g in self.deployments.items())

    def report(self) -> str:
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s) in {self.steps} "
                 f"steps (Airflow {self.airflow}; {self.faults}); replay: "
                 f"{replay_command(self.seed, single=self.single, two=bool(self.deployments))}"]
        lines += [f"  {kind}: {detail}" for kind, detail in self.violations]
        return "\n".join(lines)


def generation_of(seed: int) -> str:
    """The Airflow the seed runs against (world.GENERATIONS): API v2 for half the seeds,
    API v1 of Airflow 2.11 and of 2.5 for a quarter each. Drawn on its own, so the rest
    of a seed's draws do not depend on it."""
    return stable_random(seed, "generation").choice(["v2", "v2", "v1", "v1-2.5"])


DEPLOYMENT_SHARE = 3
"""One seed in this many runs with two deployments."""


def deployments_of(seed: int, generation: str | None = None, *,
                   two: bool = False) -> dict[str, str]:
    """Two deployments for one seed in DEPLOYMENT_SHARE (`two`: for this one anyway;
    name -> generation: the seed's own first, the graph's default, then another
    generation), else none (one Airflow). Drawn on its own, as `generation_of`: a seed
    with one Airflow draws as it did before deployments were simulated."""
    rng = stable_random(seed, "deployments")
    if rng.randrange(DEPLOYMENT_SHARE) and not two:
        return {}
    first = generation or generation_of(seed)
    return {"af1": first, "af2": rng.choice(sorted(g for g in GENERATIONS if g != first))}


def run_seed(seed: int, env: SimEnv, *, fault_steps: int = FAULT_STEPS,
             calm: bool = False, replicas: int | None = None,
             generation: str | None = None,
             deployments: dict[str, str] | None = None) -> SeedResult:
    """Run one seed; `calm`: the same workload without any fault (the checker's control
    case); `replicas`: that many instead of the seed's 1-3; `generation`: that Airflow
    instead of the seed's (`generation_of`); `deployments`: these instead of the seed's
    (`deployments_of`; `{}`: one Airflow)."""
    started = time.monotonic()
    generation = generation or generation_of(seed)
    if deployments is None:
        deployments = deployments_of(seed, generation)
    rng = random.Random(seed)
    settings = LoopSettings(interval=INTERVAL, lease_ttl=10,
                            relist_interval=rng.choice([60.0, 120.0]),
                            concurrency=rng.choice([1, 4]),
                            eager=stable_random(seed, "eager").random() < 0.5,
                            window=timedelta(days=2))
    namespace = f"sim-{seed}-{random.getrandbits(32):08x}"
    # The loop's jitter (core/errors.py backoff, the client's retries) draws from the
    # global generator: seeded too, so that a replay backs off the same way.
    random.seed(seed)
    etcd = EtcdSettings(**{**env.etcd.__dict__, "namespace": namespace})
    store, probe = EtcdStore(etcd), EtcdStore(etcd)
    world = World(seed, store, probe, Workload.universe(seed), settings,
                  generation=generation, deployments=dict(deployments))
    workload = Workload.draw(world, rng)
    plan = FaultPlan.draw(seed, rng, fault_steps, etcd_faults=env.cluster is not None,
                          deployments=tuple(deployments))
    if calm:
        plan = FaultPlan(seed, fault_steps, (), 0.0, [])
    world.faults = plan
    injector = Injector(world, env.cluster, rng)
    result = SeedResult(seed, faults=plan.describe(), single=env.cluster is None,
                        generation=world.generation, deployments=dict(deployments))
    watch = LogWatch()
    logging.getLogger().addHandler(watch)
    try:
        # The graph is synced an hour before the first cycle (backfill: false holds).
        if not workload.sync(at=world.time.true_now() - timedelta(hours=1)):
            raise RuntimeError(f"seed {seed}: etcd refused the first sync")
        count = rng.randint(1, 3)
        for _ in range(replicas or count):
            world.new_replica()
        result.replicas = len(world.replicas)
        quiet_since: int | None = None
        calm_steps = 0
        min_quiet = int(settings.relist_interval / INTERVAL) + 4
        for step in range(1, fault_steps + QUIET_STEPS_MAX + 1):
            world.step = step
            world.time.advance(INTERVAL)
            late, world.later = world.later, []
            for deliver in late:
                deliver()
            world.lapse_leases()
            if step <= fault_steps:
                for fault in plan.scheduled:
                    if fault.step == step:
                        injector.start(fault)
                injector.heal_due()
                workload.step()
                workload.schedule()
            else:
                if quiet_since is None:
                    quiet_since = step
                    plan.active = False
                    injector.heal_due(everything=True)
                workload.settle()
                workload.schedule(finish=True)
            actions_before = sum(world.actions.values())
            order = [r for r in world.replicas if not r.dead]
            rng.shuffle(order)
            for replica in order:
                result.passes += 1
                _pass(world, replica)
            for replica in list(world.replicas):
                if replica.dead and replica.killed_at_step is not None \
                        and step >= replica.killed_at_step + 2:
                    world.replicas.remove(replica)
                    world.new_replica()
            if quiet_since is not None:
                busy = any(r.state in ("queued", "running") for _, r in world.all_runs())
                acted = sum(world.actions.values()) != actions_before
                idle = not (busy or acted or world.later or workload.unsynced
                            or workload.suspend_unsure)
                calm_steps = calm_steps + 1 if idle else 0
                if step - quiet_since >= min_quiet and calm_steps >= CALM_STEPS:
                    break
        result.steps = world.step
        checker = Checker(world, workload)
        checker.replay()
        checker.check_final()
        for text in watch.tracebacks:
            world.violation("traceback-logged", text)
    finally:
        logging.getLogger().removeHandler(watch)
        if env.cluster is not None:
            injector.heal_due(everything=True)
        for replica in world.replicas:
            if replica.reconciler is not None:
                replica.dead = True
                pool = replica.reconciler.executor._pool
                if pool is not None:
                    pool.shutdown(wait=False)
        with contextlib.suppress(StoreError):
            store.delete_prefix(store.root)
        store.close()
        probe.close()
    result.injected = world.injected
    result.actions = world.actions
    result.violations = _dedupe(world.violations)
    if result.violations:
        result.history = [
            f"step {e.step} {world.relative(e.at.isoformat())} {e.kind} "
            f"{e.deployment + ':' if e.deployment else ''}{e.dag_id} "
            f"{e.run_id} by={e.by}{' state=' + e.state if e.state else ''}"
            f"{' duplicate' if e.duplicate else ''} leader={e.leader}"
            f"{' commit=' + e.commit if e.commit else ''}"
            for e in world.events]
        result.history += [
            f"graph {v.commit[:12]} synced at step {v.step} (announced {v.announced})"
            + (": " + " ".join(f"{n}@{v.graph.deployment_of(n)}" for n in v.graph.pipelines)
               if deployments else "")
            for v in workload.versions]
    result.seconds = time.monotonic() - started
    return result


def _pass(world: World, replica: Replica) -> None:
    r = replica.reconciler
    assert r is not None
    try:
        r.run_pass()
    except Killed:
        pass
    except Runaway as exc:
        world.violation("unbounded-listing", str(exc))
        world.kill(replica)  # it would hang there for ever
    except LostLeadership as exc:
        r.leadership.lost(str(exc))
    except ReconcilerError:
        pass  # the runner backs off and tries again: expected under faults
    except Exception as exc:
        # Where in the reconciler it came from: its innermost three frames.
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "/reconciler/" in f.filename][-3:]
        where = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                           for f in reversed(frames))
        world.violation("unexpected-error",
                        f"step {world.step}: {replica.holder}: {exc!r} at {where}")
    if replica.kill_pending and not replica.dead:
        replica.kill_pending = False
        world.kill(replica)


def _dedupe(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for v in violations:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out
