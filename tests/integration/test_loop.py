"""The loop against a real etcd and the fake Airflow API: the scenarios of DESIGN section 1,
quiet passes, crashes between intent and call, two replicas, Airflow faults."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.helpers import example_repo

REPO = Path(__file__).resolve().parents[2]
DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]
EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return example_repo(tmp_path / "repo")


@pytest.fixture
def store(etcd_settings: EtcdSettings, repo: Path) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings)
    result = sync(repo, "HEAD", "pipelines", s, source="test",
                  now=datetime.now(UTC) - timedelta(days=1))
    assert result.ok, result
    yield s
    s.close()


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    with FakeAirflow(DAGS) as f:
        yield f


def client(fake: FakeAirflow) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                                         timeout=2, retries=2), backoff_initial=0.01,
                         backoff_max=0.05)


def reconciler(store: EtcdStore, fake: FakeAirflow, holder: str = "r1") -> Reconciler:
    return Reconciler(store, client(fake), LoopSettings(interval=0.05, lease_ttl=5),
                      holder=holder)


CYCLE = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


def open_cycle(fake: FakeAirflow, cycle: datetime = CYCLE) -> None:
    fake.add_run("01_pipeline_init", f"scheduled__{cycle.isoformat()}", cycle,
                 run_type="scheduled")
    fake.finish_all()


def converge(r: Reconciler, fake: FakeAirflow, passes: int = 10) -> None:
    for _ in range(passes):
        report = r.run_pass()
        if not report.actions and fake.finish_all() == 0:
            return
        fake.finish_all()
    raise AssertionError("did not converge")


def runs_of(fake: FakeAirflow, dag_id: str) -> list[str]:
    return [r.run_id for r in fake.runs(dag_id)]


def test_normal_cycle_runs_every_downstream_once_in_order(store: EtcdStore,
                                                           fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    first = r.run_pass()
    assert sorted(a.dag_id for a in first.actions) == EXTRACTS
    assert r.run_pass().actions == []  # 02-05 still queued: 06 waits
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["07_pipeline"]
    fake.finish_all()
    assert r.run_pass().actions == []
    for dag_id in DAGS[1:]:
        (run,) = fake.runs(dag_id)
        assert run.run_id == run_id_for(CYCLE)
        assert run.logical_date == CYCLE
        provenance = run.conf["reconciler"]
        assert provenance["cycle"] == CYCLE.isoformat()
        assert len(provenance["commit"]) == 40
    assert fake.run("06_pipeline", run_id_for(CYCLE)).conf["target"] == "mart"


def test_a_quiet_pass_costs_one_airflow_request_and_no_etcd_write(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    quiet = r.run_pass()
    assert quiet.actions == []
    assert quiet.airflow_requests == 1
    assert quiet.etcd_writes == 0


def test_a_rerun_of_03_reruns_06_and_07_only(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    ends = {d: fake.run(d, run_id_for(CYCLE)).end_date for d in DAGS[1:]}
    # a user clears 03 in the UI; Airflow runs it again
    fake.set_state("03_pipeline", run_id_for(CYCLE), "queued")
    fake.run("03_pipeline", run_id_for(CYCLE)).end_date = None
    assert r.run_pass().actions == []  # 03 is running again: 06 waits
    fake.set_state("03_pipeline", run_id_for(CYCLE), "success")
    assert [(a.kind.value, a.dag_id) for a in r.run_pass().actions] == [("clear", "06_pipeline")]
    fake.finish_all()
    assert [(a.kind.value, a.dag_id) for a in r.run_pass().actions] == [("clear", "07_pipeline")]
    fake.finish_all()
    assert r.run_pass().actions == []
    for dag_id in ("02_pipeline", "04_pipeline", "05_pipeline"):
        assert fake.run(dag_id, run_id_for(CYCLE)).end_date == ends[dag_id]
    for dag_id in ("06_pipeline", "07_pipeline"):
        assert fake.run(dag_id, run_id_for(CYCLE)).end_date > ends[dag_id]
        assert len(fake.runs(dag_id)) == 1


def test_runs_missed_while_stopped_are_all_triggered_once(store: EtcdStore,
                                                           fake: FakeAirflow) -> None:
    cycles = [CYCLE, CYCLE + timedelta(hours=1), CYCLE + timedelta(hours=2)]
    for cycle in cycles:
        open_cycle(fake, cycle)
    r = reconciler(store, fake)
    converge(r, fake)
    for dag_id in DAGS[1:]:
        assert sorted(runs_of(fake, dag_id)) == sorted(run_id_for(c) for c in cycles)


def test_failed_upstream_blocks_and_status_says_why(store: EtcdStore,
                                                    fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    r.run_pass()
    fake.set_state("04_pipeline", run_id_for(CYCLE), "running")
    fake.set_state("04_pipeline", run_id_for(CYCLE), "failed")
    fake.finish_all()
    report = r.run_pass()
    assert report.actions == []
    status = report.plan.status("06_pipeline", CYCLE)
    assert status.state.value == "blocked"
    assert "04_pipeline" in status.message
    observed = store.read_observed()
    assert observed[(CYCLE.isoformat(), "06_pipeline")]["state"] == "blocked"
    assert fake.runs("06_pipeline") == []


class Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


def test_crash_between_intent_and_call_neither_duplicates_nor_loses(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    real_trigger = r.api.trigger
    calls = []

    def dying_trigger(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == 2:
            raise Crash  # after the intent of the 2nd action, before its call
        return real_trigger(*args, **kwargs)  # type: ignore[arg-type]

    r.api.trigger = dying_trigger  # type: ignore[method-assign]
    with pytest.raises(Crash):
        r.run_pass()
    crashed = calls[1][0]
    ledger = store.read_ledger()
    assert ledger[(CYCLE.isoformat(), crashed)]["state"] == "intent"
    assert fake.runs(crashed) == []
    r.store.resign(r.lease)  # the lease would lapse after its TTL; do not wait for it
    restarted = reconciler(store, fake, holder="r1-restarted")
    converge(restarted, fake)
    for dag_id in DAGS[1:]:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)]


def test_crash_after_the_call_before_the_result_adopts_on_409(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    real_trigger = r.api.trigger

    def trigger_then_die(*args: object, **kwargs: object) -> object:
        real_trigger(*args, **kwargs)  # type: ignore[arg-type]
        raise Crash

    r.api.trigger = trigger_then_die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        r.run_pass()
    r.store.resign(r.lease)
    restarted = reconciler(store, fake, holder="r2")
    converge(restarted, fake)
    for dag_id in DAGS[1:]:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)]


def test_only_the_leader_acts_and_a_standby_takes_over(store: EtcdStore,
                                                       fake: FakeAirflow) -> None:
    open_cycle(fake)
    a, b = reconciler(store, fake, "a"), reconciler(store, fake, "b")
    assert a.run_pass().leader
    fake.finish_all()
    standby = b.run_pass()
    assert not standby.leader
    assert standby.actions == []
    a.resign()
    took_over = b.run_pass()
    assert took_over.leader
    assert [x.dag_id for x in took_over.actions] == ["06_pipeline"]
    for dag_id in EXTRACTS:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)]


def test_a_deposed_leader_cannot_write_the_ledger(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    a = reconciler(store, fake, "a")
    a.run_pass()
    store.resign(a.lease)  # a's lease is gone but `a` does not know yet
    b = reconciler(store, fake, "b")
    assert b.run_pass().leader
    a._lease_refreshed = a.clock.monotonic()  # a believes it still leads
    fake.finish_all()
    with pytest.raises(Exception, match="leader"):
        a.run_pass()
    assert fake.runs("06_pipeline") == []


def test_airflow_5xx_is_retried_and_nothing_is_lost(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    fake.faults = [("500", 0)] * 5
    with pytest.raises(AirflowUnavailable):
        r.run_pass()
    fake.faults = []
    converge(r, fake)
    for dag_id in DAGS[1:]:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)]


@pytest.mark.parametrize("as_url", [False, True], ids=["local-path", "clone-url"])
def test_pull_mode_syncs_new_commits_of_the_branch_itself(etcd_settings: EtcdSettings,
                                                          tmp_path: Path, fake: FakeAirflow,
                                                          as_url: bool) -> None:
    from reconciler.cli.loop_cmds import _puller
    from tests.helpers import git

    origin = example_repo(tmp_path / "origin")
    branch = git(origin, "rev-parse", "--abbrev-ref", "HEAD")
    with EtcdStore(etcd_settings) as s:
        source = f"file://{origin}" if as_url else str(origin)
        pull = _puller(source, branch, "pipelines", str(tmp_path / "clone"), s)
        r = Reconciler(s, client(fake), LoopSettings(), holder="puller", pull=pull,
                       pull_interval=0)
        r.run_pass()
        assert r.desired is not None
        assert r.desired.commit == git(origin, "rev-parse", "HEAD")
        (origin / "pipelines" / "08_pipeline.yaml").write_text(
            "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
        git(origin, "add", ".")
        git(origin, "commit", "-qm", "add 08")
        r.head_dirty.set()  # what the etcd watch does in `run_forever`
        r.run_pass()
        assert r.desired.commit == git(origin, "rev-parse", "HEAD")
        assert "08_pipeline" in r.desired.graph


def test_a_quiet_pass_reuses_the_plan_and_a_change_replans(
        store: EtcdStore, fake: FakeAirflow, monkeypatch: pytest.MonkeyPatch) -> None:
    import reconciler.service.loop as loop_module

    calls = []
    real_plan = loop_module.plan

    def counting_plan(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_plan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop_module, "plan", counting_plan)
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    calls.clear()
    r.run_pass()
    r.run_pass()
    assert calls == []  # nothing changed: the last plan stands
    open_cycle(fake, CYCLE + timedelta(hours=1))  # a new root run arrives
    assert sorted(a.dag_id for a in r.run_pass().actions) == DAGS[1:5]
    assert calls
