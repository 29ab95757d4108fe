"""One graph across two Airflow deployments (issue 18, item 3), against a real etcd and two
fake Airflows: an Airflow 2 (API v1) and an Airflow 3 (API v2), each knowing only its own
DAGs, so a call routed to the wrong one fails.

The example graph is split so that dependencies cross back and forth: the root 01 and the
join 06 run in af2, the fan-out 02-05 and the tail 07 in af3. The cycle's logical date
(the root's, in af2) carries into af3. One deployment down (or refusing the credentials)
holds back only its own pipelines: the pass goes on, the statuses say which deployment,
and when it answers again nothing is lost and nothing runs twice."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters.airflow import AirflowUnavailable
from reconciler.adapters.airflow_fleet import AirflowFleet
from reconciler.adapters.store import EtcdStore
from reconciler.cli.loop_cmds import airflow_fleet
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import State, iso, run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow, Request
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.helpers import example_repo, git

AF2_DAGS = ["01_pipeline_init", "06_pipeline"]
AF3_DAGS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline", "07_pipeline"]
FANOUT = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
DOWN = 10_000  # requests that fail while a deployment is "down"


@pytest.fixture
def af2() -> Iterator[FakeAirflow]:
    # 05 is deployed in both, as during a migration (the move test moves it to af3).
    with FakeAirflowV1([*AF2_DAGS, "05_pipeline"], version="2.11.2") as fake:
        yield fake


@pytest.fixture
def af3() -> Iterator[FakeAirflow]:
    # The root's DAG file is deployed in af3 too, paused (doctor's root-elsewhere check).
    with FakeAirflow([*AF3_DAGS, "01_pipeline_init"]) as fake:
        fake.paused["01_pipeline_init"] = True
        yield fake


def declare(repo: Path, af2: FakeAirflow, af3: FakeAirflow) -> None:
    """The two deployments in git, and 02-05 and 07 moved to af3 (one line each)."""
    folder = repo / "airflow-deployments"
    folder.mkdir()
    for name, fake, api, default in (("af2", af2, "v1", True), ("af3", af3, "v2", False)):
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nurl: {fake.url}\napi: {api}\nauth:\n  kind: password\n"
            f"  username: admin\n  password_env: {name.upper()}_PASSWORD\n"
            + ("default: true\n" if default else ""))
    for dag_id in AF3_DAGS:
        path = repo / "pipelines" / f"{dag_id}.yaml"
        path.write_text(path.read_text() + "deployment: af3\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "two deployments")


@pytest.fixture
def repo(tmp_path: Path, af2: FakeAirflow, af3: FakeAirflow,
         monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AF2_PASSWORD", "secret-pw")
    monkeypatch.setenv("AF3_PASSWORD", "secret-pw")
    made = example_repo(tmp_path / "repo")
    declare(made, af2, af3)
    return made


@pytest.fixture
def store(etcd_settings: EtcdSettings, repo: Path) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings)
    result = sync(repo, "HEAD", "pipelines", s, source="test",
                  now=datetime.now(UTC) - timedelta(days=60))
    assert result.ok, result
    yield s
    s.close()


def fleet(af2: FakeAirflow) -> AirflowFleet:
    """As `reconciler run` makes it: the settings' Airflow (here af2's) is only the
    implicit default deployment, unused once deployments are declared."""
    settings = AirflowSettings(url=af2.url, username="admin", password="secret-pw",
                               timeout=2, retries=1)
    made: AirflowFleet = airflow_fleet(settings, deadline=3.0)
    return made


def reconciler(store: EtcdStore, af2: FakeAirflow) -> Reconciler:
    return Reconciler(store, fleet(af2), LoopSettings(interval=0.05, lease_ttl=6),
                      holder="r1")


def open_cycle(af2: FakeAirflow, cycle: datetime = CYCLE) -> None:
    af2.add_run("01_pipeline_init", f"scheduled__{cycle.isoformat()}", cycle,
                run_type="scheduled")
    af2.finish_all()


def converge(r: Reconciler, *fakes: FakeAirflow, passes: int = 15) -> None:
    """Passes until one does nothing, no deployment's listing is still under way (the
    loop does not wait for the retry of one that was unreachable) and none is unreachable:
    a retry begun before its fault was cleared may end after it, failed."""
    for _ in range(passes):
        report = r.run_pass()
        finished = sum(f.finish_all() for f in fakes)
        if not report.actions and finished == 0:
            if not r.observer.late and not r.observer.unreachable:
                return
            time.sleep(0.1)
    raise AssertionError("did not converge")


def logged(fake: FakeAirflow, first: int, route_part: str) -> list[Request]:
    """The requests since log entry `first` whose route contains `route_part`, once there
    is one: the fake logs a request after answering it, so the client may see the answer
    a moment before the log shows it."""
    deadline = time.monotonic() + 5
    while True:
        found = [q for q in fake.log[first:] if route_part in q.route]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def run_ids(fake: FakeAirflow, dag_id: str) -> list[str]:
    return sorted(r.run_id for r in fake.runs(dag_id))


def statuses(r: Reconciler, cycle: datetime = CYCLE) -> dict[str, tuple[State, str]]:
    assert r.observer.desired is not None
    result = r.held_back(r.plan(r.observer.observe(refresh=False)))
    return {s.dag_id: (s.state, s.message) for s in result.statuses if s.cycle == cycle}


def test_one_graph_runs_each_pipeline_once_in_its_own_airflow(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    first = r.run_pass()
    assert sorted(a.dag_id for a in first.actions) == FANOUT
    # The fan-out went to af3 (Airflow 3), under the root's logical date from af2.
    for dag_id in FANOUT:
        (run,) = af3.runs(dag_id)
        assert (run.run_id, run.logical_date) == (run_id_for(CYCLE), CYCLE)
    af3.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    assert run_ids(af2, "06_pipeline") == [run_id_for(CYCLE)]  # the join, back in af2
    af2.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["07_pipeline"]
    af3.finish_all()
    assert r.run_pass().actions == []
    for fake, dags in ((af2, AF2_DAGS[1:]), (af3, AF3_DAGS)):
        for dag_id in dags:
            assert run_ids(fake, dag_id) == [run_id_for(CYCLE)], dag_id
        assert fake.duplicate_triggers() == {}
    # Each Airflow was asked only about its own DAGs: nothing of af3's reached af2.
    assert {q.dag_id for q in af2.log if q.dag_id} <= set(AF2_DAGS)
    assert {q.dag_id for q in af3.log if q.dag_id} <= set(AF3_DAGS)
    state = statuses(r)
    assert all(s is State.DONE for s, _ in state.values()), state


def test_a_deployment_down_holds_back_only_its_pipelines_and_nothing_runs_twice(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    assert sorted(a.dag_id for a in r.run_pass().actions) == FANOUT
    af3.finish_all()
    r.run_pass()  # sees 02-05 done: 06 triggered in af2
    assert run_ids(af2, "06_pipeline") == [run_id_for(CYCLE)]
    af3.fail_next(DOWN, "503")  # af3 goes down before 07 can be triggered
    af2.finish_all()  # 06 ends: 07 (af3) is due
    report = r.run_pass()  # no exception: af2 was listed, af3 is held back
    assert report.actions == []
    assert set(r.observer.unreachable) == {"af3"}
    assert "deployment af3" in r.observer.unreachable["af3"]
    state = statuses(r)
    assert state["07_pipeline"][0] is State.WAITING
    assert state["07_pipeline"][1].startswith("deployment af3 unreachable (")
    assert state["06_pipeline"][0] is State.DONE  # what af2 ran stays as it is
    # Meanwhile the other deployment goes on: a second cycle's root in af2 is seen.
    later = CYCLE - timedelta(hours=1)
    open_cycle(af2, later)
    r.run_pass()
    assert r.observer.unreachable.keys() == {"af3"}
    before = len(af3.log)
    for _ in range(3):
        assert r.run_pass().actions == []
    # Nothing is asked of af3 but its listing while it is down (no trigger piles up).
    assert not [q for q in af3.log[before:] if q.route.startswith("POST")]
    af3.clear_faults()  # af3 answers again
    converge(r, af2, af3)
    assert r.observer.unreachable == {}
    for cycle in (CYCLE, later):
        assert run_ids(af3, "07_pipeline").count(run_id_for(cycle)) == 1
        for dag_id in FANOUT:
            assert run_ids(af3, dag_id).count(run_id_for(cycle)) == 1
        assert run_ids(af2, "06_pipeline").count(run_id_for(cycle)) == 1
    assert af2.duplicate_triggers() == {}
    assert af3.duplicate_triggers() == {}
    assert af2.clear_count("06_pipeline", run_id_for(CYCLE)) == 0


def test_the_deployments_are_listed_at_once_not_one_after_another(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    converge(r, af2, af3)
    # Each deployment's next listing answers only after 1 s: listed one after another,
    # af3's listing would arrive a second after af2's.
    first2, first3 = len(af2.log), len(af3.log)
    for fake, route in ((af2, "GET /api/v1/dags/~/dagRuns"),
                        (af3, "GET /api/v2/dags/~/dagRuns")):
        fake.fail_next(1, "hang", 1.0, route=route)
    assert r.run_pass().actions == []
    arrivals = [min(q.at for q in logged(fake, first, "dagRuns"))
                for fake, first in ((af2, first2), (af3, first3))]
    assert abs(arrivals[0] - arrivals[1]) < 0.9
    assert r.observer.unreachable == {}


def test_a_hanging_deployment_is_left_behind_and_adds_nothing_to_the_others_passes(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    converge(r, af2, af3)
    # af3 stops answering (each request hangs past the client's 2 s timeout) while a
    # new cycle's root ends in af2: 06 (af2) waits for the fan-out, which is af3's.
    af3.fail_next(DOWN, "hang", 4.0)
    later = CYCLE - timedelta(hours=1)
    open_cycle(af2, later)
    before3 = len(af3.log)
    r.run_pass()
    # The pass did not wait for af3's listing: it is still under way, af3's actions
    # (the fan-out) wait for it, and its pipelines' statuses are as last seen.
    assert r.observer.late == {"af3"}
    assert not [q for q in af3.log[before3:] if q.route.startswith("POST")]
    assert not any("unreachable" in why for _, why in statuses(r, later).values())
    # A pass meanwhile serves af2 and does not wait for af3's listing either.
    before2 = len(af2.log)
    r.run_pass()
    assert logged(af2, before2, "dagRuns")
    assert r.observer.late == {"af3"}
    # Once af3's listing has failed (its deadline), af3 is unreachable: held back.
    deadline = time.monotonic() + 20
    while r.observer.late and time.monotonic() < deadline:
        time.sleep(0.1)
        r.run_pass()
    assert "af3" in r.observer.unreachable
    assert statuses(r, later)["02_pipeline"][1].startswith("deployment af3 unreachable (")
    af3.clear_faults()
    converge(r, af2, af3, passes=40)
    assert r.observer.unreachable == {}
    for cycle in (CYCLE, later):
        for dag_id in AF3_DAGS:
            assert run_ids(af3, dag_id).count(run_id_for(cycle)) == 1
        assert run_ids(af2, "06_pipeline").count(run_id_for(cycle)) == 1
    assert af2.duplicate_triggers() == {}
    assert af3.duplicate_triggers() == {}


def test_credentials_refused_by_one_deployment_hold_back_only_its_pipelines(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AF3_PASSWORD")
    open_cycle(af2)
    r = reconciler(store, af2)
    report = r.run_pass()
    assert report.actions == []
    why = r.observer.unreachable["af3"]
    assert "AF3_PASSWORD is not set" in why
    assert "secret-pw" not in why
    assert statuses(r)["02_pipeline"][1].startswith("deployment af3 unreachable (")
    monkeypatch.setenv("AF3_PASSWORD", "secret-pw")
    converge(r, af2, af3)
    for dag_id in AF3_DAGS:
        assert run_ids(af3, dag_id) == [run_id_for(CYCLE)]


def test_every_deployment_down_fails_the_pass(store: EtcdStore, af2: FakeAirflow,
                                              af3: FakeAirflow) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    r.run_pass()
    af2.fail_next(DOWN, "503")
    af3.fail_next(DOWN, "503")
    with pytest.raises(AirflowUnavailable):
        r.run_pass()
    assert r.api.last_failure is not None  # readiness: Airflow is down, as a whole


def test_listener_events_of_each_deployment_reach_their_pipeline(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    r = reconciler(store, af2)
    open_cycle(af2)
    r.run_pass()
    events = store.events_prefix()
    r.observer.on_event(events + "@af3/05_pipeline/run-a", json.dumps({"kind": "task"}).encode())
    r.observer.on_event(events + "06_pipeline/run-b", json.dumps({"kind": "task"}).encode())
    r.observer.on_event(events + "@af3/01_pipeline_init/run-c", b"{}")  # not af3's DAG
    r.observer.on_event(events + "@nowhere/05_pipeline/run-d", b"{}")
    assert r.observer._task_events == {("05_pipeline", "run-a"), ("06_pipeline", "run-b")}


def cli(etcd_settings: EtcdSettings, af2: FakeAirflow, *args: str
        ) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    env = {**os.environ, "RECONCILER_ETCD_ENDPOINTS": ",".join(etcd_settings.endpoints),
           "RECONCILER_ETCD_PREFIX": etcd_settings.prefix,
           "RECONCILER_NAMESPACE": etcd_settings.namespace,
           "RECONCILER_AIRFLOW_URL": af2.url, "RECONCILER_AIRFLOW_USERNAME": "admin",
           "RECONCILER_AIRFLOW_PASSWORD": "secret-pw"}
    return subprocess.run([sys.executable, "-m", "reconciler", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_doctor_checks_each_deployment_on_its_own(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow,
        etcd_settings: EtcdSettings) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    converge(r, af2, af3)
    healthy = cli(etcd_settings, af2, "doctor", "-o", "json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["findings"] == []
    # A migration half done: the root's DAG unpaused in the deployment it does not run in.
    af3.paused["01_pipeline_init"] = False
    twice = cli(etcd_settings, af2, "doctor")
    assert twice.returncode == 1
    assert ("01_pipeline_init (af3): the root runs in af2, but its DAG is also unpaused in "
            "af3") in twice.stdout
    af3.paused["01_pipeline_init"] = True
    af3.paused["07_pipeline"] = True  # a finding in af3 names its deployment
    af3.fail_next(DOWN, "503", route="GET /api/v2/dags")
    down = cli(etcd_settings, af2, "doctor", "-o", "json")
    assert down.returncode == 1
    findings = json.loads(down.stdout)["findings"]
    assert [(f.get("deployment"), f["problem"]) for f in findings] == [("af3", "unreachable")]
    af3.clear_faults()
    paused = cli(etcd_settings, af2, "doctor")
    assert "07_pipeline (af3): paused in Airflow" in paused.stdout


def test_status_names_each_pipelines_deployment(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow,
        etcd_settings: EtcdSettings) -> None:
    open_cycle(af2)
    r = reconciler(store, af2)
    converge(r, af2, af3)
    proc = cli(etcd_settings, af2, "status", "--from-etcd", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["dag_id"]: row["deployment"] for row in json.loads(proc.stdout)["statuses"]}
    assert rows == {"01_pipeline_init": "af2", "02_pipeline": "af3", "03_pipeline": "af3",
                    "04_pipeline": "af3", "05_pipeline": "af3", "06_pipeline": "af2",
                    "07_pipeline": "af3"}
    text = cli(etcd_settings, af2, "status", "--from-etcd").stdout
    assert any(line.split()[:2] == ["07_pipeline", "af3"] for line in text.splitlines())


def test_reconciler_plan_names_the_unreachable_deployment(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow, etcd_settings: EtcdSettings,
        tmp_path: Path) -> None:
    """`reconciler status --live` (and plan) go through the same fleet as the loop."""
    import os
    import sys

    open_cycle(af2)
    af3.fail_next(DOWN, "503")
    env = {**os.environ, "RECONCILER_ETCD_ENDPOINTS": ",".join(etcd_settings.endpoints),
           "RECONCILER_ETCD_PREFIX": etcd_settings.prefix,
           "RECONCILER_NAMESPACE": etcd_settings.namespace,
           "RECONCILER_AIRFLOW_URL": af2.url, "RECONCILER_AIRFLOW_USERNAME": "admin",
           "RECONCILER_AIRFLOW_PASSWORD": "secret-pw"}
    proc = subprocess.run([sys.executable, "-m", "reconciler", "plan", "-o", "json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "deployment af3" in proc.stdout + proc.stderr


def move_05(repo: Path, store: EtcdStore, to: str) -> None:
    """The migration PR: 05_pipeline's `deployment:` line, merged and synced."""
    path = repo / "pipelines" / "05_pipeline.yaml"
    text = path.read_text().replace("deployment: af3\n", "")
    path.write_text(text + ("deployment: af3\n" if to == "af3" else ""))
    git(repo, "commit", "-qam", f"05_pipeline to {to}")
    result = sync(repo, "HEAD", "pipelines", store, source="test", now=datetime.now(UTC))
    assert result.ok, result


def test_a_pipeline_moved_mid_cycle_is_not_run_again_and_runs_once_in_its_new_deployment(
        repo: Path, store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    c1, c2, c3 = CYCLE - timedelta(hours=2), CYCLE - timedelta(hours=1), CYCLE
    move_05(repo, store, "af2")  # 05 starts in af2
    r = reconciler(store, af2)
    open_cycle(af2, c1)
    converge(r, af2, af3)  # c1 ran whole: 05 in af2
    open_cycle(af2, c2)
    r.run_pass()  # c2: 02-04 triggered in af3, 05 in af2, all still queued
    assert run_ids(af2, "05_pipeline") == sorted([run_id_for(c1), run_id_for(c2)])
    move_05(repo, store, "af3")  # merged mid-cycle
    r.observer.head_dirty.set()  # what the watch on desired/head does
    converge(r, af2, af3)  # 05's c2 run ends in af2: 06 follows on it
    open_cycle(af2, c3)  # the first cycle after the move
    converge(r, af2, af3)
    # The cycles 05 ran in af2 are not run again in af3; the next runs once, in af3.
    assert run_ids(af2, "05_pipeline") == sorted([run_id_for(c1), run_id_for(c2)])
    assert run_ids(af3, "05_pipeline") == [run_id_for(c3)]
    for fake, dag_id in ((af2, "06_pipeline"), (af3, "07_pipeline"), (af3, "02_pipeline")):
        assert run_ids(fake, dag_id) == sorted(run_id_for(c) for c in (c1, c2, c3)), dag_id
    assert af2.duplicate_triggers() == {}
    assert af3.duplicate_triggers() == {}
    ledger = store.read_ledger()
    assert ledger[(iso(c2), "05_pipeline")]["deployment"] == "af2"
    assert ledger[(iso(c3), "05_pipeline")]["deployment"] == "af3"
    assert ledger[(iso(c3), "06_pipeline")]["deployment"] == "af2"


def test_a_moved_pipeline_is_not_run_again_while_the_deployment_it_left_is_down(
        repo: Path, store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    move_05(repo, store, "af2")
    r = reconciler(store, af2)
    open_cycle(af2, CYCLE)
    converge(r, af2, af3)  # 05 ran in af2
    move_05(repo, store, "af3")
    r.observer.head_dirty.set()
    af2.fail_next(DOWN, "503")  # the deployment it left cannot show that run now
    r.observer.cache.listed_at = None  # a relist: af3 is asked for 05's runs, has none
    for _ in range(3):
        r.run_pass()
        af3.finish_all()
    assert af3.runs("05_pipeline") == []
    state = statuses(r)["05_pipeline"]
    assert state[0] is State.DONE
    assert "before it moved to af3" in state[1]


def test_a_moved_pipeline_whose_trigger_answer_was_lost_where_it_was_waits_for_that_one(
        repo: Path, store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow,
        etcd_settings: EtcdSettings) -> None:
    """05's trigger in af3 takes effect but its answer is lost; 05 moves to af2 and af3
    goes down before any listing has shown that run. A trigger in af2 would be a second
    run of the cycle in another Airflow: it waits until af3 answers, then the run is seen
    there and nothing runs twice. (Found by the fault simulation, seed 6025.)"""
    r = Reconciler(store, fleet(af2), LoopSettings(interval=0.05, lease_ttl=6,
                                                   call_deadline=1.0), holder="r1")
    trigger = "POST /api/v2/dags/{dag_id}/dagRuns"

    def lose_the_answer(request: Request) -> None:
        if request.route == trigger and request.dag_id == "05_pipeline":
            af3.before_reply = None
            time.sleep(2.5)  # past the action's deadline: the answer is lost

    open_cycle(af2, CYCLE)
    af3.before_reply = lose_the_answer
    try:
        report = r.run_pass()
    finally:
        af3.before_reply = None
    assert [o.result for o in report.outcomes if o.action.dag_id == "05_pipeline"] == [
        "failed"]
    assert run_ids(af3, "05_pipeline") == [run_id_for(CYCLE)]  # it took effect
    move_05(repo, store, "af2")
    r.observer.head_dirty.set()
    af3.fail_next(DOWN, "503")
    for _ in range(3):
        assert "05_pipeline" not in [a.dag_id for a in r.run_pass().actions]
    assert af2.runs("05_pipeline") == []
    state = statuses(r)["05_pipeline"]
    assert state[0] is State.WAITING
    assert "deployment af3, which it has left since" in state[1]
    assert "not triggered in af2 until af3 answers" in state[1]
    # The dry run (a fresh process: the root's run is listed in af2, which answers).
    proc = cli(etcd_settings, af2, "plan", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert "05_pipeline" not in [a["dag_id"] for a in json.loads(proc.stdout)["actions"]]
    af3.clear_faults()
    converge(r, af2, af3)
    assert af2.runs("05_pipeline") == []
    assert run_ids(af3, "05_pipeline") == [run_id_for(CYCLE)]
    assert run_ids(af2, "06_pipeline") == [run_id_for(CYCLE)]  # 06 followed on af3's 05
    assert af2.duplicate_triggers() == {}
    assert af3.duplicate_triggers() == {}


def test_a_new_term_reads_the_head_again_when_the_watch_missed_a_move(
        repo: Path, store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow) -> None:
    """A replica that missed the watch event of a sync (etcd cut it off, its watch was
    made again) must not lead on the graph from before a move: it would route 05 to the
    Airflow it left. A new term reads the head again."""
    move_05(repo, store, "af2")
    r = reconciler(store, af2)
    r.run_pass()
    before = r.observer.desired
    move_05(repo, store, "af3")  # synced; this replica's watch never said so
    r.run_pass()
    assert r.observer.desired is before  # the missed event: still the old graph
    lease, term = r.leadership.lease, r.leadership.term
    r.leadership.lost("another replica took the lease meanwhile")
    store.resign(lease)  # ... and has let it go since
    r.run_pass()  # elected again: a new term
    assert r.leadership.term == term + 1
    head, _ = store.read_head()
    assert head is not None
    assert r.observer.desired is not None
    assert r.observer.desired.commit == head.commit
    open_cycle(af2)
    converge(r, af2, af3)
    assert run_ids(af3, "05_pipeline") == [run_id_for(CYCLE)]
    assert run_ids(af2, "05_pipeline") == []


def test_a_watch_made_again_marks_the_head_and_the_suspensions_to_be_read(
        store: EtcdStore, af2: FakeAirflow) -> None:
    """What changed while a replica had no watch (etcd cut it off) is read on the next
    pass: making the watch again marks both as dirty."""
    from reconciler.service.observability import Health
    from reconciler.service.runner import Runner

    r = reconciler(store, af2)
    r.run_pass()
    assert not r.observer.head_dirty.is_set()
    runner = Runner(r, Health())
    try:
        runner._ensure_watch()
        assert r.observer.head_dirty.is_set()
        assert r.observer.suspended_dirty.is_set()
        r.run_pass()
        assert not r.observer.head_dirty.is_set()
        runner._ensure_watch()  # the watches stand: nothing to mark
        assert not r.observer.head_dirty.is_set()
    finally:
        runner._drop_watch()


def test_status_live_with_one_deployment_down_shows_its_pipelines_held_back(
        store: EtcdStore, af2: FakeAirflow, af3: FakeAirflow,
        etcd_settings: EtcdSettings) -> None:
    open_cycle(af2)
    af3.fail_next(DOWN, "503")
    proc = cli(etcd_settings, af2, "status", "--live", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert "deployment af3" in proc.stderr
    rows = {r["dag_id"]: r for r in json.loads(proc.stdout)["statuses"]}
    assert rows["02_pipeline"]["message"].startswith("deployment af3 unreachable (")
    assert rows["02_pipeline"]["deployment"] == "af3"
    assert rows["01_pipeline_init"]["state"] == "done"
