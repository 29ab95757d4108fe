"""The fault schedule of one seed, drawn from the seed alone.

Two kinds of faults:

- Per request (Airflow, transport.py): each seed picks a few kinds of AIRFLOW_FAULTS and
  a rate; while faults are on, each request draws from a hash of (seed, step, replica,
  route, index) whether it is hit and by which kind.
- Per step (`Scheduled`): etcd paused, a member killed, the etcd leader lost (real etcd:
  a 3-member cluster, tests/fixtures/etcd.py), a replica cut off from etcd, a replica
  killed (-9, at a random call of its next pass), the reconciler's clock stepped, skew
  between its clock and Airflow's. Each has a heal step; `heal_all` ends every fault.

- Per deployment (a seed with several, runner.py `deployments_of`): one deployment down
  for a while (every request refused, answered 503, or hanging past the client's
  timeout: `deployment-down`) or refusing the credentials (401 or 403:
  `deployment-auth`), the others answering; then it comes back. Drawn from a generator
  of their own (`stable_random(seed, "deployments")`), so the rest of the schedule is
  the one the seed had before deployments (the per-request faults too, per deployment).

All faults are injected during the first `fault_steps` steps; then everything heals and
the quiet steps begin (runner.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.fixtures.etcd import EtcdServer
from tests.sim.transport import AIRFLOW_FAULTS, LIST_ONLY, LISTINGS, WRITE_ONLY, stable_random

if TYPE_CHECKING:
    from tests.fixtures.etcd import EtcdCluster
    from tests.sim.world import World

STEP_FAULTS = ("etcd-pause", "etcd-pause-member", "etcd-kill-member", "etcd-leader-loss",
               "replica-cut", "replica-kill", "clock-jump", "clock-skew")
ETCD_FAULTS = {"etcd-pause", "etcd-pause-member", "etcd-kill-member", "etcd-leader-loss"}
DEPLOYMENT_FAULTS = {"deployment-down": ("refused", "503", "hang"),
                     "deployment-auth": ("401", "403")}
"""Kind -> how its requests fail."""


@dataclass(frozen=True)
class Scheduled:
    step: int
    kind: str
    lasts: int
    """Steps until it heals."""
    amount: float = 0.0
    """clock-jump / clock-skew: seconds."""
    target: str = ""
    """deployment-*: the deployment."""
    how: str = ""
    """deployment-*: how its requests fail (DEPLOYMENT_FAULTS)."""


@dataclass
class FaultPlan:
    seed: int
    fault_steps: int
    airflow_kinds: tuple[str, ...]
    airflow_rate: float
    scheduled: list[Scheduled]
    active: bool = True
    _kills: dict[tuple[str, int], int] = field(default_factory=dict)

    @classmethod
    def draw(cls, seed: int, rng: random.Random, fault_steps: int, *,
             etcd_faults: bool, deployments: tuple[str, ...] = ()) -> FaultPlan:
        kinds = tuple(sorted(rng.sample(AIRFLOW_FAULTS, rng.randint(2, 6))))
        rate = rng.choice([0.03, 0.06, 0.1, 0.2])
        allowed = [k for k in STEP_FAULTS if etcd_faults or k not in ETCD_FAULTS]
        scheduled: list[Scheduled] = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(allowed)
            if kind in ETCD_FAULTS and any(s.kind in ETCD_FAULTS for s in scheduled):
                continue  # one real-etcd fault a seed: each costs real seconds
            amount = 0.0
            if kind == "clock-jump":
                amount = rng.choice([-1, 1]) * rng.uniform(30, 1800)
            elif kind == "clock-skew":
                amount = rng.choice([-1, 1]) * rng.uniform(5, 3600)
            step = rng.randint(1, max(1, fault_steps - 2))
            lasts = rng.randint(1, 3) if kind in ETCD_FAULTS else rng.randint(1, 6)
            scheduled.append(Scheduled(step, kind, lasts, amount))
        if deployments:
            scheduled += draw_deployment_faults(seed, fault_steps, deployments)
        scheduled.sort(key=lambda s: (s.step, s.kind, s.target))
        return cls(seed, fault_steps, kinds, rate, scheduled)

    def airflow_fault(self, holder: str, route: str, path: str, n: int, is_write: bool,
                      step: int = 0) -> str | None:
        if not self.active:
            return None
        rng = stable_random(self.seed, step, holder, path, n)
        if rng.random() >= self.airflow_rate:
            return None
        kinds = [k for k in self.airflow_kinds
                 if (is_write or k not in WRITE_ONLY) and (route in LISTINGS or k not in LIST_ONLY)]
        return rng.choice(kinds) if kinds else None

    def kill_here(self, holder: str, step: int, where: str) -> bool:
        n = self._kills.get((holder, step), 0)
        self._kills[(holder, step)] = n + 1
        return stable_random(self.seed, "kill", holder, step, where, n).random() < 0.2

    def describe(self) -> str:
        steps = ", ".join(f"{s.kind}{f'({s.target} {s.how})' if s.target else ''}"
                          f"@{s.step}+{s.lasts}" for s in self.scheduled)
        return (f"airflow {'/'.join(self.airflow_kinds)} at {self.airflow_rate:.0%}; "
                f"{steps or 'no step faults'}")


def draw_deployment_faults(seed: int, fault_steps: int, deployments: tuple[str, ...]
                           ) -> list[Scheduled]:
    """1-3 deployment faults, each on one deployment for 2-8 steps (sometimes both down
    at once), from a generator of their own."""
    rng = stable_random(seed, "deployment-faults")
    out = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(sorted(DEPLOYMENT_FAULTS))
        out.append(Scheduled(rng.randint(1, max(1, fault_steps - 2)), kind,
                             rng.randint(2, 8), target=rng.choice(deployments),
                             how=rng.choice(DEPLOYMENT_FAULTS[kind])))
    return out


class Injector:
    """Applies the scheduled faults to the world (and the real etcd), and heals them."""

    def __init__(self, world: World, cluster: EtcdCluster | None,
                 rng: random.Random) -> None:
        self.world = world
        self.cluster = cluster
        self.rng = rng
        self.healing: list[tuple[int, str, object]] = []
        self.etcd_hit = False

    def start(self, fault: Scheduled) -> None:
        world, cluster = self.world, self.cluster
        heal_at = world.step + fault.lasts
        kind = fault.kind
        if kind in ETCD_FAULTS and cluster is None:
            return
        world.injected[kind] += 1
        self.etcd_hit = self.etcd_hit or kind in ETCD_FAULTS
        if kind == "etcd-pause":
            assert cluster is not None
            for member in cluster.members:
                if member.running() and not member.paused:
                    member.pause()
            self.healing.append((heal_at, kind, None))
        elif kind == "etcd-pause-member":
            assert cluster is not None
            member = self.rng.choice([m for m in cluster.members if m.running()])
            if not member.paused:
                member.pause()
            self.healing.append((heal_at, kind, member))
        elif kind == "etcd-kill-member":
            assert cluster is not None
            member = self.rng.choice([m for m in cluster.members if m.running()])
            member.kill()
            self.healing.append((heal_at, kind, member))
        elif kind == "etcd-leader-loss":
            assert cluster is not None
            leader = cluster.leader(timeout=10)
            leader.kill()
            self.healing.append((heal_at, kind, leader))
        elif kind == "replica-cut":
            live = [r for r in world.replicas if not r.dead]
            if live:
                replica = self.rng.choice(live)
                replica.cut = True
                self.healing.append((heal_at, kind, replica))
        elif kind == "replica-kill":
            live = [r for r in world.replicas if not r.dead]
            if live:
                # The leader more often than not: that is where a kill hurts.
                leading = [r for r in live if r.reconciler is not None
                           and r.reconciler.leadership.is_leader()]
                replica = self.rng.choice(leading or live)
                replica.kill_pending = True
        elif kind in DEPLOYMENT_FAULTS:
            world.down[fault.target] = fault.how
            self.healing.append((heal_at, kind, (fault.target, fault.how)))
        elif kind == "clock-jump":
            world.time.jump += fault.amount
        elif kind == "clock-skew":
            world.time.skew += fault.amount
            self.healing.append((heal_at, kind, fault.amount))

    def heal_due(self, *, everything: bool = False) -> None:
        world = self.world
        keep = []
        for at, kind, what in self.healing:
            if not everything and at > world.step:
                keep.append((at, kind, what))
                continue
            self._heal(kind, what)
        self.healing = keep
        # A deployment is back when none of its faults holds it down any more.
        world.down = {target: how for _, kind, (target, how) in  # type: ignore[misc]
                      ((a, k, w) for a, k, w in keep if k in DEPLOYMENT_FAULTS)}
        if everything:
            world.down.clear()
            for replica in world.replicas:
                replica.kill_pending = False
            # NTP sets the reconciler's clock right again (one more step).
            world.time.skew = world.time.jump = 0.0
            if self.cluster is not None and self.etcd_hit:
                self._cluster_whole()
                self.etcd_hit = False
            # The etcd client skips an endpoint for `time_retry` real seconds after it
            # failed (EtcdStore: at least 2 s); the quiet simulated minutes would have
            # waited that out, the second or two a seed really lasts does not.
            for store in (world.store, world.probe):
                for endpoint in store.client.endpoints.values():
                    endpoint.last_failed = 0

    def _heal(self, kind: str, what: object) -> None:
        cluster = self.cluster
        if kind == "etcd-pause":
            assert cluster is not None
            for member in cluster.members:
                member.resume()
        elif kind == "etcd-pause-member":
            assert isinstance(what, EtcdServer)
            what.resume()
        elif kind in ("etcd-kill-member", "etcd-leader-loss"):
            assert isinstance(what, EtcdServer)
            if not what.running():
                what.restart(timeout=30, wait=False)
        elif kind == "replica-cut":
            replica = what
            replica.cut = False  # type: ignore[attr-defined]
            # Its watches broke meanwhile: a broken watch marks the head and marks dirty.
            r = replica.reconciler  # type: ignore[attr-defined]
            if r is not None:
                r.observer.head_dirty.set()
                r.observer.suspended_dirty.set()
        elif kind == "clock-skew":
            self.world.time.skew -= float(what)  # type: ignore[arg-type]


    def _cluster_whole(self) -> None:
        """Every member running and unpaused, and a leader elected."""
        assert self.cluster is not None
        for member in self.cluster.members:
            if member.paused:
                member.resume()
            if not member.running():
                member.restart(timeout=30, wait=False)
        self.cluster.leader(timeout=30)
