"""The three scenarios of DESIGN section 1 (plus a failing upstream, a weekly root and a
crash), on a real Airflow standalone of each major (`bench`: 3.3 with API v2, then 2.11
with API v1) and a real etcd, asserted through Airflow's REST API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

from reconciler.adapters.store import EtcdStore
from reconciler.core.state import iso, run_id_for
from tests.e2e.conftest import DAGS, Bench, eventually, new_cycle

DOWNSTREAM = DAGS[1:]


def test_scenario_1_normal_every_downstream_once_with_the_cycle_logical_date(
        bench: Bench) -> None:
    bench.start()
    cycle = new_cycle()
    bench.open_cycle(cycle)
    last = bench.wait_done("07_pipeline", cycle)
    assert last.state == "success"
    ends = {}
    for dag_id in DOWNSTREAM:
        (run,) = bench.runs(dag_id, cycle)
        assert run.run_id == run_id_for(cycle)
        assert run.logical_date == cycle
        assert run.state == "success"
        assert run.conf["reconciler"]["cycle"] == iso(cycle)
        ends[dag_id] = run
    # each ran after all of its upstreams ended
    for extract in ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"):
        assert ends[extract].start_date >= bench.run("01_pipeline_init", cycle).end_date
        assert ends["06_pipeline"].start_date >= ends[extract].end_date
    assert ends["07_pipeline"].start_date >= ends["06_pipeline"].end_date
    # the pipeline's own conf beside the provenance, as Airflow holds it (the loop's run
    # cache keeps only the provenance of a conf)
    held = bench.api.get_run("06_pipeline", ends["06_pipeline"].run_id)
    assert held is not None
    assert held["conf"]["target"] == "mart"


def test_scenario_2_rerun_of_03_reruns_06_and_07_only(bench: Bench) -> None:
    bench.start()
    cycle = new_cycle()
    bench.open_cycle(cycle)
    bench.wait_done("07_pipeline", cycle)
    before = {d: bench.run(d, cycle) for d in DOWNSTREAM}
    bench.api.clear("03_pipeline", run_id_for(cycle))
    bench.wait_done("03_pipeline", cycle, after=before["03_pipeline"].end_date)
    six = bench.wait_done("06_pipeline", cycle, after=before["06_pipeline"].end_date)
    seven = bench.wait_done("07_pipeline", cycle, after=before["07_pipeline"].end_date)
    three = bench.run("03_pipeline", cycle)
    assert six.start_date >= three.end_date
    assert seven.start_date >= six.end_date
    time.sleep(3)  # a few more passes: nothing else may move
    for dag_id in ("02_pipeline", "04_pipeline", "05_pipeline"):
        assert bench.run(dag_id, cycle).end_date == before[dag_id].end_date
    for dag_id in DOWNSTREAM:
        assert len(bench.runs(dag_id, cycle)) == 1


def test_scenario_3_reconciler_off_then_every_missing_run_once(bench: Bench) -> None:
    cycles = [new_cycle(), new_cycle()]
    for cycle in cycles:
        bench.open_cycle(cycle)
    for cycle in cycles:
        bench.wait_done("01_pipeline_init", cycle)
    time.sleep(2)
    for cycle in cycles:
        for dag_id in DOWNSTREAM:
            assert bench.runs(dag_id, cycle) == [], f"{dag_id} ran without the reconciler"
    bench.start()
    for cycle in cycles:
        bench.wait_done("07_pipeline", cycle)
    for cycle in cycles:
        for dag_id in DOWNSTREAM:
            (run,) = bench.runs(dag_id, cycle)
            assert run.run_id == run_id_for(cycle)
            assert run.state == "success"


def test_a_weekly_root_is_reconciled_although_its_logical_date_is_a_week_old(
        bench: Bench) -> None:
    """A data-interval timetable: the run of a week starts when the week ends, its logical
    date the week's start; the cycle is open because the run is recent, not its date."""
    bench.start()
    cycle = new_cycle() - timedelta(days=7)
    bench.open_cycle(cycle)
    assert bench.wait_done("07_pipeline", cycle).state == "success"
    for dag_id in DOWNSTREAM:
        (run,) = bench.runs(dag_id, cycle)
        assert run.run_id == run_id_for(cycle)
        assert run.logical_date == cycle


def test_a_failed_upstream_blocks_its_downstream_and_status_says_why(bench: Bench) -> None:
    cycle = new_cycle()
    bench.open_cycle(cycle)
    bench.wait_done("01_pipeline_init", cycle)
    # someone runs 04 by hand for this cycle, and it fails: the reconciler adopts it
    bench.api.trigger("04_pipeline", run_id_for(cycle), cycle, {"fail": True})
    assert bench.wait_done("04_pipeline", cycle).state == "failed"
    bench.start()
    for dag_id in ("02_pipeline", "03_pipeline", "05_pipeline"):
        bench.wait_done(dag_id, cycle)
    time.sleep(3)
    assert bench.runs("06_pipeline", cycle) == []
    assert bench.runs("07_pipeline", cycle) == []
    status = subprocess.run([sys.executable, "-m", "reconciler", "status", "--cycle",
                             iso(cycle), "--output", "json"], env=bench.env(),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    by_dag = {s["dag_id"]: s for s in json.loads(status.stdout)["statuses"]}
    assert by_dag["06_pipeline"]["state"] == "blocked"
    assert by_dag["06_pipeline"]["blocked_by"] == ["04_pipeline"]
    assert "04_pipeline" in by_dag["06_pipeline"]["message"]
    assert by_dag["07_pipeline"]["state"] in ("blocked", "waiting")
    text = subprocess.run([sys.executable, "-m", "reconciler", "status", "--cycle",
                           iso(cycle)], env=bench.env(), capture_output=True, text=True,
                          timeout=60)
    assert "06_pipeline" in text.stdout
    assert "failed 04_pipeline" in text.stdout


def test_sigkill_between_intent_and_call_neither_duplicates_nor_loses(bench: Bench) -> None:
    cycle = new_cycle()
    crashing = bench.start(RECONCILER_FAILPOINT="after-intent:trigger:06_pipeline")
    bench.open_cycle(cycle)
    # The root and 02-05 run first: minutes on a loaded machine with Airflow 2.
    assert eventually(lambda: crashing.poll() is not None, 480, "the failpoint to fire")
    assert crashing.returncode == -9
    bench.process = None
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"):
        assert bench.run(dag_id, cycle).state == "success"
    with EtcdStore(bench.etcd) as store:
        entry = store.read_ledger()[(iso(cycle), "06_pipeline")]
    assert entry["state"] == "intent"
    assert bench.runs("06_pipeline", cycle) == []
    bench.start()  # restart without the failpoint
    bench.wait_done("07_pipeline", cycle)
    for dag_id in DOWNSTREAM:
        assert [r.run_id for r in bench.runs(dag_id, cycle)] == [run_id_for(cycle)]
