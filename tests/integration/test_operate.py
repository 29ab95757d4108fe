"""The operator commands against a real etcd (and the fake Airflow where they need it):
status from etcd's mirror without Airflow credentials, suspend/resume honoured by the
loop, reconcile, rollback N, wait, doctor."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.store import EtcdStore
from reconciler.cli import main
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.observability import Health
from reconciler.service.runner import Runner
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.helpers import EXAMPLE_DAGS, example_repo, git

CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


class ScheduledFake(FakeAirflow):
    """The fake Airflow, with the DAG list's `timetable_summary` (a schedule per DAG) and
    DAGs that can be missing from the list."""

    def __init__(self, dag_ids: list[str]) -> None:
        super().__init__(dag_ids)
        self.schedules: dict[str, str | None] = dict.fromkeys(dag_ids)
        self.schedules["01_pipeline_init"] = "@hourly"
        self.hidden: set[str] = set()

    def _dags(self, h: Any, method: str, rest: list[str], query: dict[str, list[str]],
              body: Any, user: str) -> None:
        if not rest and method == "GET":
            dags = [{"dag_id": d, "is_paused": self.paused[d], "is_stale": False,
                     "timetable_summary": self.schedules.get(d)}
                    for d in sorted(self.dag_ids) if d not in self.hidden]
            return self._reply(h, 200, {"dags": dags, "total_entries": len(dags)})
        return super()._dags(h, method, rest, query, body, user)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return example_repo(tmp_path / "repo")


@pytest.fixture
def store(etcd_settings: EtcdSettings, repo: Path) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings)
    assert sync(repo, "HEAD", "pipelines", s, source="test",
                now=datetime.now(UTC) - timedelta(days=60)).ok
    yield s
    s.close()


@pytest.fixture
def fake() -> Iterator[ScheduledFake]:
    with ScheduledFake(EXAMPLE_DAGS) as f:
        f.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                  run_type="scheduled")
        f.finish_all()
        yield f


def loop(store: EtcdStore, fake: FakeAirflow, holder: str = "r1") -> Reconciler:
    api = AirflowClient(AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                                        timeout=2, retries=2), backoff_initial=0.01)
    return Reconciler(store, api, LoopSettings(interval=0.05, lease_ttl=6), holder=holder)


def etcd_env(etcd: EtcdSettings) -> dict[str, str]:
    return {"RECONCILER_ETCD_ENDPOINTS": ",".join(etcd.endpoints),
            "RECONCILER_ETCD_PREFIX": etcd.prefix, "RECONCILER_NAMESPACE": etcd.namespace,
            "RECONCILER_AIRFLOW_USERNAME": "", "RECONCILER_AIRFLOW_PASSWORD": "",
            "RECONCILER_AIRFLOW_TOKEN": ""}


def cli(etcd: EtcdSettings, *args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env={**etcd_env(etcd), **env},
                              catch_exceptions=False)


def airflow_env(fake: FakeAirflow) -> dict[str, str]:
    return {"RECONCILER_AIRFLOW_URL": fake.url, "RECONCILER_AIRFLOW_USERNAME": "admin",
            "RECONCILER_AIRFLOW_PASSWORD": "secret-pw"}


def test_status_reads_the_mirror_without_airflow_credentials_with_a_header_and_filters(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    r = loop(store, fake)
    r.run_pass()
    result = cli(etcd_settings, "status")
    assert result.exit_code == 0, result.output
    head, _ = store.read_head()
    assert head is not None
    assert f"commit {head.commit[:12]}" in result.output
    assert "leader r1" in result.output
    assert "(etcd mirror)" in result.output
    assert "last pass never" not in result.output
    assert "06_pipeline" in result.output
    data = json.loads(cli(etcd_settings, "status", "-o", "json", "--dag", "06_pipeline",
                          "--dag", "07_pipeline").output)
    assert data["kind"] == "Status"
    assert data["header"]["commit"] == head.commit
    assert data["header"]["leader"] == "r1"
    assert {s["dag_id"] for s in data["statuses"]} == {"06_pipeline", "07_pipeline"}
    assert {s["state"] for s in data["statuses"]} == {"waiting"}
    only = json.loads(cli(etcd_settings, "status", "--output", "json", "--state",
                          "triggering", "--state", "queued").output)
    assert {s["dag_id"] for s in only["statuses"]} == {"02_pipeline", "03_pipeline",
                                                       "04_pipeline", "05_pipeline"}
    none = cli(etcd_settings, "status", "--state", "failed")
    assert none.exit_code == 1
    assert "no pipeline matches" in none.output


def test_status_live_says_when_a_dag_is_paused(store: EtcdStore, etcd_settings: EtcdSettings,
                                               fake: FakeAirflow) -> None:
    fake.paused["03_pipeline"] = True
    loop(store, fake).run_pass()
    result = cli(etcd_settings, "status", "--live", "-o", "json", "--dag", "03_pipeline",
                 **airflow_env(fake))
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["statuses"]
    assert row["paused"] is True
    assert "paused in Airflow" in row["message"]


def test_suspend_is_honoured_by_the_loop_and_resume_catches_up(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    assert cli(etcd_settings, "suspend", "03_pipeline", "-m", "incident 7").exit_code == 0
    r = loop(store, fake)
    report = r.run_pass()
    assert sorted(a.dag_id for a in report.actions) == ["02_pipeline", "04_pipeline",
                                                        "05_pipeline"]
    text = cli(etcd_settings, "status", "--dag", "03_pipeline").output
    assert "suspended" in text
    assert "incident 7" in text
    fake.finish_all()
    assert r.run_pass().actions == []  # 06 waits for the suspended 03
    assert cli(etcd_settings, "resume", "03_pipeline").exit_code == 0
    r.observer.suspended_dirty.set()  # what the runner's watch does
    assert [a.dag_id for a in r.run_pass().actions] == ["03_pipeline"]
    assert fake.runs("03_pipeline")[0].run_id == run_id_for(CYCLE)
    again = cli(etcd_settings, "resume", "03_pipeline")
    assert again.exit_code == 1
    assert "was not suspended" in again.output


def test_suspend_after_a_finished_cycle_leaves_what_ran_as_it_is_in_etcd(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    r = loop(store, fake)
    for _ in range(6):  # 02-05, then 06, then 07: the cycle runs to the end
        r.run_pass()
        fake.finish_all()
    r.run_pass()
    cycle = CYCLE.isoformat()
    assert cli(etcd_settings, "wait", "--cycle", cycle, "--timeout", "5").exit_code == 0
    assert cli(etcd_settings, "suspend", "03_pipeline", "-m", "INC-42").exit_code == 0
    r.observer.suspended_dirty.set()  # what the runner's watch does
    assert r.run_pass().actions == []
    # the mirror in etcd, which status and wait read, still says what Airflow says
    mirrored = {v["dag_id"]: v for v in store.read_observed().values()}
    assert {d: v["state"] for d, v in mirrored.items()} == dict.fromkeys(EXAMPLE_DAGS, "done")
    assert "held while 03_pipeline is suspended" in mirrored["06_pipeline"]["message"]
    waited = cli(etcd_settings, "wait", "--dag", "06_pipeline", "--cycle", cycle,
                 "--timeout", "5")
    assert waited.exit_code == 0, waited.output
    shown = cli(etcd_settings, "status", "--dag", "03_pipeline", "--dag", "06_pipeline")
    assert "waiting" not in shown.output
    assert "suspended: 03_pipeline by" in shown.output  # the header still says it


def test_a_resume_whose_read_meets_an_etcd_fault_is_read_again_next_pass(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulation (never-triggered): the watch said "marks changed", the pass that read
    # them met an etcd timeout, and the mark was forgotten: the resume was never seen.
    from reconciler.adapters.store import StoreUnavailable

    assert cli(etcd_settings, "suspend", "03_pipeline", "-m", "incident 8").exit_code == 0
    r = loop(store, fake)
    r.run_pass()
    fake.finish_all()
    assert cli(etcd_settings, "resume", "03_pipeline").exit_code == 0
    r.observer.suspended_dirty.set()  # what the runner's watch does
    real = EtcdStore.read_suspended

    def timed_out(self: EtcdStore) -> Any:
        raise StoreUnavailable("injected: etcd did not answer in time")

    monkeypatch.setattr(EtcdStore, "read_suspended", timed_out)
    with pytest.raises(StoreUnavailable):
        r.run_pass()  # this pass fails to read the marks
    monkeypatch.setattr(EtcdStore, "read_suspended", real)
    assert [a.dag_id for a in r.run_pass().actions] == ["03_pipeline"]


def test_a_new_graph_whose_read_meets_an_etcd_fault_is_read_again_next_pass(
        store: EtcdStore, fake: FakeAirflow, repo: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.adapters.store import StoreUnavailable

    r = loop(store, fake)
    r.run_pass()
    first = r.observer.desired
    assert first is not None
    (repo / "pipelines" / "07_pipeline.yaml").unlink()
    git(repo, "commit", "-qam", "remove 07")
    assert sync(repo, "HEAD", "pipelines", store, source="test",
                now=datetime.now(UTC) - timedelta(days=59)).ok
    r.observer.head_dirty.set()  # the watch on desired/head
    real = EtcdStore.read_head

    def timed_out(self: EtcdStore) -> Any:
        raise StoreUnavailable("injected: etcd did not answer in time")

    monkeypatch.setattr(EtcdStore, "read_head", timed_out)
    with pytest.raises(StoreUnavailable):
        r.run_pass()
    monkeypatch.setattr(EtcdStore, "read_head", real)
    r.run_pass()
    assert r.observer.desired is not None
    assert r.observer.desired.commit != first.commit
    assert "07_pipeline" not in r.observer.desired.graph.pipelines


def test_suspending_the_namespace_stops_every_trigger(store: EtcdStore,
                                                     etcd_settings: EtcdSettings,
                                                     fake: FakeAirflow) -> None:
    assert cli(etcd_settings, "suspend", "--all", "-m", "freeze").exit_code == 0
    assert loop(store, fake).run_pass().actions == []
    assert fake.runs("02_pipeline") == []
    unknown = cli(etcd_settings, "suspend", "no_such_dag")
    assert unknown.exit_code == 1
    assert "not a pipeline of the synced graph" in unknown.output
    assert cli(etcd_settings, "suspend").exit_code == 2  # neither a DAG nor --all


def test_reconcile_wakes_the_runner_and_asks_for_a_relist(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    r = loop(store, fake)
    runner = Runner(r, Health())
    runner._ensure_watch()
    try:
        r.run_pass()
        assert r.observer.cache.listed_at is not None
        runner.wake.clear()
        result = cli(etcd_settings, "reconcile")
        assert result.exit_code == 0
        assert "asked r1" in result.output
        assert runner.wake.wait(10)
        assert r.observer.cache.listed_at is None
    finally:
        runner._drop_watch()


def test_rollback_n_makes_an_older_entry_the_head_again(
        store: EtcdStore, etcd_settings: EtcdSettings, repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    (repo / "pipelines" / "08_pipeline.yaml").write_text(
        "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "add 08")
    second = git(repo, "rev-parse", "HEAD")
    assert sync(repo, "HEAD", "pipelines", store, source="test").ok
    result = cli(etcd_settings, "rollback", "1", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "Rollback"
    assert data["changed"] is True
    head, _ = store.read_head()
    assert head is not None
    assert (head.commit, head.forced, head.previous, head.seq) == (first, True, second, 3)
    assert head.source.startswith("rollback:1 by ")
    noop = cli(etcd_settings, "rollback", "1")
    assert noop.exit_code == 0
    assert "is the head already" in noop.output
    assert store.read_head()[0].seq == 3  # type: ignore[union-attr]
    missing = cli(etcd_settings, "rollback", "99")
    assert missing.exit_code == 1
    assert "no history entry 99" in missing.output


def test_wait_returns_when_the_pipelines_reach_the_state_and_times_out_otherwise(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    r = loop(store, fake)
    r.run_pass()
    early = cli(etcd_settings, "wait", "--dag", "07_pipeline", "--timeout", "0.3s",
                "--every", "0.1")
    assert early.exit_code == 1
    assert "timed out after 0.3 s waiting for done: 07_pipeline waiting" in early.output

    def converge() -> None:
        for _ in range(10):
            r.run_pass()
            fake.finish_all()

    worker = threading.Thread(target=converge)
    worker.start()
    done = cli(etcd_settings, "wait", "--dag", "07_pipeline", "--cycle", CYCLE.isoformat(),
               "--timeout", "30s", "--every", "0.1")
    worker.join()
    assert done.exit_code == 0, done.output
    assert "07_pipeline: done" in done.output


def test_wait_stops_early_when_a_pipeline_settles_otherwise(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: FakeAirflow) -> None:
    r = loop(store, fake)
    r.run_pass()
    fake.finish_all("failed")
    r.run_pass()
    result = cli(etcd_settings, "wait", "--dag", "02_pipeline", "--timeout", "30s")
    assert result.exit_code == 1
    assert "settled otherwise: 02_pipeline failed" in result.output


def test_doctor_names_what_in_airflow_keeps_the_graph_from_running(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: ScheduledFake) -> None:
    fake.paused["06_pipeline"] = True
    fake.hidden.add("03_pipeline")
    fake.schedules["05_pipeline"] = "@daily"
    result = cli(etcd_settings, "doctor", "-o", "json", **airflow_env(fake))
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["kind"] == "Diagnosis"
    found = {(f["dag_id"], f["problem"]) for f in data["findings"]}
    assert found == {("03_pipeline", "missing"), ("06_pipeline", "paused"),
                     ("05_pipeline", "scheduled-downstream")}
    fake.paused["06_pipeline"] = False
    fake.hidden.clear()
    fake.schedules["05_pipeline"] = None
    assert cli(etcd_settings, "doctor", **airflow_env(fake)).exit_code == 0


def test_doctor_names_a_root_that_never_ran_inside_the_window(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    with ScheduledFake(EXAMPLE_DAGS) as idle:
        result = cli(etcd_settings, "doctor", **airflow_env(idle))
    assert result.exit_code == 1
    assert "01_pipeline_init: a root without a run inside the window" in result.output


def test_doctor_on_airflow_2_without_basic_auth_says_exactly_what_to_set(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    from tests.fakes.fake_airflow_v1 import FakeAirflowV1

    with FakeAirflowV1(EXAMPLE_DAGS, basic_auth=False) as airflow2:
        result = cli(etcd_settings, "doctor", **airflow_env(airflow2))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        "error: Airflow 2 at http://127.0.0.1:")
    assert result.output.rstrip().endswith(
        "set AIRFLOW__API__AUTH_BACKENDS=airflow.api.auth.backend.basic_auth,"
        "airflow.api.auth.backend.session and restart its webserver")
    with FakeAirflowV1(EXAMPLE_DAGS) as airflow2:  # basic auth on: doctor runs as on 3
        fine = cli(etcd_settings, "doctor", **airflow_env(airflow2))
    assert "01_pipeline_init: a root without a run inside the window" in fine.output
