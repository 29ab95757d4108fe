"""Process-level fault tests: `reconciler run` as real OS processes against a real etcd (a
lone server, or a 3-member cluster) and the fake Airflow playing the scheduler, with faults
injected from outside: kill -9 of a replica, of etcd or of the etcd leader member; Airflow
5xx, lost answers, answers slower than the lease, HTML pages and expired tokens (through
tests/fixtures/proxy.py where the network is the fault); two and three replicas whose leader
is killed.

Every test drives one cycle of the example graph (01 -> 02..05 -> 06 -> 07) to the end and
then re-runs 03 by hand, and asserts what issue 8 asks: no duplicate trigger, no duplicate
clear, no missing run (every pipeline exactly one run in the cycle; the re-run of 03 clears
06 and 07 exactly once each, and nothing else), and that no replica ever exits on its own
(each is stopped by the test, cleanly, with SIGTERM).

Fast settings (lease 2-3 s, interval 0.3 s) keep the file within a few minutes. Random
moments come from a seeded generator: the seed is in the failure message
(FAULTS_SEED=<n> repeats a run).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.fakes.fake_airflow import FakeAirflow, FakeRun, Request
from tests.fakes.fake_airflow_v1 import FakeAirflowV1, api_of
from tests.fixtures.etcd import EtcdCluster, EtcdServer, etcd_binary
from tests.fixtures.proxy import FaultProxy, is_clear, is_trigger
from tests.fixtures.replicas import PASSWORD, Deployment, Replica, poll_until
from tests.helpers import EXAMPLE_DAGS

ROOT = EXAMPLE_DAGS[0]
DOWNSTREAM = EXAMPLE_DAGS[1:]
RERUN = "03_pipeline"
RERUN_CLEARS = {"06_pipeline", "07_pipeline"}  # what a re-run of 03 must re-run, once each
CYCLE_TIMEOUT = 90.0
SEED = int(os.environ.get("FAULTS_SEED") or time.time_ns() % 100_000)


def run_id_for(cycle: datetime) -> str:
    """The reconciler's deterministic run id (design section 10: fixed forever)."""
    return f"reconciler__{cycle.isoformat()}"


@dataclass
class Scene:
    """One test's world: the fake Airflow (scheduling), a deployment, random moments."""

    fake: FakeAirflow
    deployment: Deployment
    rng: random.Random
    lease_ttl: float = 2.0
    interval: float = 0.3

    def start(self, **kwargs: object) -> Replica:
        kwargs.setdefault("lease_ttl", self.lease_ttl)
        kwargs.setdefault("interval", self.interval)
        return self.deployment.start(**kwargs)  # type: ignore[arg-type]

    def live(self) -> list[Replica]:
        return self.deployment.live()

    def wait(self, check: Callable[[], object], what: str,
             timeout: float = CYCLE_TIMEOUT) -> object:
        return poll_until(check, timeout, what=what, alive=self.live())

    # --- the cycle ---------------------------------------------------------------------

    def open_cycle(self) -> datetime:
        root = self.fake.schedule_root()
        assert root.logical_date is not None
        return root.logical_date

    def run_of(self, dag_id: str, cycle: datetime) -> FakeRun | None:
        runs = self.fake.cycle_runs(cycle).get(dag_id, [])
        return runs[0] if runs else None

    def triggered(self, dag_id: str, cycle: datetime) -> bool:
        return self.run_of(dag_id, cycle) is not None

    def cycle_done(self, cycle: datetime) -> bool:
        runs = self.fake.cycle_runs(cycle)
        return all(len(runs.get(d, [])) >= 1 and runs[d][0].state == "success"
                   for d in EXAMPLE_DAGS)

    def wait_cycle(self, cycle: datetime) -> None:
        self.wait(lambda: self.cycle_done(cycle), f"cycle {cycle.isoformat()} to finish")

    def rerun(self, cycle: datetime, dag_id: str = RERUN) -> datetime:
        """Clear `dag_id`'s run of the cycle as a human would (straight to Airflow's API);
        returns the end date it had."""
        run = self.run_of(dag_id, cycle)
        assert run is not None
        ended = run.end_date  # the clear resets the (shared) run object
        assert ended is not None
        # nothing was cleared yet: no upstream had re-run
        clears = {d: self.fake.clear_count(d, r[0].run_id)
                  for d, r in self.fake.cycle_runs(cycle).items()}
        assert set(clears.values()) == {0}, f"clears before any re-run: {clears}"
        human_clear(self.fake, dag_id, run.run_id)
        return ended

    def rerun_done(self, cycle: datetime, before: datetime) -> bool:
        """03 ended again after `before`, and 06 then 07 re-ran after it."""
        ends = {}
        for dag_id in (RERUN, "06_pipeline", "07_pipeline"):
            run = self.run_of(dag_id, cycle)
            if run is None or run.state != "success" or run.end_date is None:
                return False
            ends[dag_id] = run.end_date
        return before < ends[RERUN] < ends["06_pipeline"] < ends["07_pipeline"]

    def wait_rerun(self, cycle: datetime, before: datetime) -> None:
        self.wait(lambda: self.rerun_done(cycle, before),
                  f"the re-run of {RERUN} to re-run 06 and 07")

    def settle(self) -> None:
        """Give late duplicates (a retry after a lost answer, a replica taking over) the
        time to show: one lease and a few passes. There is nothing to poll for: this checks
        that something does NOT happen."""
        end = time.monotonic() + self.lease_ttl + 4 * self.interval + 0.5
        while time.monotonic() < end:
            self.assert_alive()
            time.sleep(0.1)

    def assert_alive(self, replicas: list[Replica] | None = None) -> None:
        for replica in replicas if replicas is not None else self.live():
            assert replica.poll() is None, f"{replica.name} exited:\n{replica.tail()}"

    # --- the verdict -------------------------------------------------------------------

    def assert_exactly_once(self, cycle: datetime, *, reran: bool = True) -> None:
        """0 duplicate triggers, 0 duplicate clears, 0 missing runs, for this cycle."""
        fake = self.fake
        runs = fake.cycle_runs(cycle)
        counts = {d: len(runs.get(d, [])) for d in EXAMPLE_DAGS}
        assert counts == dict.fromkeys(EXAMPLE_DAGS, 1), f"runs per pipeline: {counts}"
        expected_id = run_id_for(cycle)
        ids = {d: runs[d][0].run_id for d in DOWNSTREAM}
        assert set(ids.values()) == {expected_id}, ids
        created = {d: fake.created[(d, expected_id)] for d in DOWNSTREAM}
        assert created == dict.fromkeys(DOWNSTREAM, 1), f"trigger POSTs that created: {created}"
        assert fake.duplicate_triggers() == {}
        assert fake.duplicate_clears() == {}, f"repeated clears: {fake.duplicate_clears()}"
        clears = {d: fake.clear_count(d, runs[d][0].run_id) for d in EXAMPLE_DAGS}
        want = {d: int(reran and (d in RERUN_CLEARS or d == RERUN)) for d in EXAMPLE_DAGS}
        assert clears == want, f"clears per pipeline (03's is the human one): {clears}"

    def finish(self, cycle: datetime, *, reran: bool = True) -> None:
        """Settle, assert the books and the processes, stop every replica cleanly."""
        self.settle()
        self.assert_exactly_once(cycle, reran=reran)
        live = self.live()
        assert live, "no replica left running"
        for replica in self.deployment.replicas:
            assert replica.tracebacks() == 0, f"{replica.name} logged a traceback:\n" \
                                              f"{replica.text()[-4000:]}"
        codes = self.deployment.stop_all()
        assert set(codes.values()) == {0}, f"exit codes on SIGTERM: {codes}"


def human_clear(fake: FakeAirflow, dag_id: str, run_id: str) -> None:
    def post(path: str, body: object, token: str | None = None) -> dict[str, object]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        request = urllib.request.Request(fake.url + path, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            data: dict[str, object] = json.loads(answer.read())
            return data

    # a user of its own: a fault test may expire the reconciler's tokens meanwhile
    fake.add_user("human", "human-pw", "op")
    if isinstance(fake, FakeAirflowV1):
        token = "Basic " + base64.b64encode(b"human:human-pw").decode()
    else:
        token = "Bearer " + str(post("/auth/token", {"username": "human",
                                                     "password": "human-pw"})["access_token"])
    quoted = urllib.request.quote(run_id, safe="")
    post(f"{api_of(fake)}/dags/{dag_id}/dagRuns/{quoted}/clear", {"dry_run": False}, token)


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    """The fake Airflow 3 (API v2); `v1` (indirect parameter): the fake Airflow 2, which
    the replicas find by themselves (RECONCILER_AIRFLOW_API is auto)."""
    cls = FakeAirflowV1 if getattr(request, "param", "v2") == "v1" else FakeAirflow
    with cls(EXAMPLE_DAGS, password=PASSWORD) as f:
        f.auto_schedule(run_seconds=0.3, queue_seconds=0.1)
        yield f


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = SEED + sum(map(ord, request.node.name))
    print(f"FAULTS_SEED={SEED} (this test: random.Random({seed}))")
    return random.Random(seed)


@pytest.fixture
def scene(tmp_path: Path, etcd_server: EtcdServer, fake: FakeAirflow, rng: random.Random,
          deployments: list[Deployment]) -> Scene:
    deployment = Deployment.create(tmp_path, etcd_server.endpoints, fake.url)
    deployments.append(deployment)
    return Scene(fake, deployment, rng)


# --- (a) kill -9 of the reconciler --------------------------------------------------------


def test_kill_9_at_random_moments_neither_duplicates_nor_loses(scene: Scene) -> None:
    replica = scene.start()
    scene.deployment.leader()
    cycle = scene.open_cycle()
    kills = 0
    # Kill it at random moments while the cycle runs, restarting it each time.
    while not scene.cycle_done(cycle) and kills < 6:
        time.sleep(scene.rng.uniform(0.2, 1.5))  # the random moment IS the fault
        scene.assert_alive([replica])
        replica.kill()
        kills += 1
        replica.restart()
    scene.wait_cycle(cycle)
    before = scene.rerun(cycle)
    for _ in range(3):  # and while the re-run propagates
        time.sleep(scene.rng.uniform(0.2, 1.2))
        scene.assert_alive([replica])
        replica.kill()
        replica.restart()
    scene.wait_rerun(cycle, before)
    scene.finish(cycle)


@pytest.mark.parametrize("fake", ["v2", "v1"], indirect=True)
def test_kill_9_after_each_airflow_call_took_effect_before_its_answer(scene: Scene) -> None:
    """The trigger of 06 and the clear of 07 reach Airflow, and the process dies before it
    hears the answer (so before it records the result)."""
    replica = scene.start()
    scene.deployment.leader()
    killed: list[Request] = []

    def kill_on(route: str, dag_id: str) -> Callable[[Request], None]:
        def hook(request: Request) -> None:
            if request.route == route and request.dag_id == dag_id and not killed:
                replica.kill()
                killed.append(request)
        return hook

    api = api_of(scene.fake)
    scene.fake.before_reply = kill_on(f"POST {api}/dags/{{dag_id}}/dagRuns", "06_pipeline")
    cycle = scene.open_cycle()
    poll_until(lambda: killed, CYCLE_TIMEOUT, what="the trigger of 06")
    replica.restart()
    scene.wait_cycle(cycle)

    killed.clear()
    scene.fake.before_reply = kill_on(f"POST {api}/dags/{{dag_id}}/dagRuns/{{run_id}}/clear",
                                      "07_pipeline")
    before = scene.rerun(cycle)
    poll_until(lambda: killed, CYCLE_TIMEOUT, what="the clear of 07")
    replica.restart()
    scene.wait_rerun(cycle, before)
    scene.fake.before_reply = None
    scene.finish(cycle)


def test_kill_9_right_after_the_intent_is_recorded(scene: Scene) -> None:
    """An etcd watch on the ledger kills the replica as soon as an intent for 06 (then for
    07's clear) is written: the call may or may not have gone out."""
    replica = scene.start()
    scene.deployment.leader()
    prefix = f"/{scene.deployment.prefix}/{scene.deployment.namespace}/ledger/"
    watch = subprocess.Popen([etcd_binary("etcdctl"),
                              f"--endpoints={','.join(scene.deployment.etcd_endpoints)}",
                              "watch", "--prefix", prefix], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(
                                 os.environ, ETCDCTL_API="3"), start_new_session=True)
    seen: list[str] = []
    target = ["06_pipeline"]

    def follow() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            if line.startswith(prefix) and line.rstrip().endswith("/" + target[0]):
                replica.kill()
                seen.append(line.strip())

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        cycle = scene.open_cycle()
        poll_until(lambda: seen, CYCLE_TIMEOUT, what="a ledger write for 06")
        target[0] = "-nothing-"
        replica.restart()
        scene.wait_cycle(cycle)
        seen.clear()
        target[0] = "07_pipeline"
        before = scene.rerun(cycle)
        poll_until(lambda: seen, CYCLE_TIMEOUT, what="a ledger write for 07's re-run")
        target[0] = "-nothing-"
        replica.restart()
        scene.wait_rerun(cycle, before)
    finally:
        watch.kill()
        watch.wait(10)
    scene.finish(cycle)


# --- (b) etcd killed and restarted --------------------------------------------------------


def test_etcd_killed_and_restarted_mid_cycle(tmp_path: Path, etcd_killable: EtcdServer,
                                             fake: FakeAirflow, rng: random.Random,
                                             deployments: list[Deployment]) -> None:
    deployment = Deployment.create(tmp_path, etcd_killable.endpoints, fake.url)
    deployments.append(deployment)
    scene = Scene(fake, deployment, rng)
    scene.start(extra=["--etcd-timeout", "1"])
    scene.deployment.leader()
    cycle = scene.open_cycle()
    scene.wait(lambda: scene.triggered("02_pipeline", cycle), "the fan-out to start")
    etcd_killable.kill()
    time.sleep(scene.lease_ttl + 1)  # the outage (the fault's length, not a sync point)
    scene.assert_alive()
    etcd_killable.restart()
    scene.wait_cycle(cycle)
    before = scene.rerun(cycle)
    scene.wait(lambda: (r := scene.run_of("06_pipeline", cycle)) is not None
               and scene.fake.clear_count("06_pipeline", r.run_id) == 1, "06 to be cleared")
    etcd_killable.kill()
    time.sleep(rng.uniform(0.5, 2.5))
    scene.assert_alive()
    etcd_killable.restart()
    scene.wait_rerun(cycle, before)
    scene.finish(cycle)


# --- (c) a 3-member etcd cluster losing its leader ----------------------------------------


def test_etcd_cluster_losing_its_leader_member_mid_cycle(
        tmp_path: Path, etcd_cluster: EtcdCluster, fake: FakeAirflow, rng: random.Random,
        deployments: list[Deployment]) -> None:
    deployment = Deployment.create(tmp_path, etcd_cluster.endpoints, fake.url)
    deployments.append(deployment)
    scene = Scene(fake, deployment, rng)
    # The leader member first in the list: the client starts on the member that dies.
    first = etcd_cluster.leader()
    ordered = [first.endpoint] + [m.endpoint for m in etcd_cluster.members if m is not first]
    scene.start(etcd_endpoints=ordered, extra=["--etcd-timeout", "1"])
    scene.deployment.leader()
    cycle = scene.open_cycle()
    scene.wait(lambda: scene.triggered("02_pipeline", cycle), "the fan-out to start")
    dead = etcd_cluster.kill_leader()
    etcd_cluster.leader(exclude=dead)
    scene.wait_cycle(cycle)
    etcd_cluster.restart(dead)
    before = scene.rerun(cycle)
    time.sleep(rng.uniform(0.2, 1.0))
    dead = etcd_cluster.kill_leader()  # and the next leader, while the re-run propagates
    etcd_cluster.leader(exclude=dead)
    scene.wait_rerun(cycle, before)
    etcd_cluster.restart(dead)
    scene.finish(cycle)


# --- (d) Airflow faults -------------------------------------------------------------------

AirflowFault = Callable[[Scene, FaultProxy, str], None]
"""(scene, proxy, phase) -> inject; phase is "cycle" or "rerun"."""


def fault_5xx(scene: Scene, proxy: FaultProxy, phase: str) -> None:
    with scene.fake._lock:
        scene.fake.faults = [("503" if phase == "rerun" else "500", 0.0)] * 100_000
    time.sleep(scene.lease_ttl + 1.5)  # an outage longer than the lease
    scene.fake.clear_faults()


def fault_lost_answers(scene: Scene, proxy: FaultProxy, phase: str) -> None:
    if phase == "cycle":  # triggers reach Airflow, their answers are lost
        proxy.drop_answers(match=is_trigger, count=5)
    else:  # a lost clear answer: the clear took effect, the reconciler never heard
        proxy.drop_answers(match=is_clear, count=2)


def is_action(head: bytes) -> bool:
    return is_trigger(head) or is_clear(head)


def fault_slow_answers(scene: Scene, proxy: FaultProxy, phase: str) -> None:
    # triggers and clears answered 5 s late: longer than the 3 s lease
    proxy.delay(5.0, match=is_action, count=6 if phase == "cycle" else 2)


def fault_html(scene: Scene, proxy: FaultProxy, phase: str) -> None:
    if phase == "rerun":
        return  # once is enough: the reconciler waits long after an HTML answer
    with scene.fake._lock:  # an SSO proxy answers every request with its sign-in page
        scene.fake.faults = [("html", 0.0)] * 100_000
    time.sleep(2.0)
    scene.fake.clear_faults()


def fault_token_expiry(scene: Scene, proxy: FaultProxy, phase: str) -> None:
    for i in range(4):
        scene.fake.expire_tokens()
        if i == 2:
            scene.fake.rotate_secret()  # and once a token signed with an old secret
        time.sleep(0.4)


AIRFLOW_FAULTS: dict[str, AirflowFault] = {
    "5xx": fault_5xx, "lost_answers": fault_lost_answers, "slow_answers": fault_slow_answers,
    "html": fault_html, "token_expiry": fault_token_expiry,
}


@pytest.mark.parametrize(("fault", "replicas", "fake"), [
    ("5xx", 1, "v2"), ("lost_answers", 1, "v2"), ("slow_answers", 1, "v2"),
    ("slow_answers", 2, "v2"), ("html", 1, "v2"), ("token_expiry", 1, "v2"),
    # Airflow 2 (API v1, basic auth: no token to expire)
    ("5xx", 1, "v1"), ("lost_answers", 1, "v1"), ("html", 1, "v1")], indirect=["fake"])
def test_airflow_faults(fault: str, replicas: int, scene: Scene,
                        fault_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = fault_proxy(scene.fake.url)
    extra: list[str] = []
    if fault == "slow_answers":
        # 5 s answers: longer than the lease and than one request's timeout, so the client
        # gives up on a call that did take effect (and may retry it)
        scene.lease_ttl = 3.0
        extra = ["--airflow-timeout", "2"]
    for _ in range(replicas):
        scene.start(airflow_url=proxy.url, extra=extra)
    scene.deployment.leader()
    inject = AIRFLOW_FAULTS[fault]
    cycle = scene.open_cycle()
    if fault in ("lost_answers", "slow_answers"):
        inject(scene, proxy, "cycle")  # armed before the first trigger
    else:
        scene.wait(lambda: scene.triggered("02_pipeline", cycle), "the fan-out to start")
        inject(scene, proxy, "cycle")
    scene.wait_cycle(cycle)
    if fault in ("lost_answers", "slow_answers"):
        assert proxy.faults, "the fault never applied"
        proxy.pass_through()

    if fault in ("lost_answers", "slow_answers"):
        inject(scene, proxy, "rerun")
        before = scene.rerun(cycle)
    else:
        before = scene.rerun(cycle)
        scene.wait(lambda: (r := scene.run_of(RERUN, cycle)) is not None
                   and r.state == "success" and r.end_date is not None and r.end_date > before,
                   "03 to re-run")
        inject(scene, proxy, "rerun")
    scene.wait_rerun(cycle, before)
    proxy.pass_through()
    scene.finish(cycle)


# --- (e) replicas with the leader killed --------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_with_the_leader_killed_mid_cycle(replicas: int, scene: Scene) -> None:
    for _ in range(replicas):
        scene.start()
    leader = scene.deployment.leader()
    cycle = scene.open_cycle()
    scene.wait(lambda: scene.triggered("02_pipeline", cycle), "the fan-out to start")
    time.sleep(scene.rng.uniform(0.0, 0.6))
    first = leader
    first.kill()
    leader = scene.deployment.leader(exclude=first)
    scene.wait_cycle(cycle)
    first.restart()  # back as a standby
    before = scene.rerun(cycle)
    scene.wait(lambda: (r := scene.run_of("06_pipeline", cycle)) is not None
               and scene.fake.clear_count("06_pipeline", r.run_id) == 1, "06 to be cleared")
    time.sleep(scene.rng.uniform(0.0, 0.4))
    leader.kill()  # the new leader too, while the re-run propagates
    scene.deployment.leader(exclude=leader)
    scene.wait_rerun(cycle, before)
    leader.restart()
    scene.finish(cycle)
