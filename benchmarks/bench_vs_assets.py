"""The example graph as Airflow's partitioned assets (A) and as plain DAGs driven by the
reconciler (B), side by side in ONE `airflow standalone`, with interleaved cycles.

    01 -> 02, 03, 04, 05 -> 06 (joins all four) -> 07

A: examples/assets/asset_graph.py (a01_assets_init .. a07_assets): each DAG's last task
   emits its asset; the downstreams are scheduled on the upstream assets
   (PartitionedAssetTimetable), the join on all four; the root is triggered with a
   partition key, which the chain carries.
B: examples/dags (01_pipeline_init .. 07_pipeline) and pipelines/: a real etcd, a
   `reconciler run` process (default settings), the listener plugin from examples/plugins
   writing wake-ups into etcd.

Both families' roots are triggered through the REST API, alternating A and B, `--gap`
seconds apart; the scheduler keeps Airflow's default settings (idle sleep 1 s; the test
bench's 0.2 s is undone). `--database sqlite` (the default) is standalone's own database,
in WAL mode with a 20 s lock wait (scripts/airflow_env.py); `--database postgres` is a
throwaway PostgreSQL (scripts/postgres_env.py), as deployed: with SQLite's one writer a
loaded 2-core machine makes both families wait for the database lock. Every
figure is read back from Airflow's own records (runs, and task instances through
/api/v2/dags/{dag}/dagRuns/{run}/taskInstances), per edge (upstream -> downstream; a
join counts from its latest upstream):

  run end -> run start     downstream run start_date - latest upstream run end_date
  work-to-work             downstream's first task start - latest upstream's last task end
  queued - task end        downstream run queued_at - latest upstream's last task end
  root end -> last end     per cycle: 07's run end - the root run's end

each as median, p90 and max for both families, with the ratio B/A. B is also checked for
no duplicate and no missing run: one run per pipeline and cycle, with the reconciler's
run id, every task instance on its first try. Target (DESIGN section 1): work-to-work
B/A <= 0.7 at the median and <= 1.0 at p90.

    python benchmarks/bench_vs_assets.py [--cycles 12] [--gap 8] [--database sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from airflow_env import EXAMPLE_DAGS, AirflowProcess, start_airflow  # noqa: E402
from postgres_env import PostgresProcess, start_postgres  # noqa: E402

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings  # noqa: E402
from reconciler.core.state import iso, parse_time, run_id_for  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402
from tests.helpers import example_repo  # noqa: E402

ASSET_DAGS = ["a01_assets_init", "a02_assets", "a03_assets", "a04_assets", "a05_assets",
              "a06_assets", "a07_assets"]
UPSTREAMS = {1: [], 2: [1], 3: [1], 4: [1], 5: [1], 6: [2, 3, 4, 5], 7: [6]}
"""The example graph by position (1 = the root), the same for both families."""
GROUPS = {"01 -> 02..05 (fan-out)": [2, 3, 4, 5], "02..05 -> 06 (join)": [6],
          "06 -> 07 (chain)": [7], "every edge": [2, 3, 4, 5, 6, 7]}
NAMESPACE = "bench-vs-assets"
AIRFLOW_DEFAULT_IDLE_SLEEP = "1.0"  # [scheduler] scheduler_idle_sleep_time


@dataclass
class Run:
    dag_id: str
    run_id: str
    state: str
    queued_at: datetime | None
    start_date: datetime | None
    end_date: datetime | None
    partition_key: str | None
    logical_date: datetime | None
    tasks: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Run:
        return cls(str(data["dag_id"]), str(data["dag_run_id"]), str(data.get("state")),
                   parse_time(data.get("queued_at")), parse_time(data.get("start_date")),
                   parse_time(data.get("end_date")), data.get("partition_key"),
                   parse_time(data.get("logical_date")))

    @property
    def first_task_start(self) -> datetime | None:
        starts = [parse_time(t.get("start_date")) for t in self.tasks]
        return min((s for s in starts if s is not None), default=None)

    @property
    def last_task_end(self) -> datetime | None:
        ends = [parse_time(t.get("end_date")) for t in self.tasks]
        return max((e for e in ends if e is not None), default=None)


@dataclass
class Cycle:
    family: str  # "A" or "B"
    key: str  # A: the partition key; B: the logical date (ISO)
    dag_ids: list[str]
    runs: dict[int, list[Run]] = field(default_factory=dict)

    def done(self) -> bool:
        last = self.runs.get(7) or []
        return any(r.state in ("success", "failed") for r in last)


class Rest:
    """The few calls the reconciler's client has no method for (a partition key)."""

    def __init__(self, airflow: AirflowProcess) -> None:
        self.airflow = airflow
        self.token = airflow.token()

    def post(self, path: str, body: dict[str, Any], attempts: int = 6) -> tuple[int, Any]:
        """POST with a fresh token on 401, again after a timeout or a 5xx (SQLite says
        "database is locked" on a loaded machine): the run id is fixed, so a retry of a
        trigger that went through answers 409."""
        for attempt in range(attempts):
            try:
                status, answer = self.airflow.request("POST", path, body, self.token,
                                                      timeout=30)
            except TimeoutError:
                if attempt == attempts - 1:
                    raise
                continue
            if status == 401:
                self.token = self.airflow.token()
                continue
            if status >= 500 and attempt < attempts - 1:
                time.sleep(1)
                continue
            if status == 409 and attempt:
                return 200, answer  # our earlier attempt created it
            return status, answer
        return status, answer


def trigger_roots(rest: Rest, cycles: int, gap: float, base: datetime
                  ) -> Iterator[Cycle]:
    """Alternate A and B root runs, `gap` seconds apart."""
    for i in range(cycles):
        for family in ("A", "B"):
            logical = base + timedelta(minutes=i)
            if family == "A":
                key = f"bench-{i:02d}-{iso(logical)}"
                status, body = rest.post(f"/api/v2/dags/{ASSET_DAGS[0]}/dagRuns", {
                    "dag_run_id": f"bench__{key}", "logical_date": None,
                    "partition_key": key, "conf": {}})
                cycle = Cycle("A", key, ASSET_DAGS)
            else:
                status, body = rest.post(f"/api/v2/dags/{EXAMPLE_DAGS[0]}/dagRuns", {
                    "dag_run_id": f"bench__{iso(logical)}", "logical_date": iso(logical),
                    "conf": {}})
                cycle = Cycle("B", iso(logical), EXAMPLE_DAGS)
            if status not in (200, 201):
                raise SystemExit(f"triggering the {family} root answered {status}: {body}")
            print(f"  triggered {family} root {i + 1}/{cycles}", file=sys.stderr, flush=True)
            yield cycle
            time.sleep(gap)


def collect(api: AirflowClient, cycles: list[Cycle]) -> None:
    """The runs of every cycle, from one listing per family."""
    for family, dag_ids in (("A", ASSET_DAGS), ("B", EXAMPLE_DAGS)):
        mine = [c for c in cycles if c.family == family]
        if not mine:
            continue
        by_key: dict[str, dict[int, list[Run]]] = {c.key: {} for c in mine}
        for raw in api.list_runs(dag_ids):
            run = Run.from_api(raw)
            position = dag_ids.index(run.dag_id) + 1
            if family == "A":
                key = run.partition_key
            else:
                key = iso(run.logical_date) if run.logical_date else None
            if key in by_key:
                by_key[key].setdefault(position, []).append(run)
        for c in mine:
            c.runs = by_key[c.key]


def load_tasks(api: AirflowClient, cycles: list[Cycle]) -> None:
    for c in cycles:
        for runs in c.runs.values():
            for run in runs:
                run.tasks = api.task_instances(run.dag_id, run.run_id)


def edge_figures(c: Cycle) -> dict[str, dict[int, float]]:
    """metric -> {downstream position: seconds} for one finished cycle."""
    out: dict[str, dict[int, float]] = {"run end -> run start": {}, "work-to-work": {},
                                        "queued - task end": {}}
    for down, ups in UPSTREAMS.items():
        if not ups or len(c.runs.get(down, [])) != 1:
            continue
        if any(len(c.runs.get(u, [])) != 1 for u in ups):
            continue
        d = c.runs[down][0]
        upstream = [c.runs[u][0] for u in ups]
        run_ends = [u.end_date for u in upstream if u.end_date is not None]
        task_ends = [e for e in (u.last_task_end for u in upstream) if e is not None]
        complete_runs = len(run_ends) == len(upstream)
        complete_tasks = len(task_ends) == len(upstream)
        first_task = d.first_task_start
        if d.start_date is not None and complete_runs:
            out["run end -> run start"][down] = _s(d.start_date - max(run_ends))
        if first_task is not None and complete_tasks:
            out["work-to-work"][down] = _s(first_task - max(task_ends))
        if d.queued_at is not None and complete_tasks:
            out["queued - task end"][down] = _s(d.queued_at - max(task_ends))
    return out


def _s(delta: timedelta) -> float:
    return delta.total_seconds()


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def stats(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), p90(values), max(values)


def check_b(cycles: list[Cycle]) -> list[str]:
    """No duplicate and no missing run in B: one run per pipeline and cycle, with the
    reconciler's run id (the root: ours), every task on its first try."""
    problems = []
    for c in cycles:
        if c.family != "B":
            continue
        logical = parse_time(c.key)
        assert logical is not None
        for position, dag_id in enumerate(EXAMPLE_DAGS, start=1):
            runs = c.runs.get(position, [])
            if len(runs) != 1:
                problems.append(f"{dag_id} {c.key}: {len(runs)} runs "
                                f"({[r.run_id for r in runs]})")
                continue
            run = runs[0]
            expected = f"bench__{c.key}" if position == 1 else run_id_for(logical)
            if run.run_id != expected:
                problems.append(f"{dag_id} {c.key}: run id {run.run_id}, not {expected}")
            if run.state != "success":
                problems.append(f"{dag_id} {c.key}: {run.state}")
            retried = [t["task_id"] for t in run.tasks if int(t.get("try_number") or 1) > 1]
            if retried:
                problems.append(f"{dag_id} {c.key}: tasks ran again: {retried}")
    return problems


def report(cycles: list[Cycle], args: argparse.Namespace, problems: list[str],
           elapsed: float) -> None:
    finished = {f: [c for c in cycles if c.family == f and c.done()] for f in ("A", "B")}
    print(f"bench_vs_assets: {args.cycles} cycles per family, interleaved A/B every "
          f"{args.gap:g} s, one airflow standalone (scheduler idle sleep "
          f"{args.idle_sleep} s, {args.database}), reconciler --concurrency "
          f"{args.concurrency}, {elapsed:.0f} s")
    print(f"  finished cycles: A {len(finished['A'])}/{args.cycles}, "
          f"B {len(finished['B'])}/{args.cycles}")
    figures: dict[str, dict[str, list[float]]] = {}
    for family, done in finished.items():
        for c in done:
            for metric, by_down in edge_figures(c).items():
                for group, members in GROUPS.items():
                    figures.setdefault(f"{metric}|{group}", {}).setdefault(family, []).extend(
                        v for d, v in by_down.items() if d in members)
            root, last = c.runs.get(1, []), c.runs.get(7, [])
            if len(root) == 1 and len(last) == 1 and root[0].end_date and last[0].end_date:
                figures.setdefault("root end -> last end|per cycle", {}).setdefault(
                    family, []).append(_s(last[0].end_date - root[0].end_date))
    print(f"  {'metric':<22} {'edge':<24} {'n':>4}  {'A median':>8} {'p90':>6} {'max':>6}"
          f"  {'B median':>8} {'p90':>6} {'max':>6}  {'B/A med':>7} {'p90':>5} {'max':>5}")
    for name, by_family in figures.items():
        metric, group = name.split("|")
        a, b = stats(by_family.get("A", [])), stats(by_family.get("B", []))
        n = max(len(by_family.get("A", [])), len(by_family.get("B", [])))
        cells = [f"{'-':>8} {'-':>6} {'-':>6}" if s is None else
                 f"{s[0]:8.2f} {s[1]:6.2f} {s[2]:6.2f}" for s in (a, b)]
        ratio = (" ".join(f"{y / x:5.2f}" if x > 0 else "  inf" for x, y in zip(a, b, strict=False))
                 if a and b else "")
        print(f"  {metric:<22} {group:<24} {n:>4}  {cells[0]}  {cells[1]}  {ratio}")
    w = figures.get("work-to-work|every edge", {})
    a, b = stats(w.get("A", [])), stats(w.get("B", []))
    if a and b:
        print(f"  target: work-to-work B/A median {b[0] / a[0]:.2f} (<= 0.7), "
              f"p90 {b[1] / a[1]:.2f} (<= 1.0): "
              f"{'met' if b[0] <= 0.7 * a[0] and b[1] <= a[1] else 'NOT met'}")
    a_counts = sorted({len(rs) for c in cycles if c.family == "A" for rs in c.runs.values()})
    print(f"  A runs per DAG and partition key: {a_counts}")
    if problems:
        print(f"  B: {len(problems)} duplicate/missing/retried run(s):")
        for p in problems[:20]:
            print(f"    {p}")
    else:
        print("  B: no duplicate and no missing run (one run per pipeline and cycle, "
              "reconciler run ids, every task on its first try)")


def stop_group(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def tear_down(reconciler: subprocess.Popen[bytes] | None, airflow: AirflowProcess | None,
              postgres: PostgresProcess | None, etcd: EtcdServer | None, work: Path, *,
              keep: bool) -> None:
    """Stop what a side-by-side bench started, each by its own handle, and remove its
    work directory unless asked to keep it."""
    stop_group(reconciler)
    if airflow is not None:
        airflow.stop()
    if postgres is not None:
        postgres.stop()
    if etcd is not None:
        etcd.stop()
    if keep:
        print(f"  work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12, help="root runs per family")
    parser.add_argument("--gap", type=float, default=8.0,
                        help="seconds between two root triggers (A and B alternate)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds for every cycle to finish after the last trigger")
    parser.add_argument("--idle-sleep", default=AIRFLOW_DEFAULT_IDLE_SLEEP,
                        help="[scheduler] scheduler_idle_sleep_time (Airflow's default)")
    parser.add_argument("--stall", type=float, default=180.0,
                        help="give up when no run changes state for this long")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="Airflow's metadata database (sqlite: standalone's default)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="the reconciler's --concurrency, its ceiling (default: the "
                             "reconciler's, which adapts to the database)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.concurrency is None:
        args.concurrency = LoopSettings.concurrency
    signal.signal(signal.SIGTERM, _interrupt)  # so that every finally below runs
    work = Path(tempfile.mkdtemp(prefix="bench-vs-assets-"))
    etcd: EtcdServer | None = None
    postgres: PostgresProcess | None = None
    airflow: AirflowProcess | None = None
    reconciler: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        dags = work / "dags"
        shutil.copytree(REPO / "examples" / "dags", dags)
        shutil.copy(REPO / "examples" / "assets" / "asset_graph.py", dags / "asset_graph.py")
        shutil.copytree(REPO / "examples" / "plugins", work / "plugins")
        repo = example_repo(work / "repo")
        etcd = EtcdServer(work / "etcd").start()
        settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace=NAMESPACE)
        with EtcdStore(settings) as store:
            sync(repo, "HEAD", "pipelines", store, source="bench",
                 now=datetime.now(UTC) - timedelta(days=1))
        if args.database == "postgres":
            postgres = start_postgres()
        airflow = start_airflow(work / "airflow", dags_folder=dags,
                                database_url=postgres.url if postgres else None, extra_env={
            "EXAMPLE_ROOT_SCHEDULE": "none",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": args.idle_sleep,
            "RECONCILER_ETCD_ENDPOINTS": etcd.endpoint,
            "RECONCILER_NAMESPACE": NAMESPACE,
        })
        airflow.wait_ready(EXAMPLE_DAGS + ASSET_DAGS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        env.update(RECONCILER_ETCD_ENDPOINTS=etcd.endpoint, RECONCILER_NAMESPACE=NAMESPACE,
                   RECONCILER_AIRFLOW_URL=airflow.url,
                   RECONCILER_AIRFLOW_USERNAME=airflow.username,
                   RECONCILER_AIRFLOW_PASSWORD=airflow.password, RECONCILER_HTTP_PORT="0",
                   RECONCILER_WINDOW="1d", RECONCILER_CONCURRENCY=str(args.concurrency))
        with open(work / "reconciler.log", "wb") as log:
            reconciler = subprocess.Popen([sys.executable, "-m", "reconciler", "run"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        api = AirflowClient(AirflowSettings(url=airflow.url, username=airflow.username,
                                            password=airflow.password))
        rest = Rest(airflow)
        base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=6)
        time.sleep(3)  # the reconciler's first pass (leadership, relist) before the roots
        cycles = list(trigger_roots(rest, args.cycles, args.gap, base))
        deadline = time.monotonic() + args.timeout
        progress, moved, stalled = None, time.monotonic(), ""
        while True:
            collect(api, cycles)
            if all(c.done() for c in cycles) or time.monotonic() > deadline:
                break
            if reconciler.poll() is not None:
                raise SystemExit(f"reconciler run exited {reconciler.returncode}; see "
                                 f"{work / 'reconciler.log'}")
            now_seen = sorted((c.key, p, r.state) for c in cycles
                              for p, rs in c.runs.items() for r in rs)
            if now_seen != progress:
                progress, moved = now_seen, time.monotonic()
            elif time.monotonic() - moved > args.stall:
                # e.g. the scheduler died of "database is locked" (SQLite on a busy machine):
                # report what finished, and say so.
                stalled = (f"STOPPED EARLY: no run changed state for {args.stall:.0f} s (is "
                           "the scheduler alive? the last lines of its log:)\n"
                           + airflow.tail(4))
                break
            time.sleep(2)
        time.sleep(3)  # a late duplicate would show up now
        collect(api, cycles)
        load_tasks(api, cycles)
        finished = [c for c in cycles if c.done()]
        report(cycles, args, check_b(finished), time.monotonic() - started)
        if stalled:
            print(f"  {stalled}")
    finally:
        tear_down(reconciler, airflow, postgres, etcd, work, keep=args.keep)


if __name__ == "__main__":
    main()
