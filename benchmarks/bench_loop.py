"""The loop at scale, on the fake Airflow API and a real etcd: 10,000 pipelines x 3 open
cycles, every run finished and recorded. Prints the time of the first pass (full relist,
ledger load), of a planning pass, and what a quiet pass costs: Airflow requests and etcd
writes (the target is 1 and 0).

    python benchmarks/bench_loop.py [--pipelines 10000] [--cycles 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import layered_graph, write_pipelines  # noqa: E402

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.plan import plan  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings  # noqa: E402
from reconciler.core.state import LedgerState, iso  # noqa: E402
from reconciler.service.loop import Reconciler  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fakes.fake_airflow import FakeAirflow  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    graph_spec = layered_graph(args.pipelines)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        write_pipelines(repo / "pipelines", graph_spec)
        for cmd in (["init", "-q"], ["config", "user.email", "b@x"], ["config", "user.name", "b"],
                    ["add", "."], ["commit", "-qm", "synthetic"]):
            subprocess.run(["git", *cmd], cwd=repo, check=True)
        etcd = EtcdServer(work / "etcd").start()
        try:
            settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace="bench")
            store = EtcdStore(settings)
            now = datetime.now(UTC)
            sync(repo, "HEAD", "pipelines", store, source="bench", now=now - timedelta(days=1))
            with FakeAirflow(list(graph_spec)) as fake:
                # every pipeline ran in every cycle, layer after layer
                cycles = [now.replace(microsecond=0) - timedelta(hours=h)
                          for h in range(args.cycles)]
                order = list(graph_spec)  # layered_graph lists ids layer by layer
                for cycle in cycles:
                    for i, dag_id in enumerate(order):
                        start = cycle + timedelta(seconds=i)
                        run = fake.add_run(dag_id, f"reconciler__{iso(cycle)}", cycle,
                                           state="success", start_date=start,
                                           end_date=start + timedelta(milliseconds=500))
                        run.queued_at = start
                api = AirflowClient(AirflowSettings(url=fake.url, username="admin",
                                                    password="secret-pw"))
                r = Reconciler(store, api, LoopSettings(interval=1), holder="bench")
                # Record the ledger the loop would have written (adopt = no Airflow call),
                # in bulk, so the benchmark starts from a steady state.
                seen = r.observer.observe(with_ledger=False)
                desired = seen.desired
                assert desired is not None
                result = plan(desired.graph, seen.runs.values(), {}, now,
                              window=timedelta(days=2), since=desired.since,
                              commit=desired.commit)
                puts = [(store.ledger_key(iso(a.cycle), a.dag_id),
                         json.dumps(a.ledger_entry(at=now, state=LedgerState.DONE).to_json())
                         .encode()) for a in result.actions]
                for i in range(0, len(puts), 100):
                    store.put_if_revision(store.key("bench-marker", str(i)), 0, b"1",
                                          also=puts[i:i + 100])
                started = time.perf_counter()
                first = r.run_pass()
                first_s = time.perf_counter() - started
                quiet_times, quiet = [], []
                for _ in range(5):
                    started = time.perf_counter()
                    quiet.append(r.run_pass())
                    quiet_times.append(time.perf_counter() - started)
                plan_times = []
                for _ in range(5):
                    started = time.perf_counter()
                    plan(desired.graph, r.observer.cache.runs.values(),
                         r.observer.ledger or {}, now, window=timedelta(days=2),
                         since=desired.since, commit=desired.commit)
                    plan_times.append(time.perf_counter() - started)
            print(f"loop: {args.pipelines} pipelines x {len(cycles)} open cycles, "
                  f"{len(r.observer.cache.runs)} runs, {len(puts)} ledger entries")
            print(f"  first pass (relist + ledger load + record): {first_s:.2f} s, "
                  f"{first.airflow_requests} Airflow requests, {first.etcd_writes} etcd writes, "
                  f"{len(first.actions)} actions")
            print(f"  plan() alone: median {statistics.median(plan_times) * 1000:.0f} ms")
            print(f"  quiet pass: median {statistics.median(quiet_times) * 1000:.0f} ms, "
                  f"Airflow requests {[q.airflow_requests for q in quiet]}, "
                  f"etcd writes {[q.etcd_writes for q in quiet]}, "
                  f"actions {[len(q.actions) for q in quiet]}")
            store.close()
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
