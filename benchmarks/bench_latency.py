"""Edge latency of the reconciler on a real Airflow 3 standalone and a real etcd.

For the example graph, over several cycles, per dependency edge (upstream -> downstream):
  own delay   = downstream run queued_at - latest upstream end_date (the reconciler's part)
  edge latency = downstream run start_date - latest upstream end_date (what a user sees)
and per cycle the time from the root run's end to the last pipeline's end. Reference:
Airflow's partitioned assets took about 1.0 s from an upstream's end to the downstream's
start on this machine (DESIGN section 1).

Two modes, one Airflow: `poll` (the reconciler alone, --interval 1) and `events` (the
optional Airflow listener plugin writes etcd wake-ups when a run ends).

    python benchmarks/bench_latency.py [--cycles 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from airflow_env import start_airflow  # noqa: E402

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings  # noqa: E402
from reconciler.core.state import DagRun  # noqa: E402
from reconciler.service.sync import read_synced_graph, sync  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402
from tests.helpers import example_repo  # noqa: E402


def runs_of_cycle(api: AirflowClient, cycle: datetime) -> dict[str, DagRun]:
    out = {}
    for raw in api.list_runs(logical_date_gte=cycle):
        run = DagRun.from_api(raw)
        if run.logical_date == cycle:
            out[run.dag_id] = run
    return out


def measure(mode: str, airflow: object, etcd: EtcdServer, repo: Path, cycles: int,
            offset: int) -> tuple[list[float], list[float], list[float]]:
    namespace = f"bench-{mode}"
    settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace=namespace)
    with EtcdStore(settings) as store:
        sync(repo, "HEAD", "pipelines", store, source="bench",
             now=datetime.now(UTC) - timedelta(days=1))
        _, graph = read_synced_graph(store, None)
    env = dict(os.environ, RECONCILER_ETCD_ENDPOINTS=etcd.endpoint,
               RECONCILER_NAMESPACE=namespace, RECONCILER_AIRFLOW_URL=airflow.url,
               RECONCILER_AIRFLOW_USERNAME=airflow.username,
               RECONCILER_AIRFLOW_PASSWORD=airflow.password, RECONCILER_INTERVAL="1",
               RECONCILER_HTTP_PORT="0", RECONCILER_WINDOW="1d")
    log = open(repo.parent / f"reconciler-{mode}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = AirflowClient(AirflowSettings(url=airflow.url, username=airflow.username,
                                        password=airflow.password))
    own, edge, total = [], [], []
    try:
        base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=6)
        for i in range(cycles):
            cycle = base + timedelta(minutes=offset + i)
            api.trigger("01_pipeline_init", f"bench__{cycle.isoformat()}", cycle, {})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                runs = runs_of_cycle(api, cycle)
                last = runs.get("07_pipeline")
                if last is not None and last.state in ("success", "failed"):
                    break
                time.sleep(1)
            else:
                raise SystemExit(f"cycle {cycle} did not finish; see {log.name}")
            runs = runs_of_cycle(api, cycle)
            for dag_id in graph.topological_order():
                ups = graph.upstreams(dag_id)
                if not ups:
                    continue
                ready = max(runs[u].end_date for u in ups)  # type: ignore[type-var]
                run = runs[dag_id]
                own.append((run.queued_at - ready).total_seconds())  # type: ignore[operator]
                edge.append((run.start_date - ready).total_seconds())  # type: ignore[operator]
            ends = [r.end_date for r in runs.values()]
            total.append((max(ends) - runs["01_pipeline_init"].end_date).total_seconds())  # type: ignore[operator,type-var]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return own, edge, total


def show(mode: str, own: list[float], edge: list[float], total: list[float]) -> None:
    print(f"{mode}: {len(own)} edges over {len(total)} cycles")
    print(f"  reconciler's own delay (queued_at - upstream end): median "
          f"{statistics.median(own):.3f} s, max {max(own):.3f} s")
    print(f"  edge latency (start_date - upstream end):          median "
          f"{statistics.median(edge):.3f} s, max {max(edge):.3f} s  (assets: ~1.0 s)")
    print(f"  root end -> last pipeline end per cycle:           median "
          f"{statistics.median(total):.1f} s, max {max(total):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        repo = example_repo(work / "repo")
        etcd = EtcdServer(work / "etcd").start()
        try:
            airflow = start_airflow(work / "airflow", extra_env={
                "EXAMPLE_ROOT_SCHEDULE": "none",
                "RECONCILER_EVENTS_ETCD_URL": f"http://{etcd.endpoint}",
                "RECONCILER_EVENTS_PREFIX": "/reconciler/bench-events/",
            })
            try:
                results = {}
                results["poll (--interval 1)"] = measure("poll", airflow, etcd, repo,
                                                         args.cycles, 0)
                results["events (listener plugin)"] = measure("events", airflow, etcd, repo,
                                                              args.cycles, 100)
                for mode, figures in results.items():
                    show(mode, *figures)
            finally:
                airflow.stop()
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
