"""One graph across two real Airflows (issue 18, item 6): the e2e counterpart of
tests/integration/test_fleet.py, with the session's `airflow standalone` of each major
(2.11 with API v1, 3.3 with API v2, each with the listener plugin) and `reconciler run` as
a real process.

The example graph is split so that dependencies cross back and forth: the root 01 and the
join 06 run in `af2` (Airflow 2, the default deployment), the fan-out 02-05 and the tail
07 in `af3` (Airflow 3, `deployment: af3` in their pipeline files). Both Airflows have all
seven DAGs, so a call routed to the wrong one would succeed there: each test therefore
asserts exactly-once per cycle on both sides (one run in the pipeline's Airflow, with the
cycle's run id and logical date; none of that cycle in the other one).

af3 is declared behind a FaultProxy (tests/fixtures/proxy.py), so that a test can take it
down (`refuse()`) and bring it back; af2 is declared with its own URL, which is also the
settings' Airflow (RECONCILER_AIRFLOW_*), the one that must answer when the loop starts.

The listener plugins of the session's Airflows write their events into their own fixed
namespaces (EVENTS_NAMESPACE / EVENTS2_NAMESPACE), not the bench's: the reconciler here
works by polling alone (RECONCILER_INTERVAL 0.5 s), which is what it must do anyway when
events are lost.

Timings are printed in the terminal summary (`note`): Airflow 2's LocalExecutor starts a
process per task, so a cycle takes a minute or more on a busy machine."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.core.state import DagRun, iso, run_id_for
from reconciler.service.sync import sync
from tests.e2e.conftest import DAGS, Bench, client_of, eventually, new_cycle
from tests.fixtures.airflow import note
from tests.fixtures.proxy import FaultProxy
from tests.helpers import example_repo, git

DOWNSTREAM = DAGS[1:]
FANOUT = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
HOME = {"01_pipeline_init": "af2", "06_pipeline": "af2",
        **dict.fromkeys([*FANOUT, "07_pipeline"], "af3")}
OTHER = {"af2": "af3", "af3": "af2"}
CYCLE_TIMEOUT = 600.0  # Airflow 2's tasks take 10-30 s each here; a cycle crosses it twice


class TwoAirflows(Bench):
    """A Bench whose graph spans af2 (the session's Airflow 2) and af3 (its Airflow 3,
    behind `proxy`). `api` (the root's Airflow, Bench.open_cycle) is af2; `runs` and
    `wait_done` ask the Airflow the pipeline belongs to now (`home`)."""

    def __init__(self, af2: Any, af3: Any, proxy: FaultProxy, etcd: EtcdSettings,
                 repo: Path, log_dir: Path) -> None:
        super().__init__(af2, etcd, repo, log_dir)
        self.af3_server = af3
        self.proxy = proxy
        # the bench's own reads go straight to each Airflow, never through the proxy
        self.clients: dict[str, AirflowClient] = {"af2": self.api, "af3": client_of(af3)}
        self.home = dict(HOME)

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(AF2_PASSWORD=self.airflow.password,
                           AF3_PASSWORD=self.af3_server.password, **extra)

    def runs_in(self, deployment: str, dag_id: str, cycle: datetime) -> list[DagRun]:
        client = self.clients[deployment]
        found = [r for r in (DagRun.from_api(x) for x in client.list_runs(
                     dag_ids=[dag_id], logical_date_gte=cycle))
                 if r.logical_date == cycle]
        by_id = client.get_run(dag_id, run_id_for(cycle))
        if by_id is not None and all(r.run_id != by_id["dag_run_id"] for r in found):
            found.append(DagRun.from_api(by_id))
        return found

    def runs(self, dag_id: str, cycle: datetime) -> list[DagRun]:
        return self.runs_in(self.home[dag_id], dag_id, cycle)

    def move(self, dag_id: str, to: str, now: datetime | None = None) -> None:
        """The migration PR: `dag_id`'s `deployment:` line, committed and synced."""
        path = self.repo / "pipelines" / f"{dag_id}.yaml"
        text = path.read_text().replace("deployment: af3\n", "")
        path.write_text(text + ("deployment: af3\n" if to == "af3" else ""))
        git(self.repo, "commit", "-qam", f"{dag_id} to {to}")
        with EtcdStore(self.etcd) as store:
            result = sync(self.repo, "HEAD", "pipelines", store, source="e2e",
                          now=now or datetime.now(UTC))
            assert result.ok, result
        self.home[dag_id] = to

    def wait_cycle(self, cycle: datetime) -> DagRun:
        return self.wait_done("07_pipeline", cycle, CYCLE_TIMEOUT)

    def assert_once(self, cycle: datetime, where: dict[str, str] | None = None) -> None:
        """Each pipeline ran exactly once for `cycle`, in its Airflow (`where` overrides
        `home`), with the cycle's run id and logical date, and not at all in the other."""
        where = {**self.home, **(where or {})}
        for dag_id in DOWNSTREAM:
            runs = self.runs_in(where[dag_id], dag_id, cycle)
            assert [(r.run_id, r.logical_date, r.state) for r in runs] == [
                (run_id_for(cycle), cycle, "success")], (dag_id, where[dag_id], runs)
            assert runs[0].conf["reconciler"]["cycle"] == iso(cycle), dag_id
            other = self.runs_in(OTHER[where[dag_id]], dag_id, cycle)
            assert other == [], f"{dag_id} also ran in {OTHER[where[dag_id]]}: {other}"
        roots = self.runs_in("af3", "01_pipeline_init", cycle)
        assert roots == [], f"a root run of {iso(cycle)} in af3: {roots}"

    def status(self, cycle: datetime, *args: str) -> dict[str, dict[str, Any]]:
        """`reconciler status --cycle <cycle> -o json` (+ args): the rows by pipeline."""
        proc = subprocess.run([sys.executable, "-m", "reconciler", "status", "--cycle",
                               iso(cycle), "-o", "json", *args], env=self.env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        return {s["dag_id"]: s for s in json.loads(proc.stdout)["statuses"]}


def declare(repo: Path, af2: Any, af3_url: str, af3: Any) -> None:
    """The two deployments in git, and 02-05 and 07 moved to af3 (one line each)."""
    folder = repo / "airflow-deployments"
    folder.mkdir()
    for name, url, server, api, default in (("af2", af2.url, af2, "v1", True),
                                            ("af3", af3_url, af3, "v2", False)):
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nurl: {url}\napi: {api}\nauth:\n  kind: password\n"
            f"  username: {server.username}\n  password_env: {name.upper()}_PASSWORD\n"
            + ("default: true\n" if default else ""))
    for dag_id, deployment in HOME.items():
        if deployment == "af3":
            path = repo / "pipelines" / f"{dag_id}.yaml"
            path.write_text(path.read_text() + "deployment: af3\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "two deployments")


@contextlib.contextmanager
def two_airflows(af2: Any, af3: Any, etcd_server: Any, path: Path) -> Iterator[TwoAirflows]:
    """A bench in a fresh namespace, af3 behind a proxy. The graph is synced just before
    the test's first cycle opens: the cycles other tests of the session left in the same
    Airflows opened before its pipelines were added, so its reconciler leaves them alone
    (backfill: false, core/plan.py) instead of running them where this graph says."""
    with FaultProxy(af3.url) as proxy:
        repo = example_repo(path / "repo")
        declare(repo, af2, proxy.url, af3)
        etcd = EtcdSettings(endpoints=(etcd_server.endpoint,), prefix="e2e",
                            namespace=f"n{uuid.uuid4().hex[:10]}")
        with EtcdStore(etcd) as store:
            result = sync(repo, "HEAD", "pipelines", store, source="e2e",
                          now=datetime.now(UTC) - timedelta(seconds=5))
            assert result.ok, result
        bench = TwoAirflows(af2, af3, proxy, etcd, repo, path)
        started = time.monotonic()
        try:
            yield bench
        finally:
            bench.stop()
            note(f"two airflows: bench {path.name} lived {time.monotonic() - started:.0f} s")


@pytest.fixture
def two(airflow2_server: Any, airflow_server: Any, etcd_server: Any,
        tmp_path: Path) -> Iterator[TwoAirflows]:
    with two_airflows(airflow2_server, airflow_server, etcd_server, tmp_path) as bench:
        yield bench


@pytest.fixture(scope="module")
def normal(airflow2_server: Any, airflow_server: Any, etcd_server: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwoAirflows, datetime]]:
    """One normal cycle, run once for scenarios 1 and 2 (the reconciler stopped after it:
    no reconciler of this bench runs during another test)."""
    path = tmp_path_factory.mktemp("two-airflows-normal")
    with two_airflows(airflow2_server, airflow_server, etcd_server, path) as bench:
        bench.start()
        cycle = new_cycle()
        started = time.monotonic()
        bench.open_cycle(cycle)
        bench.wait_cycle(cycle)
        note(f"two airflows: a normal cycle took {time.monotonic() - started:.0f} s")
        bench.stop()
        yield bench, cycle


def test_scenario_1_normal_crosses_both_airflows_once_under_one_logical_date(
        normal: tuple[TwoAirflows, datetime]) -> None:
    two, cycle = normal
    two.assert_once(cycle)
    ends = {d: two.run(d, cycle) for d in DAGS}
    for extract in FANOUT:  # the fan-out (af3) after the root (af2), the join after them
        assert ends[extract].start_date >= ends["01_pipeline_init"].end_date
        assert ends["06_pipeline"].start_date >= ends[extract].end_date
    assert ends["07_pipeline"].start_date >= ends["06_pipeline"].end_date
    held = two.clients["af2"].get_run("06_pipeline", run_id_for(cycle))
    assert held is not None
    assert held["conf"]["target"] == "mart"  # the pipeline's conf, in the join's Airflow


def test_scenario_2_clear_in_af3_reruns_the_join_in_af2_and_the_tail_once(
        normal: tuple[TwoAirflows, datetime]) -> None:
    two, cycle = normal
    before = {d: two.run(d, cycle) for d in DAGS}
    two.start()
    try:
        started = time.monotonic()
        two.clients["af3"].clear("03_pipeline", run_id_for(cycle))
        two.wait_done("03_pipeline", cycle, CYCLE_TIMEOUT,
                      after=before["03_pipeline"].end_date)
        six = two.wait_done("06_pipeline", cycle, CYCLE_TIMEOUT,
                            after=before["06_pipeline"].end_date)
        seven = two.wait_done("07_pipeline", cycle, CYCLE_TIMEOUT,
                              after=before["07_pipeline"].end_date)
        note(f"two airflows: the re-run after a clear took {time.monotonic() - started:.0f} s")
        three = two.run("03_pipeline", cycle)
        assert six.start_date >= three.end_date
        assert seven.start_date >= six.end_date
        time.sleep(5)  # a few more passes: nothing else may move
    finally:
        two.stop()
    for dag_id in ("01_pipeline_init", "02_pipeline", "04_pipeline", "05_pipeline"):
        assert two.run(dag_id, cycle).end_date == before[dag_id].end_date, dag_id
    for dag_id in ("06_pipeline", "07_pipeline"):  # re-run, not triggered again
        assert two.run(dag_id, cycle).end_date > before[dag_id].end_date, dag_id
    two.assert_once(cycle)


def test_scenario_3_reconciler_off_then_the_cycle_completes_once(two: TwoAirflows) -> None:
    cycle = new_cycle()
    two.open_cycle(cycle)
    two.wait_done("01_pipeline_init", cycle, CYCLE_TIMEOUT)
    time.sleep(2)
    for dag_id in DOWNSTREAM:
        for deployment in ("af2", "af3"):
            assert two.runs_in(deployment, dag_id, cycle) == [], \
                f"{dag_id} ran in {deployment} without the reconciler"
    started = time.monotonic()
    two.start()
    two.wait_cycle(cycle)
    note(f"two airflows: the catch-up took {time.monotonic() - started:.0f} s")
    time.sleep(3)
    two.assert_once(cycle)


def test_scenario_4_af3_down_mid_cycle_holds_back_only_its_pipelines(
        two: TwoAirflows) -> None:
    two.start()
    cycle = new_cycle()
    two.open_cycle(cycle)
    # the fan-out done in af3, the join triggered in af2: af3 goes down before the tail
    eventually(lambda: two.runs_in("af2", "06_pipeline", cycle), CYCLE_TIMEOUT,
               "06_pipeline to be triggered in af2")
    two.proxy.refuse()
    down = time.monotonic()
    # af2 goes on: the join ends there while af3 is down
    assert two.wait_done("06_pipeline", cycle, CYCLE_TIMEOUT).state == "success"

    def held_back() -> dict[str, dict[str, Any]] | None:
        rows = two.status(cycle, "--from-etcd")  # what the leader mirrored on its pass
        return rows if rows["07_pipeline"]["message"].startswith(
            "deployment af3 unreachable (") and rows["06_pipeline"]["state"] == "done" \
            else None

    rows = eventually(held_back, 60, "the leader to see 06 done and af3 unreachable", 1.0)
    assert rows["07_pipeline"]["state"] == "waiting", rows["07_pipeline"]
    assert rows["06_pipeline"]["state"] == "done", rows["06_pipeline"]
    assert rows["01_pipeline_init"]["state"] == "done", rows["01_pipeline_init"]
    for dag_id in FANOUT:  # what af3 ran is as last seen
        assert rows[dag_id]["state"] == "done", rows[dag_id]
    assert two.clients["af3"].get_run("07_pipeline", run_id_for(cycle)) is None
    # `plan` goes through the same fleet: it names the deployment and triggers nothing
    plan = subprocess.run([sys.executable, "-m", "reconciler", "plan", "-o", "json"],
                          env=two.env(), capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "deployment af3" in plan.stderr
    assert [a for a in json.loads(plan.stdout)["actions"]
            if a["dag_id"] == "07_pipeline"] == []
    time.sleep(3)
    assert two.clients["af3"].get_run("07_pipeline", run_id_for(cycle)) is None
    two.proxy.pass_through()
    note(f"two airflows: af3 was down {time.monotonic() - down:.0f} s")
    started = time.monotonic()
    two.wait_cycle(cycle)
    note(f"two airflows: the tail after af3 came back took {time.monotonic() - started:.0f} s")
    time.sleep(3)
    two.assert_once(cycle)
    rows = two.status(cycle, "--from-etcd")
    assert all(r["state"] == "done" for r in rows.values()), rows


def test_scenario_5_a_pipeline_moved_mid_cycle_is_not_run_again_and_runs_once_after(
        two: TwoAirflows) -> None:
    two.move("05_pipeline", "af2", now=datetime.now(UTC) - timedelta(seconds=5))
    two.start()
    c1, c2 = new_cycle(), new_cycle()
    started = time.monotonic()
    for cycle in (c1, c2):
        two.open_cycle(cycle)
    # both cycles' 05 triggered in af2 (c2's, or both, still in flight): the move lands
    for cycle in (c1, c2):
        eventually(lambda cycle=cycle: two.runs_in("af2", "05_pipeline", cycle),
                   CYCLE_TIMEOUT, f"05_pipeline to be triggered in af2 for {iso(cycle)}")
    two.move("05_pipeline", "af3")
    c3 = new_cycle()  # the first cycle after the move
    two.open_cycle(c3)
    for cycle in (c1, c2, c3):
        two.wait_cycle(cycle)
    note(f"two airflows: three cycles across a move took {time.monotonic() - started:.0f} s")
    time.sleep(3)
    for cycle in (c1, c2):  # ran in af2, not again in af3
        two.assert_once(cycle, where={"05_pipeline": "af2"})
    two.assert_once(c3)  # 05 once, in af3
    with EtcdStore(two.etcd) as store:
        ledger = store.read_ledger()
    assert ledger[(iso(c2), "05_pipeline")]["deployment"] == "af2"
    assert ledger[(iso(c3), "05_pipeline")]["deployment"] == "af3"
    assert ledger[(iso(c3), "06_pipeline")]["deployment"] == "af2"


def test_status_live_while_af3_is_down_shows_its_pipelines_held_back(
        two: TwoAirflows) -> None:
    two.proxy.refuse()
    proc = subprocess.run([sys.executable, "-m", "reconciler", "status", "--live", "-o",
                           "json"], env=two.env(), capture_output=True, text=True,
                          timeout=120)
    note(f"two airflows: status --live with af3 down: exit {proc.returncode}, "
         f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''}")
    assert proc.returncode == 0, proc.stderr
    assert "deployment af3" in proc.stderr
    assert json.loads(proc.stdout)["kind"] == "Status"
