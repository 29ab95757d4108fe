"""A wide fan-out and many roots, as Airflow assets (A) and as plain DAGs driven by the
reconciler (B), side by side in ONE `airflow standalone`, with interleaved cycles.

Fan-out (`--width W`, several widths run one after the other in the same Airflow):

    root -> d000 .. d{W-1} (each on the root) -> join (on all W)

A: assets: every DAG's one task emits its asset; the W DAGs are scheduled on the root's
   asset, the join on all W (AssetAll). Plain assets, not partitioned ones: Airflow 3.3.2
   loses a partitioned join when its upstreams end at the same moment (two events create
   two AssetPartitionDagRun rows for one key, each holding part of the upstreams, and
   neither fires: assets/manager.py locks the source asset, not the target). A run of A
   belongs to the cycle whose root was triggered last before it was queued (one cycle at
   a time).
B: plain DAGs, a pipelines/ repo of the same graph synced into a real etcd, a `reconciler
   run` process with default settings (adaptive concurrency), the listener plugin of
   examples/plugins.

One cycle at a time, A and B alternating (which goes first alternates too), `--cycles`
per family and width. Per cycle, from Airflow's own records, counted from the root's last
task end: all W queued (the latest queued_at), all W started (the latest first task
start), the join started (its first task start); also the join's own edge (latest W task
end -> join start). B is checked for exactly one run per pipeline and cycle, with the
reconciler's run id.

Many roots (`--many-roots`): 100 roots x 3 downstreams each per family, every one of the
200 roots scheduled by Airflow's own cron, as deployed: `schedule="* * * * *"`, catchup
off, a start date a minute before the files were written, paused at creation (A's
downstreams stay on their root's asset, B's have no schedule: the reconciler triggers
them). The bench unpauses the 200 roots in one request once Airflow's next run of every
root is the minute just begun (within its first 40 s: with catchup off, a paused DAG's
next run is the latest minute begun as of its file's last parse, so an earlier unpause
would give a stale minute and the current one back to back). After `--minutes` it pauses
them again, once Airflow can make no more run of those minutes and every root run of them
has ended (Airflow does not schedule a paused DAG's runs: an earlier pause would strand
them; the runs of later minutes made meanwhile are counted apart), and waits for the
downstreams to drain. Roots' runs are Airflow's `scheduled__<logical date>` runs, and a
cycle is the root's logical date, the minute it was due, in both families (B: the
reconciler keys a cycle by it; A: a downstream run belongs to the latest run of its root
whose task ended before the downstream run was queued). Reported per family: root end ->
downstream first task start (per minute: does it grow?), root end -> downstream queued
(for B the reconciler's part), root due -> root queued (does the scheduler keep up?),
root queued -> root start, the roots Airflow did not run in their minute, exactly once
for B, runs per DAG and cycle for A, and a census of each family's downstream runs
(states, started, keyed to a measured minute).

Measured (two 10-minute runs, PostgreSQL, load 13-18, not drained; README "Many roots"):
Airflow's cron did not keep up in either family (roots not run in their minute 319-448
of 1000); B's lag root end -> downstream start 38.4 and 42.6 s at the median, flat over
run 1's ten minutes; A's downstream runs were mostly never created (run 2: none), as
Airflow creates runs for at most 10 DAGs a loop ordered by next_dagrun_create_after,
NULL (last) for an asset-scheduled DAG; exactly once held.

The DAG files and the pipeline files are generated into a temporary directory; one short
task per DAG. Airflow keeps its defaults for everything that bounds this (printed with the
figures, beside the load average: the machine is shared, compare B/A within one run).

    python benchmarks/bench_fanout.py [--width 10 50 200] [--cycles 5] [--database postgres]
    python benchmarks/bench_fanout.py --many-roots [--minutes 10] [--database postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _folder in (REPO, REPO / "scripts", REPO / "benchmarks"):
    sys.path.insert(0, str(_folder))

from airflow_env import AirflowProcess, free_port  # noqa: E402
from bench_vs_assets import (  # noqa: E402
    AIRFLOW_DEFAULT_IDLE_SLEEP,
    Rest,
    Run,
    _interrupt,
    _s,
    stats,
    tear_down,
)
from postgres_env import PostgresProcess, start_postgres  # noqa: E402

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings  # noqa: E402
from reconciler.core.state import iso, parse_time, run_id_for  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402
from tests.helpers import git  # noqa: E402

NAMESPACE = "bench-fanout"
MANY_ROOTS, MANY_DOWNSTREAMS = 100, 3
ROOT_TAG = "bench-fanout-root"  # --many-roots: the roots on Airflow's cron
AIRFLOW_DEFAULTS = {
    # The bench Airflow of scripts/airflow_env.py is tuned for tests; these bound a fan-out,
    # so they go back to Airflow's own defaults.
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": AIRFLOW_DEFAULT_IDLE_SLEEP,
    "AIRFLOW__CORE__PARALLELISM": "32",
    # each parse of the generated files costs seconds of a 2-core machine
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
}
SHOWN_SETTINGS = [
    ("core", "executor"), ("core", "parallelism"), ("core", "max_active_tasks_per_dag"),
    ("core", "max_active_runs_per_dag"), ("scheduler", "max_dagruns_per_loop_to_schedule"),
    ("scheduler", "max_dagruns_to_create_per_loop"), ("scheduler", "scheduler_idle_sleep_time"),
    ("scheduler", "max_tis_per_query"), ("dag_processor", "min_file_process_interval"),
]

ASSET_FILE = '''"""Generated by benchmarks/bench_fanout.py: family A, assets."""
from datetime import UTC, datetime

from airflow.sdk import DAG, Asset, AssetAll, task

UPSTREAMS = {upstreams!r}
ASSETS = {{d: Asset(name=f"fanout_{{d}}", uri=f"file://fanout/{{d}}") for d in UPSTREAMS}}
CRON = {cron!r}  # roots on Airflow's cron, paused until the bench unpauses them
CRON_START = datetime.fromisoformat({cron_start!r})

for _dag_id, _ups in UPSTREAMS.items():
    _cron = _dag_id in CRON
    _schedule = ("* * * * *" if _cron else AssetAll(*(ASSETS[u] for u in _ups)) if _ups
                 else None)
    with DAG(dag_id=_dag_id, schedule=_schedule,
             start_date=CRON_START if _cron else datetime(2025, 1, 1, tzinfo=UTC),
             catchup=False, is_paused_upon_creation=_cron,
             tags=["bench-fanout", {root_tag!r}] if _cron else ["bench-fanout"]) as _dag:

        @task(outlets=[ASSETS[_dag_id]])
        def work() -> None:
            pass

        work()
    globals()[_dag_id] = _dag
'''
PLAIN_FILE = '''"""Generated by benchmarks/bench_fanout.py: family B, plain DAGs."""
from datetime import UTC, datetime

from airflow.sdk import DAG, task

CRON = {cron!r}  # roots on Airflow's cron, paused until the bench unpauses them
CRON_START = datetime.fromisoformat({cron_start!r})

for _dag_id in {dag_ids!r}:
    _cron = _dag_id in CRON
    with DAG(dag_id=_dag_id, schedule="* * * * *" if _cron else None,
             start_date=CRON_START if _cron else datetime(2025, 1, 1, tzinfo=UTC),
             catchup=False, is_paused_upon_creation=_cron,
             tags=["bench-fanout", {root_tag!r}] if _cron else ["bench-fanout"]) as _dag:

        @task
        def work() -> None:
            pass

        work()
    globals()[_dag_id] = _dag
'''


@dataclass(frozen=True)
class Graph:
    """One family's DAGs of one shape: upstreams by dag_id (roots have none)."""

    family: str
    upstreams: dict[str, list[str]]

    @property
    def dag_ids(self) -> list[str]:
        return list(self.upstreams)

    @property
    def roots(self) -> list[str]:
        return [d for d, ups in self.upstreams.items() if not ups]


def fanout_graph(family: str, width: int) -> Graph:
    prefix = f"f{family.lower()}_w{width}"
    middle = [f"{prefix}_d{i:03d}" for i in range(width)]
    ups: dict[str, list[str]] = {f"{prefix}_root": []}
    ups.update({d: [f"{prefix}_root"] for d in middle})
    ups[f"{prefix}_join"] = middle
    return Graph(family, ups)


def many_roots_graph(family: str) -> Graph:
    ups: dict[str, list[str]] = {}
    for r in range(MANY_ROOTS):
        root = f"m{family.lower()}_r{r:03d}"
        ups[root] = []
        ups.update({f"{root}_d{d}": [root] for d in range(MANY_DOWNSTREAMS)})
    return Graph(family, ups)


def write_dags(folder: Path, a_graphs: list[Graph], b_graphs: list[Graph],
               cron: bool = False) -> None:
    """One file per family: Airflow parses one module of 400 DAGs far faster than 400.

    `cron` (--many-roots): every root is scheduled by Airflow itself, `* * * * *`, catchup
    off, a start date a minute before now, paused at creation and tagged ROOT_TAG (the
    bench unpauses and pauses them all in one request); the other DAGs are as without it
    (A: on their upstreams' assets; B: no schedule, the reconciler triggers them)."""
    folder.mkdir(parents=True)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    common = {"cron_start": start.isoformat(), "root_tag": ROOT_TAG}
    upstreams = {d: ups for g in a_graphs for d, ups in g.upstreams.items()}
    a_cron = sorted(r for g in a_graphs for r in g.roots) if cron else []
    (folder / "fanout_assets.py").write_text(
        ASSET_FILE.format(upstreams=upstreams, cron=a_cron, **common))
    dag_ids = [d for g in b_graphs for d in g.dag_ids]
    b_cron = sorted(r for g in b_graphs for r in g.roots) if cron else []
    (folder / "fanout_plain.py").write_text(
        PLAIN_FILE.format(dag_ids=dag_ids, cron=b_cron, **common))


def pipelines_repo(path: Path, b_graphs: list[Graph]) -> Path:
    """A git repository whose one commit holds family B's graphs as pipelines/*.yaml."""
    folder = path / "pipelines"
    folder.mkdir(parents=True)
    for g in b_graphs:
        for dag_id, ups in g.upstreams.items():
            depends = f"depends_on: [{', '.join(ups)}]\n" if ups else ""
            (folder / f"{dag_id}.yaml").write_text(
                f"dag_id: {dag_id}\nowner: bench\n{depends}")
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "bench@example.com")
    git(path, "config", "user.name", "bench")
    git(path, "add", ".")
    git(path, "commit", "-qm", "bench_fanout graph")
    return path


def start_bench_airflow(home: Path, dags: Path, dag_ids: list[str], database_url: str | None,
                        extra_env: dict[str, str]) -> AirflowProcess:
    """scripts/airflow_env.py's Airflow, waiting for the generated DAGs (start_airflow waits
    for the example DAGs, and its check reads one page of 100)."""
    airflow = AirflowProcess(home=home, port=free_port(), venv=_airflow_venv(),
                             dags_folder=dags, log_path=home / "standalone.log",
                             extra_env=extra_env, database_url=database_url)
    airflow.start()
    try:
        airflow.wait_ready([], timeout=300)
        api = client(airflow)
        deadline = time.monotonic() + 600
        while True:
            missing = set(dag_ids) - {d["dag_id"] for d in api.list_dags()}
            if not missing:
                return airflow
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} DAGs not parsed after 600 s:\n"
                                   f"{airflow.tail(20)}")
            time.sleep(2)
    except BaseException:
        airflow.stop()
        raise


def _airflow_venv() -> Path:
    return Path(os.environ.get("AIRFLOW_VENV") or REPO / ".venv-airflow")


def client(airflow: AirflowProcess) -> AirflowClient:
    return AirflowClient(AirflowSettings(url=airflow.url, username=airflow.username,
                                         password=airflow.password))


def airflow_settings(airflow: AirflowProcess) -> str:
    """The settings in effect, as Airflow itself reads them with the bench's environment."""
    names = json.dumps(SHOWN_SETTINGS)
    code = ("import json; from airflow.configuration import conf; "
            f"print(json.dumps([conf.get(s, k) for s, k in json.loads({names!r})]))")
    done = subprocess.run([str(airflow.venv / "bin" / "python"), "-c", code],
                          env=airflow.env(), capture_output=True, text=True, timeout=120)
    try:
        values = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"(could not read Airflow's settings: {done.stderr[-300:]})"
    return ", ".join(f"[{s}] {k} {v}" for (s, k), v in zip(SHOWN_SETTINGS, values, strict=True))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- reading Airflow's records -------------------------------------------------------


def read_runs(api: AirflowClient, rest: Rest, dag_ids: list[str]) -> list[Run]:
    """Every run of `dag_ids` with its task instances (task instances listed in bulk)."""
    runs = [Run.from_api(r) for r in api.list_runs(dag_ids)]
    by_run = {(r.dag_id, r.run_id): r for r in runs}
    per_dag = max(1, max((sum(1 for r in runs if r.dag_id == d) for d in dag_ids), default=1))
    chunk = max(1, 900 // per_dag)  # one page of task instances per request, mostly
    for start in range(0, len(dag_ids), chunk):
        offset = 0
        while True:
            status, body = rest.post("/api/v2/dags/~/dagRuns/~/taskInstances/list", {
                "dag_ids": dag_ids[start:start + chunk], "page_limit": 1000,
                "page_offset": offset, "order_by": "id"})
            if status != 200:
                raise RuntimeError(f"task instance list answered {status}: {body}")
            for ti in body["task_instances"]:
                run = by_run.get((ti["dag_id"], ti["dag_run_id"]))
                if run is not None:
                    run.tasks.append(ti)
            offset += len(body["task_instances"])
            if not body["task_instances"] or offset >= body["total_entries"]:
                break
    return runs


KeyOf = Callable[[Run], str | None]


def b_key(run: Run) -> str | None:
    """B: a run's cycle is its logical date (ISO)."""
    return iso(run.logical_date) if run.logical_date else None


def a_key(starts: list[tuple[datetime, str]]) -> KeyOf:
    """A: asset-triggered runs carry no cycle; a run belongs to the cycle whose root was
    triggered last before the run was queued (`starts`: trigger time, key; in order)."""

    def key(run: Run) -> str | None:
        if run.queued_at is None:
            return None
        return next((k for t, k in reversed(starts) if t <= run.queued_at), None)

    return key


def group(runs: Iterable[Run], key_of: KeyOf) -> dict[tuple[str, str], list[Run]]:
    """(dag_id, cycle key) -> runs."""
    out: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        key = key_of(run)
        if key is not None:
            out.setdefault((run.dag_id, key), []).append(run)
    return out


def bench_root_run_id(key: str) -> str:
    """The fan-out's roots: the run id the bench triggers them with."""
    return f"bench__{key}"


def scheduled_root_run_id(key: str) -> str:
    """--many-roots: Airflow's own scheduled run of a root on its cron (CronTriggerTimetable:
    `scheduled__` and the logical date, which is the minute it was due)."""
    return f"scheduled__{key}"


def exactly_once(graph: Graph, keys: list[str], runs: dict[tuple[str, str], list[Run]],
                 unfinished: set[str], root_run_id: Callable[[str], str] = bench_root_run_id,
                 skip: Iterable[tuple[str, str]] = ()) -> tuple[list[str], int]:
    """B: one run per pipeline and cycle, the reconciler's run id (roots: `root_run_id`).
    Returns the problems, and how many runs of `unfinished` cycles (Airflow stopped, a
    timeout) were not made yet: not run is not run twice. `skip`: (dag_id, key) not
    checked (--many-roots: the pipelines of a root Airflow did not run in that minute)."""
    problems, not_yet = [], 0
    skipped = set(skip)
    for key in keys:
        logical = parse_time(key)
        assert logical is not None
        for dag_id in graph.dag_ids:
            if (dag_id, key) in skipped:
                continue
            found = runs.get((dag_id, key), [])
            if not found and key in unfinished:
                not_yet += 1
                continue
            if len(found) != 1:
                problems.append(f"{dag_id} {key}: {len(found)} runs "
                                f"{[r.run_id for r in found]}")
                continue
            expected = (root_run_id(key) if not graph.upstreams[dag_id]
                        else run_id_for(logical))
            if found[0].run_id != expected:
                problems.append(f"{dag_id} {key}: run id {found[0].run_id}, not {expected}")
    return problems, not_yet


def runs_per_pipeline(graph: Graph, keys: list[str], runs: dict[tuple[str, str], list[Run]]
                      ) -> list[int]:
    return sorted({len(runs.get((d, k), [])) for k in keys for d in graph.dag_ids})


# ---- triggering ----------------------------------------------------------------------


def trigger_root(rest: Rest, family: str, dag_id: str, key: str) -> None:
    """A: no logical date (as an asset-triggered run); B: the cycle's, as Airflow's schedule
    would give it."""
    if family == "A":
        body: dict[str, Any] = {"dag_run_id": f"bench__{key}", "logical_date": None,
                                "conf": {}}
    else:
        body = {"dag_run_id": f"bench__{key}", "logical_date": key, "conf": {}}
    status, answer = rest.post(f"/api/v2/dags/{dag_id}/dagRuns", body)
    if status not in (200, 201):
        raise SystemExit(f"triggering {dag_id} ({family}) answered {status}: {answer}")


class AirflowStopped(Exception):
    """A component of standalone died (SQLite's "database is locked" kills the scheduler):
    every later run would stay queued, so the bench reports what finished."""


def wait_for(check: Callable[[], bool], timeout: float, reconciler: subprocess.Popen[bytes],
             airflow: AirflowProcess, every: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reconciler.poll() is not None:
            raise SystemExit(f"reconciler run exited {reconciler.returncode}")
        stopped = airflow.stopped_components()
        if stopped:
            raise AirflowStopped(f"Airflow's {', '.join(stopped)} stopped; the last lines "
                                 f"of its log:\n{airflow.tail(6)}")
        with contextlib.suppress(AirflowUnavailable):  # a stalled API server: ask again
            if check():
                return True
        time.sleep(every)
    return False


def finished(api: AirflowClient, dag_id: str, key_of: KeyOf, key: str) -> bool:
    """Has `dag_id` a run of cycle `key` that ended?"""
    return any(r.get("state") in ("success", "failed") and key_of(Run.from_api(r)) == key
               for r in api.list_runs([dag_id]))


# ---- the fan-out ---------------------------------------------------------------------


@dataclass
class FanoutFigures:
    per_metric: dict[str, list[float]] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    """The keys of the cycles whose join succeeded."""

    def add(self, metric: str, value: float | None) -> None:
        if value is not None:
            self.per_metric.setdefault(metric, []).append(value)


FANOUT_METRICS = ["root end -> all W queued", "root end -> all W running",
                  "root end -> all W started", "root end -> join start",
                  "all W queued -> all W running", "all W running -> all W started",
                  "last W end -> join start"]
"""queued: the run's queued_at; running: its start_date (the scheduler set it running,
at most max_dagruns_per_loop_to_schedule a loop); started: its first task's start."""


def fanout_cycle(graph: Graph, key: str, runs: dict[tuple[str, str], list[Run]],
                 figures: FanoutFigures) -> None:
    root, *middle, join = graph.dag_ids

    def one(dag_id: str) -> Run | None:
        found = runs.get((dag_id, key), [])
        return found[0] if len(found) == 1 else None

    root_run, join_run = one(root), one(join)
    middle_runs = [one(d) for d in middle]
    if root_run is None or join_run is None or join_run.state != "success":
        return
    figures.completed.add(key)
    root_end = root_run.last_task_end
    if root_end is None or any(r is None for r in middle_runs):
        return
    present = [r for r in middle_runs if r is not None]

    def latest(values: list[datetime | None]) -> datetime | None:
        return None if None in values else max(v for v in values if v is not None)

    all_queued = latest([r.queued_at for r in present])
    all_running = latest([r.start_date for r in present])
    all_started = latest([r.first_task_start for r in present])
    last_end = latest([r.last_task_end for r in present])
    join_start = join_run.first_task_start
    spans = [(all_queued, root_end), (all_running, root_end), (all_started, root_end),
             (join_start, root_end), (all_running, all_queued), (all_started, all_running),
             (join_start, last_end)]  # in the order of FANOUT_METRICS
    for metric, (later, earlier) in zip(FANOUT_METRICS, spans, strict=True):
        figures.add(metric, _s(later - earlier) if later and earlier else None)


def run_fanout(args: argparse.Namespace, api: AirflowClient, rest: Rest,
               reconciler: subprocess.Popen[bytes], airflow: AirflowProcess,
               base: datetime) -> None:
    for w_index, width in enumerate(args.width):
        graphs = {f: fanout_graph(f, width) for f in ("A", "B")}
        keys: dict[str, list[str]] = {"A": [], "B": []}
        starts: list[tuple[datetime, str]] = []
        key_of = {"A": a_key(starts), "B": b_key}
        loads = []
        started = time.monotonic()
        stopped = ""
        try:
            for i in range(args.cycles):
                for family in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    g = graphs[family]
                    key = (f"w{width}-c{i:02d}" if family == "A"
                           else iso(base + timedelta(minutes=100 * w_index + i)))
                    keys[family].append(key)
                    loads.append(os.getloadavg()[0])
                    if family == "A":
                        starts.append((datetime.now(UTC), key))
                    trigger_root(rest, family, g.roots[0], key)
                    # only the join is polled: a listing of all W runs every second would
                    # load the API server the families share
                    done = wait_for(partial(finished, api, g.dag_ids[-1], key_of[family],
                                            key), args.cycle_timeout, reconciler, airflow)
                    print(f"  W={width} cycle {i + 1}/{args.cycles} {family}: "
                          f"{'done' if done else 'TIMED OUT'}", file=sys.stderr, flush=True)
                    time.sleep(2)  # a late duplicate of B would show up in the listing
        except AirflowStopped as exc:
            stopped = f"STOPPED EARLY: {exc}"
        report_fanout(args, width, graphs, keys, key_of, api, rest, loads,
                      time.monotonic() - started)
        if stopped:
            print(f"  {stopped}")
            return


def report_fanout(args: argparse.Namespace, width: int, graphs: dict[str, Graph],
                  keys: dict[str, list[str]], key_of: dict[str, KeyOf], api: AirflowClient,
                  rest: Rest, loads: list[float], elapsed: float) -> None:
    figures: dict[str, FanoutFigures] = {}
    by_key: dict[str, dict[tuple[str, str], list[Run]]] = {}
    for family, g in graphs.items():
        by_key[family] = group(read_runs(api, rest, g.dag_ids), key_of[family])
        figures[family] = FanoutFigures()
        for key in keys[family]:
            fanout_cycle(g, key, by_key[family], figures[family])
    print(f"\nbench_fanout: W={width}, {args.cycles} cycles per family (A/B alternating, "
          f"one at a time), {args.database}, {elapsed:.0f} s; load average (1 min) at the "
          f"cycles' starts {min(loads):.2f}-{max(loads):.2f}, now {load_average()}")
    print(f"  completed cycles: A {len(figures['A'].completed)}/{args.cycles}, "
          f"B {len(figures['B'].completed)}/{args.cycles}")
    print(f"  {'seconds':<32} {'n':>3}  {'A median':>8} {'p90':>7}  {'B median':>8} "
          f"{'p90':>7}  {'B/A med':>7} {'p90':>5}")
    for metric in FANOUT_METRICS:
        a = stats(figures["A"].per_metric.get(metric, []))
        b = stats(figures["B"].per_metric.get(metric, []))
        n = max(len(figures[f].per_metric.get(metric, [])) for f in "AB")
        cells = [f"{'-':>8} {'-':>7}" if s is None else f"{s[0]:8.2f} {s[1]:7.2f}"
                 for s in (a, b)]
        ratio = (f"{_ratio(b[0], a[0]):>7} {_ratio(b[1], a[1]):>5}" if a and b else "")
        print(f"  {metric:<32} {n:>3}  {cells[0]}  {cells[1]}  {ratio}")
    print(f"  A runs per DAG and cycle: "
          f"{runs_per_pipeline(graphs['A'], keys['A'], by_key['A'])}")
    unfinished = set(keys["B"]) - figures["B"].completed
    print_exactly_once(exactly_once(graphs["B"], keys["B"], by_key["B"], unfinished),
                       len(keys["B"]) * len(graphs["B"].dag_ids))


def _ratio(b: float, a: float) -> str:
    return f"{b / a:.2f}" if a > 0 else "-"


def print_exactly_once(checked: tuple[list[str], int], expected: int,
                       roots: str = "the bench's") -> None:
    problems, not_yet = checked
    unfinished = (f"; {not_yet} not run yet, in cycles that did not finish" if not_yet
                  else "")
    if problems:
        print(f"  B: {len(problems)} of {expected} pipeline-cycles not exactly once"
              f"{unfinished}:")
        for p in problems[:20]:
            print(f"    {p}")
    else:
        print(f"  B: exactly once: {expected - not_yet} of {expected} pipeline-cycles have "
              f"one run with the reconciler's run id (roots: {roots}), no duplicate, "
              f"none missing{unfinished}")


# ---- many roots ----------------------------------------------------------------------


def rest_call(rest: Rest, method: str, path: str, body: Any = None) -> Any:
    """One request with a fresh token on 401, again after a timeout or a 5xx (pausing and
    listing are idempotent)."""
    for attempt in range(6):
        try:
            status, answer = rest.airflow.request(method, path, body, rest.token, timeout=60)
        except OSError:  # a timeout, a refused connection: ask again
            if attempt == 5:
                raise
            time.sleep(1)
            continue
        if status == 401:
            rest.token = rest.airflow.token()
            continue
        if status >= 500 and attempt < 5:
            time.sleep(1)
            continue
        if status != 200:
            raise RuntimeError(f"{method} {path} answered {status}: {answer}")
        return answer
    raise RuntimeError(f"{method} {path}: no answer after 6 attempts")


def root_dags(rest: Rest) -> list[dict[str, Any]]:
    """The DAGs tagged ROOT_TAG, as `GET /api/v2/dags` answers them (all pages)."""
    dags: list[dict[str, Any]] = []
    while True:
        page = rest_call(rest, "GET", f"/api/v2/dags?tags={ROOT_TAG}&limit=100"
                                      f"&offset={len(dags)}&order_by=dag_id")
        dags.extend(page["dags"])
        if not page["dags"] or len(dags) >= page["total_entries"]:
            return dags


def set_roots_paused(rest: Rest, paused: bool, expected: int) -> None:
    """Pause or unpause every root in one request (the DAGs tagged ROOT_TAG)."""
    answer = rest_call(rest, "PATCH", f"/api/v2/dags?tags={ROOT_TAG}&dag_id_pattern=~"
                                      "&update_mask=is_paused&limit=1", {"is_paused": paused})
    if answer.get("total_entries") != expected:
        raise RuntimeError(f"{'pausing' if paused else 'unpausing'} the roots matched "
                           f"{answer.get('total_entries')} DAGs, not {expected}")


def unpause_roots(rest: Rest, roots: list[str], reconciler: subprocess.Popen[bytes],
                  airflow: AirflowProcess, within: float = 40.0) -> tuple[datetime, float]:
    """Unpause every root when Airflow's next run of each is the minute just begun, within
    its first `within` seconds; returns that minute and the seconds into it.

    With catchup off, Airflow's next run of a DAG is the latest minute already begun as of
    the last parse of its file (the DAG processor parses paused DAGs too, every 30 s here),
    and an unpaused DAG whose next run is due gets it at once. Unpaused with a next run of
    an older minute, a root would get that stale run and the current minute's right after
    it; so the bench waits for a parse after the minute began. The first minute's runs are
    created at the unpause (those seconds late), the next ones when due."""
    deadline = time.monotonic() + 600
    wanted = set(roots)
    seen = ""
    while time.monotonic() < deadline:
        if reconciler.poll() is not None:
            raise SystemExit(f"reconciler run exited {reconciler.returncode}")
        if airflow.stopped_components():
            raise SystemExit(f"Airflow's {', '.join(airflow.stopped_components())} stopped")
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        if _s(datetime.now(UTC) - minute) <= within:
            dags = {d["dag_id"]: d for d in root_dags(rest) if d["dag_id"] in wanted}
            nexts = {parse_time(d.get("next_dagrun_run_after")) for d in dags.values()}
            seen = f"{len(dags)} roots, next runs {sorted(map(str, nexts))[:3]}"
            into = _s(datetime.now(UTC) - minute)
            if len(dags) == len(wanted) and nexts == {minute} and into <= within:
                set_roots_paused(rest, False, len(wanted))
                return minute, _s(datetime.now(UTC) - minute)
        time.sleep(2)
    raise SystemExit(f"Airflow's next run of the roots was not the current minute for 600 s "
                     f"({seen})")


def stop_roots(api: AirflowClient, rest: Rest, roots: list[str], first: datetime,
               last: datetime, timeout: float, reconciler: subprocess.Popen[bytes],
               airflow: AirflowProcess) -> tuple[datetime, bool]:
    """After the last minute, pause the roots once Airflow can make no more run of the
    measured minutes (every root's next run is later) and every root run of them has
    ended: the scheduler neither starts a paused DAG's queued run nor schedules its tasks,
    so pausing at once would strand the roots still waiting. Runs of later minutes made
    meanwhile are counted apart; returns when the pause came, and whether in time."""
    wanted = set(roots)

    def done() -> bool:
        behind = [d["dag_id"] for d in root_dags(rest) if d["dag_id"] in wanted
                  and d.get("next_dagrun_logical_date") is not None
                  and (parse_time(d["next_dagrun_logical_date"]) or last) <= last]
        open_runs = [r for r in api.list_runs(roots, logical_date_gte=first,
                                              logical_date_lte=last)
                     if r.get("state") in ("queued", "running")]
        return not behind and not open_runs

    in_time = wait_for(done, timeout, reconciler, airflow, every=5)
    set_roots_paused(rest, True, len(roots))
    return datetime.now(UTC), in_time


def run_many_roots(args: argparse.Namespace, api: AirflowClient, rest: Rest,
                   reconciler: subprocess.Popen[bytes], airflow: AirflowProcess) -> None:
    graphs = {f: many_roots_graph(f) for f in ("A", "B")}
    roots = [r for g in graphs.values() for r in g.roots]
    started = time.monotonic()
    since = datetime.now(UTC) - timedelta(minutes=2)
    first, unpaused_into = unpause_roots(rest, roots, reconciler, airflow)
    last = first + timedelta(minutes=args.minutes - 1)
    keys = [iso(first + timedelta(minutes=m)) for m in range(args.minutes)]
    print(f"  {len(roots)} roots unpaused {unpaused_into:.1f} s into {keys[0]}, load "
          f"{load_average()}", file=sys.stderr, flush=True)
    loads = [os.getloadavg()[0]]
    for m in range(1, args.minutes + 1):
        time.sleep(max(0.0, _s(first + timedelta(minutes=m) - datetime.now(UTC))))
        if reconciler.poll() is not None:
            raise SystemExit(f"reconciler run exited {reconciler.returncode}")
        if m < args.minutes:
            loads.append(os.getloadavg()[0])
        with contextlib.suppress(AirflowUnavailable):
            made = api.list_runs(roots, logical_date_gte=first + timedelta(minutes=m - 1),
                                 logical_date_lte=first + timedelta(minutes=m - 1))
            print(f"  minute {m}/{args.minutes}: Airflow made {len(made)} of {len(roots)} "
                  f"root runs, load {load_average()}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.drain_timeout
    stopped = ""
    try:
        paused_at, paused_in_time = stop_roots(api, rest, roots, first, last,
                                               args.drain_timeout, reconciler, airflow)
    except AirflowStopped as exc:
        paused_at, paused_in_time, stopped = datetime.now(UTC), False, f"STOPPED EARLY: {exc}"
    print(f"  roots paused at {paused_at:%H:%M:%S}{'' if paused_in_time else ' (timeout)'}",
          file=sys.stderr, flush=True)
    downstream = {d for g in graphs.values() for d, ups in g.upstreams.items() if ups}
    b_roots, measured = set(graphs["B"].roots), set(keys)
    idle_checks: list[bool] = []

    def drained() -> bool:
        """No downstream run queued or running, and every B root run of the measured
        minutes that succeeded has its downstreams' runs ended (the reconciler may be slow
        to trigger them), twice in a row; a paused root's later runs stay as they are."""
        runs = [Run.from_api(r) for r in api.list_runs(updated_at_gte=since)]
        busy = any(r.state in ("queued", "running") and r.dag_id in downstream for r in runs)
        ended = {(r.dag_id, b_key(r)) for r in runs if r.state in ("success", "failed")}
        owed = [(f"{r.dag_id}_d{i}", b_key(r)) for r in runs
                if r.dag_id in b_roots and r.state == "success" and b_key(r) in measured
                for i in range(MANY_DOWNSTREAMS)]
        idle_checks.append(not busy and all(o in ended for o in owed))
        return idle_checks[-2:] == [True, True]

    drained_ok = False
    if not stopped:
        try:
            drained_ok = wait_for(drained, max(0.0, deadline - time.monotonic()), reconciler,
                                  airflow, every=15)
        except AirflowStopped as exc:
            stopped = f"STOPPED EARLY: {exc}"
    report_many_roots(args, graphs, keys, api, rest, loads, time.monotonic() - started,
                      drained_ok, unpaused_into, paused_at)
    if stopped:
        print(f"  {stopped}")


def a_many_roots_key(graph: Graph, runs: list[Run]) -> KeyOf:
    """A's roots by their logical date, the minute Airflow's cron made them for (b_key); a
    downstream run belongs to the latest run of its root whose task ended before it was
    queued (its asset event made it)."""
    ends: dict[str, list[tuple[datetime, str]]] = {}
    for run in runs:
        cycle = b_key(run) if not graph.upstreams[run.dag_id] else None
        if cycle is not None and run.last_task_end is not None:
            ends.setdefault(run.dag_id, []).append((run.last_task_end, cycle))
    for pairs in ends.values():
        pairs.sort()

    def key(run: Run) -> str | None:
        ups = graph.upstreams[run.dag_id]
        if not ups:
            return b_key(run)
        queued = run.queued_at
        return next((k for end, k in reversed(ends.get(ups[0], []))
                     if queued is not None and end <= queued), None)

    return key


def report_many_roots(args: argparse.Namespace, graphs: dict[str, Graph], keys: list[str],
                      api: AirflowClient, rest: Rest, loads: list[float], elapsed: float,
                      drained: bool, unpaused_into: float, paused_at: datetime) -> None:
    print(f"\nbench_fanout --many-roots: {MANY_ROOTS} roots x {MANY_DOWNSTREAMS} "
          f"downstreams per family, all {2 * MANY_ROOTS} roots on Airflow's cron "
          f"(* * * * *) for {args.minutes} min from {keys[0]} (unpaused {unpaused_into:.1f} s "
          f"into that minute, paused at {paused_at:%H:%M:%S}), {args.database}, "
          f"{elapsed:.0f} s"
          f"{'' if drained else ' (NOT drained: some runs unfinished at the timeout)'}; "
          f"load average (1 min) at the minutes' starts {min(loads):.2f}-{max(loads):.2f}, "
          f"now {load_average()}")
    lag: dict[str, dict[int, list[float]]] = {"A": {}, "B": {}}
    lag_queued: dict[str, dict[int, list[float]]] = {"A": {}, "B": {}}
    root_late: dict[str, dict[int, list[float]]] = {"A": {}, "B": {}}
    root_wait: dict[str, dict[int, list[float]]] = {"A": {}, "B": {}}
    not_run: dict[str, dict[int, list[str]]] = {"A": {}, "B": {}}
    missing: dict[str, int] = {"A": 0, "B": 0}
    extra: dict[str, int] = {"A": 0, "B": 0}
    runs: dict[str, dict[tuple[str, str], list[Run]]] = {}
    for family, g in graphs.items():
        listed = read_runs(api, rest, g.dag_ids)
        key_of = a_many_roots_key(g, listed) if family == "A" else b_key
        runs[family] = group(listed, key_of)
        wanted = set(keys)
        print_downstream_census(family, g, listed, key_of, wanted)
        extra[family] = sum(1 for r in listed if not g.upstreams[r.dag_id]
                            and b_key(r) not in wanted)
        for m, key in enumerate(keys):
            due = parse_time(key)
            assert due is not None
            for root in g.roots:
                found = runs[family].get((root, key), [])
                if not found:
                    not_run[family].setdefault(m, []).append(root)
                    continue
                r = found[0]
                if r.queued_at:
                    root_late[family].setdefault(m, []).append(_s(r.queued_at - due))
                if r.first_task_start and r.queued_at:
                    root_wait[family].setdefault(m, []).append(
                        _s(r.first_task_start - r.queued_at))
                root_end = r.last_task_end
                if len(found) != 1 or root_end is None:
                    missing[family] += MANY_DOWNSTREAMS
                    continue
                for d in range(MANY_DOWNSTREAMS):
                    down = runs[family].get((f"{root}_d{d}", key), [])
                    queued = min((q for q in (f.queued_at for f in down) if q is not None),
                                 default=None)
                    if queued is not None:
                        lag_queued[family].setdefault(m, []).append(_s(queued - root_end))
                    start = min((s for s in (f.first_task_start for f in down)
                                 if s is not None), default=None)
                    if start is None:
                        missing[family] += 1
                        continue
                    lag[family].setdefault(m, []).append(_s(start - root_end))
    half = max(1, args.minutes // 5)
    spans = [("all minutes", range(args.minutes)), (f"first {half} min", range(half)),
             (f"last {half} min", range(args.minutes - half, args.minutes))]
    print(f"  {'seconds':<40} {'n':>5}  {'A median':>8} {'p90':>7} {'max':>7}  "
          f"{'B median':>8} {'p90':>7} {'max':>7}  {'B/A med':>7} {'p90':>5}")
    for title, per_minute in (("root end -> downstream start", lag),
                              ("root end -> downstream queued", lag_queued),
                              ("root due -> root queued", root_late),
                              ("root queued -> root start", root_wait)):
        for span, minutes in spans:
            values = {f: [v for m in minutes for v in per_minute[f].get(m, [])] for f in "AB"}
            a, b = stats(values["A"]), stats(values["B"])
            cells = [f"{'-':>8} {'-':>7} {'-':>7}" if s is None
                     else f"{s[0]:8.2f} {s[1]:7.2f} {s[2]:7.2f}" for s in (a, b)]
            ratio = f"{_ratio(b[0], a[0]):>7} {_ratio(b[1], a[1]):>5}" if a and b else ""
            n = max(len(values["A"]), len(values["B"]))
            print(f"  {title + ', ' + span:<40} {n:>5}  {cells[0]}  {cells[1]}  {ratio}")
    print("  per minute, median root end -> downstream start (A | B): " + ", ".join(
        f"{_median(lag['A'].get(m))}|{_median(lag['B'].get(m))}" for m in range(args.minutes)))
    print("  per minute, median root due -> root queued (A | B): " + ", ".join(
        f"{_median(root_late['A'].get(m))}|{_median(root_late['B'].get(m))}"
        for m in range(args.minutes)))
    total_not_run = {f: sum(len(v) for v in not_run[f].values()) for f in "AB"}
    print(f"  roots Airflow did not run in their minute: A {total_not_run['A']}, "
          f"B {total_not_run['B']} (of {MANY_ROOTS * args.minutes} each); per minute "
          "(A | B): " + ", ".join(f"{len(not_run['A'].get(m, []))}|"
                                  f"{len(not_run['B'].get(m, []))}"
                                  for m in range(args.minutes))
          + f"; scheduled root runs outside the {args.minutes} minutes: A {extra['A']}, "
            f"B {extra['B']}")
    print(f"  downstream runs that did not start, of the roots that ran: A {missing['A']}, "
          f"B {missing['B']} (for A, a root's asset events that one downstream run "
          "consumed together count once)")
    print(f"  A runs per DAG and cycle: "
          f"{runs_per_pipeline(graphs['A'], keys, runs['A'])}")
    g = graphs["B"]
    skip = [(d, keys[m]) for m, lost in not_run["B"].items() for root in lost
            for d in [root] + [f"{root}_d{i}" for i in range(MANY_DOWNSTREAMS)]]
    unfinished = set() if drained else set(keys)
    print_exactly_once(exactly_once(g, keys, runs["B"], unfinished,
                                    root_run_id=scheduled_root_run_id, skip=skip),
                       len(keys) * len(g.dag_ids) - len(skip),
                       roots="Airflow's scheduled runs")
    if skip:
        print(f"  B: {len(skip)} pipeline-cycles of roots Airflow did not run not checked")


def print_downstream_census(family: str, graph: Graph, listed: list[Run], key_of: KeyOf,
                            measured: set[str]) -> None:
    """How a family's downstream runs stand when the report reads Airflow: their states,
    how many have a started task and how many the keying puts in a measured minute (a
    downstream figure missing for a family says here whether its runs did not start or
    were not matched to their root's minute)."""
    down = [r for r in listed if graph.upstreams[r.dag_id]]
    states: dict[str, int] = {}
    for r in down:
        states[r.state] = states.get(r.state, 0) + 1
    started = sum(1 for r in down if r.first_task_start is not None)
    keyed = [key_of(r) for r in down]
    in_minutes = sum(1 for k in keyed if k in measured)
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    print(f"  {family} downstream runs listed: {len(down)} ({by_state}); "
          f"with a started task {started}; keyed to a measured minute {in_minutes}, to "
          f"another {sum(1 for k in keyed if k is not None and k not in measured)}, to none "
          f"{sum(1 for k in keyed if k is None)}; queued_at missing "
          f"{sum(1 for r in down if r.queued_at is None)}")


def _median(values: list[float] | None) -> str:
    s = stats(values or [])
    return "-" if s is None else f"{s[0]:.1f}"


# ---- main ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, nargs="+", default=[10, 50, 200],
                        help="fan-out widths W, one after the other in the same Airflow")
    parser.add_argument("--cycles", type=int, default=5, help="cycles per family and width")
    parser.add_argument("--many-roots", action="store_true",
                        help=f"{MANY_ROOTS} roots x {MANY_DOWNSTREAMS} downstreams per "
                             "family, every root on Airflow's cron (* * * * *), instead of "
                             "the fan-out")
    parser.add_argument("--minutes", type=int, default=10, help="--many-roots: minutes")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="Airflow's metadata database (sqlite: standalone's default)")
    parser.add_argument("--cycle-timeout", type=float, default=600.0,
                        help="seconds for one cycle's join to finish")
    parser.add_argument("--drain-timeout", type=float, default=900.0,
                        help="--many-roots: seconds for the downstreams to finish after "
                             "the last minute")
    parser.add_argument("--airflow-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an Airflow setting off its default, to see what bounds the "
                             "figures (AIRFLOW__SCHEDULER__MAX_DAGRUNS_PER_LOOP_TO_SCHEDULE"
                             "=200); repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # so that every finally below runs
    if args.many_roots:
        a_graphs, b_graphs = [many_roots_graph("A")], [many_roots_graph("B")]
    else:
        a_graphs = [fanout_graph("A", w) for w in args.width]
        b_graphs = [fanout_graph("B", w) for w in args.width]
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    etcd: EtcdServer | None = None
    postgres: PostgresProcess | None = None
    airflow: AirflowProcess | None = None
    reconciler: subprocess.Popen[bytes] | None = None
    try:
        dags = work / "dags"
        write_dags(dags, a_graphs, b_graphs, cron=args.many_roots)
        shutil.copytree(REPO / "examples" / "plugins", work / "plugins")
        repo = pipelines_repo(work / "repo", b_graphs)
        etcd = EtcdServer(work / "etcd").start()
        settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace=NAMESPACE)
        with EtcdStore(settings) as store:
            sync(repo, "HEAD", "pipelines", store, source="bench",
                 now=datetime.now(UTC) - timedelta(days=1))
        if args.database == "postgres":
            postgres = start_postgres()
        every_dag = [d for g in a_graphs + b_graphs for d in g.dag_ids]
        airflow = start_bench_airflow(
            work / "airflow", dags, every_dag, postgres.url if postgres else None,
            {**AIRFLOW_DEFAULTS, **dict(e.split("=", 1) for e in args.airflow_env),
             "RECONCILER_ETCD_ENDPOINTS": etcd.endpoint, "RECONCILER_NAMESPACE": NAMESPACE})
        print(f"airflow standalone ready with {len(every_dag)} DAGs in "
              f"{airflow.startup_seconds or 0:.0f} s", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        # default settings (adaptive concurrency); only where things are, and no HTTP port
        env.update(RECONCILER_ETCD_ENDPOINTS=etcd.endpoint, RECONCILER_NAMESPACE=NAMESPACE,
                   RECONCILER_AIRFLOW_URL=airflow.url,
                   RECONCILER_AIRFLOW_USERNAME=airflow.username,
                   RECONCILER_AIRFLOW_PASSWORD=airflow.password, RECONCILER_HTTP_PORT="0",
                   RECONCILER_WINDOW="1d")
        with open(work / "reconciler.log", "wb") as log:
            reconciler = subprocess.Popen([sys.executable, "-m", "reconciler", "run"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        api, rest = client(airflow), Rest(airflow)
        print(f"Airflow 3.3.2 settings: {airflow_settings(airflow)}")
        print(f"machine: {os.cpu_count()} cores, load average {load_average()}")
        base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=6)
        time.sleep(3)  # the reconciler's first pass (leadership, relist) before the roots
        if args.many_roots:
            run_many_roots(args, api, rest, reconciler, airflow)
        else:
            run_fanout(args, api, rest, reconciler, airflow, base)
        lines = (work / "reconciler.log").read_text(errors="replace").count("\n")
        print(f"  reconciler log: {lines} lines; airflow: stopped components "
              f"{airflow.stopped_components() or 'none'}")
    finally:
        tear_down(reconciler, airflow, postgres, etcd, work, keep=args.keep)


if __name__ == "__main__":
    main()
