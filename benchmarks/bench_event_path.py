"""The event path, edge by edge, and where its time goes: the listener's task event in
etcd -> the downstream's trigger POST arriving at Airflow ("our part" of an edge: the
downstream run is queued when its POST is handled), on a real etcd and the fake Airflow
API (tests/fakes/fake_airflow.py, with a task-instance route), with the real loop
(`Reconciler` + `Runner.run_forever` on a thread, default LoopSettings but a 30 s
interval, so only the events start passes; eager on, the default).

The example graph (01 -> 02..05 -> 06 -> 07), cycle after cycle (logical dates hours
apart, going back from now), driven as Airflow and its listener plugin would drive it:
the root's run is created by "the scheduler"; each run the reconciler triggers is marked
running and its first task's event is written (the pass that follows sees the run
running); then every task instance is set to success and, at t0, the last task's event
is written to etcd (the plugin's JSON, `{"kind": "task", ...}`), the run left
"running" (Airflow has not closed it: the eager path). Measured: t0 -> the arrival of the
downstream's trigger POST at the fake.

Edges, counted per downstream triggered: per cycle 6 edges from 3 measured events,
  fan-out  01 -> 02, 03, 04, 05   one event, four edges (four triggers in one pass)
  join     02..05 -> 06           one edge: the event of the last upstream to end (which
                                  one rotates by cycle; the other three have closed
                                  before, with a run event, as Airflow closes runs)
  chain    06 -> 07               one edge
Per edge, the marks (time.monotonic(); the fake stamps each request at its arrival):
  t0 (before the event's put) -> the etcd watch calls observer.on_event -> run_pass
  starts -> the listing `GET /dags/~/dagRuns?updated_at_gte=` arrives, and the eager
  read `GET .../dagRuns/{run}/taskInstances` arrives -> observe() returns -> plan done
  -> the intent's etcd write (Ledger.intend) starts and ends -> the trigger POST arrives.
The segments along that chain add up to the total edge by edge (the two reads count
from the pass start; the chain goes on from the later of the two). Then the wall time
of the steps inside the event passes (spans, summed per pass; calls on other threads
included) and, on a few extra cycles, a cProfile of the runner's thread during the event
passes (it inflates what it measures: read it for where, not how long).

No timed assertion: it prints. The machine's load average is printed beside the figures.

    python benchmarks/bench_event_path.py [--cycles 20] [--profile-cycles 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings  # noqa: E402
from reconciler.core.state import run_id_for  # noqa: E402
from reconciler.service.loop import Reconciler  # noqa: E402
from reconciler.service.observability import Health  # noqa: E402
from reconciler.service.runner import Runner  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fakes.fake_airflow import FakeAirflow  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402
from tests.helpers import EXAMPLE_DAGS, example_repo  # noqa: E402

ROOT = "01_pipeline_init"
EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
JOIN, LAST = "06_pipeline", "07_pipeline"
LISTING = "GET /api/v2/dags/~/dagRuns"
TI_READ = "GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
TRIGGER = "POST /api/v2/dags/{dag_id}/dagRuns"
QUIET = 0.1
"""Seconds without a pass before each measured event (above the runner's 20 ms MIN_GAP:
the event finds the loop waiting out its interval, as after a quiet spell)."""


class EventFake(FakeAirflow):
    """The fake Airflow (its task instances from `self.tis`), connections kept alive as
    Airflow's API server keeps them. Not bench_loop's IndexedFake: its memo assumes the
    runs never change after the set-up, and here they change all the time (7 DAGs x a
    few cycles: the plain scan costs nothing)."""

    keep_alive = True


def ti(task_id: str, state: str | None) -> dict[str, Any]:
    end = datetime.now(UTC).isoformat() if state in ("success", "skipped", "failed") else None
    return {"task_id": task_id, "map_index": -1, "state": state, "end_date": end,
            "try_number": 1}


def plugin_event(kind: str, dag_id: str, run_id: str, state: str,
                 task_id: str | None = None) -> bytes:
    """The value the listener plugin writes (reconciler/plugin/reconciler_events.py's
    run_event / task_event)."""
    value: dict[str, Any] = {"kind": kind, "dag_id": dag_id, "run_id": run_id}
    if kind == "task":
        value.update(task_id=task_id, map_index=-1, try_number=1)
    value.update(state=state, at=datetime.now(UTC).isoformat())
    return json.dumps(value).encode()


# --- instrumentation ----------------------------------------------------------------


@dataclass
class Span:
    label: str
    start: float
    end: float
    arg: Any = None


@dataclass
class Probe:
    """Wall-clock marks of the loop, from wrappers set on the loop's objects (instance
    attributes: the loop looks its methods up on the objects, so the wrappers see every
    call). Lists are appended to from several threads (atomic in CPython)."""

    spans: list[Span] = field(default_factory=list)
    events: list[tuple[str, float]] = field(default_factory=list)
    """(key, when observer.on_event was called), on the watch thread."""
    passes: list[Span] = field(default_factory=list)
    """One per run_pass, `end` NaN while it runs, `arg` its report."""
    profiler: cProfile.Profile | None = None
    armed: bool = False
    """The next pass is an event pass: profile it (when `profiler` is set)."""
    idle: threading.Condition = field(default_factory=threading.Condition)

    def wrap(self, owner: Any, name: str, label: str,
             arg: Callable[..., Any] | None = None) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return  # not in this version of the code
        spans = self.spans

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                spans.append(Span(label, start, time.monotonic(),
                                  arg(*args, **kwargs) if arg else None))

        setattr(owner, name, timed)

    def install(self, r: Reconciler) -> None:
        obs, api, store = r.observer, r.api, r.store
        on_event = obs.on_event

        def seen(key: str, value: bytes) -> None:
            self.events.append((key, time.monotonic()))
            on_event(key, value)

        obs.on_event = seen  # type: ignore[method-assign]
        run_pass = r.run_pass

        def timed_pass() -> Any:
            span = Span("pass", time.monotonic(), math.nan)
            self.passes.append(span)
            profiler, self.armed = (self.profiler if self.armed else None), False
            try:
                report = profiler.runcall(run_pass) if profiler else run_pass()
                span.arg = report
                return report
            finally:
                span.end = time.monotonic()
                with self.idle:
                    self.idle.notify_all()

        r.run_pass = timed_pass  # type: ignore[method-assign]
        self.wrap(r.leadership, "ensure", "leadership.ensure (lease check)")
        self.wrap(r.recorder, "load", "recorder.load (mirror, first of a term)")
        self.wrap(obs, "observe", "observer.observe",
                  lambda *a, **k: k.get("refresh", True))
        self.wrap(obs, "now", "observer.now (Airflow's clock)")
        self.wrap(obs, "load_desired", "observer.load_desired (graph head)")
        self.wrap(obs, "load_suspended", "observer.load_suspended")
        self.wrap(r.ledger, "entries", "ledger.entries")
        self.wrap(obs, "observe_runs", "observer.observe_runs (the listing)")
        self.wrap(api, "list_runs", "api.list_runs (HTTP round trip + parse)")
        self.wrap(obs, "check_tasks", "observer.check_tasks (eager check, in turn)")
        self.wrap(obs, "_ask_tasks", "observer._ask_tasks (eager read, on a thread)")
        self.wrap(api, "task_instances", "api.task_instances (HTTP round trip)")
        self.wrap(obs, "_apply_task_check", "observer._apply_task_check")
        self.wrap(r, "plan", "Reconciler.plan (plan(), or the last one)")
        self.wrap(r.executor, "execute", "executor.execute (all actions)")
        self.wrap(r.ledger, "intend", "ledger.intend (intent: fenced etcd txn)",
                  lambda holder, cycle, dag_id, entry: dag_id)
        self.wrap(api, "trigger", "api.trigger (POST round trip)",
                  lambda dag_id, *a, **k: dag_id)
        self.wrap(r.ledger, "settle", "ledger.settle (result: fenced etcd txn)")
        self.wrap(r.recorder, "record", "recorder.record (statuses to etcd)")
        self.wrap(r.recorder, "heartbeat", "recorder.heartbeat")
        self.wrap(store, "put_ledger", "store.put_ledger (etcd txn)")

    # --- waiting on the loop ---

    def running(self) -> bool:
        return bool(self.passes) and math.isnan(self.passes[-1].end)

    def wait_pass_after(self, after: float, timeout: float = 15.0,
                        check: Callable[[], bool] = lambda: True) -> None:
        """Until a pass that started after `after` has ended, no pass runs, and `check()`."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while not (any(p.start > after and not math.isnan(p.end) for p in self.passes)
                       and not self.running() and check()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no pass after {after:.3f} ended in {timeout:.0f} s")
                self.idle.wait(min(left, 0.05))

    def quiet(self, seconds: float = QUIET) -> None:
        """Until no pass has run for `seconds`."""
        while True:
            last = self.passes[-1].end if self.passes else 0.0
            if not self.running() and time.monotonic() - last >= seconds:
                return
            time.sleep(0.005)


# --- the world ----------------------------------------------------------------------


@dataclass
class Edge:
    kind: str
    upstream: str
    downstream: str
    marks: dict[str, float]


@dataclass
class Driver:
    """Plays Airflow's scheduler and the listener plugin around the loop."""

    fake: EventFake
    events: EtcdStore
    """The plugin's own etcd client (not the loop's)."""
    r: Reconciler
    probe: Probe
    missing: list[str] = field(default_factory=list)
    extra_actions: int = 0

    def put_event(self, kind: str, dag_id: str, run_id: str, state: str,
                  task_id: str | None = None) -> float:
        """Write the plugin's event; the monotonic time just before the put (t0)."""
        value = plugin_event(kind, dag_id, run_id, state, task_id)
        t0 = time.monotonic()
        self.events.put(self.events.event_key(dag_id, run_id), value)
        return t0

    def cached_state(self, dag_id: str, run_id: str) -> str | None:
        run = self.r.observer.cache.runs.get((dag_id, run_id))
        return None if run is None else run.state

    def start_running(self, dag_ids: list[str], run_id: str) -> None:
        """The scheduler starts the runs, their first task ends (its event is written),
        the second has not: the pass that follows lists the runs running."""
        for dag_id in dag_ids:
            self.fake.advance(dag_id, run_id, "running")
            self.fake.tis[(dag_id, run_id)] = [ti("extract", "success"), ti("load", "running")]
        for attempt in range(5):
            self.probe.quiet(0.03)
            after = time.monotonic()
            for dag_id in dag_ids:
                self.put_event("task", dag_id, run_id, "success", "extract")
            try:
                self.probe.wait_pass_after(after, check=lambda: all(
                    self.cached_state(d, run_id) == "running" for d in dag_ids))
                return
            except TimeoutError:
                if attempt == 4:
                    raise

    def close(self, dag_ids: list[str], run_id: str) -> None:
        """The scheduler closes the runs (success) and the plugin writes its run events."""
        self.probe.quiet(0.03)
        after = time.monotonic()
        for dag_id in dag_ids:
            self.fake.tis[(dag_id, run_id)] = [ti("extract", "success"), ti("load", "success")]
            self.fake.advance(dag_id, run_id, "success")
            self.put_event("run", dag_id, run_id, "success")
        self.probe.wait_pass_after(after, check=lambda: all(
            self.cached_state(d, run_id) == "success" for d in dag_ids))

    def edge_event(self, kind: str, upstream: str, up_run: str, downstreams: list[str],
                   down_run: str) -> list[Edge]:
        """The upstream's last task ends at t0 (its run left running); marks until every
        downstream's trigger POST has arrived and the pass has ended."""
        self.fake.tis[(upstream, up_run)] = [ti("extract", "success"), ti("load", "success")]
        self.probe.quiet()
        log_from = len(self.fake.log)
        spans_from, events_from = len(self.probe.spans), len(self.probe.events)
        self.probe.armed = True
        t0 = self.put_event("task", upstream, up_run, "success", "load")
        put_done = time.monotonic()
        try:
            self.probe.wait_pass_after(t0, timeout=15, check=lambda: all(
                self.fake.run(d, down_run) is not None for d in downstreams))
        except TimeoutError:
            self.missing.extend(f"{upstream}->{d}" for d in downstreams
                                if self.fake.run(d, down_run) is None)
            return []
        key = self.events.event_key(upstream, up_run)
        callback = next((at for k, at in self.probe.events[events_from:]
                         if k == key and at >= t0), math.nan)
        passes = [p for p in self.probe.passes if p.start >= callback]
        if not passes:
            self.missing.extend(f"{upstream}->{d}" for d in downstreams)
            return []
        the_pass = passes[0]
        report = the_pass.arg
        if report is not None and len(report.actions) > len(downstreams):
            self.extra_actions += len(report.actions) - len(downstreams)
        log = sorted(self.fake.log[log_from:], key=lambda q: q.at)
        spans = [s for s in self.probe.spans[spans_from:]
                 if the_pass.start <= s.start <= the_pass.end]

        def arrival(route: str, dag_id: str | None = None, run_id: str | None = None
                    ) -> float:
            return next((q.at for q in log if q.route == route and q.at >= the_pass.start
                         and (dag_id is None or q.dag_id == dag_id)
                         and (run_id is None or q.run_id == run_id)), math.nan)

        def first(label: str, arg: Any = None, end: bool = True) -> float:
            return next(((s.end if end else s.start) for s in spans
                         if s.label.split(" (")[0] == label
                         and (arg is None or s.arg == arg)), math.nan)

        shared = {
            "t0": t0, "put_done": put_done, "callback": callback,
            "pass_start": the_pass.start, "pass_end": the_pass.end,
            "listing": arrival(LISTING), "ti_read": arrival(TI_READ, upstream, up_run),
            "list_call": first("api.list_runs", end=False),
            "ti_call": first("api.task_instances", end=False),
            "observed": first("observer.observe", True),
            "planned": first("Reconciler.plan"),
        }
        edges = []
        for d in downstreams:
            intent = next((s for s in spans if s.label.startswith("ledger.intend")
                           and s.arg == d), None)
            marks = dict(shared, intent_start=intent.start if intent else math.nan,
                         intent_end=intent.end if intent else math.nan,
                         trigger_call=first("api.trigger", d, end=False),
                         post=arrival(TRIGGER, d))
            edges.append(Edge(kind, upstream, d, marks))
        return edges

    def cycle(self, cycle: datetime, index: int) -> list[Edge]:
        root_run = f"scheduled__{cycle.isoformat()}"
        run = run_id_for(cycle)
        self.fake.add_run(ROOT, root_run, cycle, run_type="scheduled")
        self.start_running([ROOT], root_run)
        edges = self.edge_event("fan-out", ROOT, root_run, EXTRACTS, run)
        self.close([ROOT], root_run)
        self.start_running(EXTRACTS, run)
        last = EXTRACTS[index % len(EXTRACTS)]
        self.close([d for d in EXTRACTS if d != last], run)
        edges += self.edge_event("join", last, run, [JOIN], run)
        self.close([last], run)
        self.start_running([JOIN], run)
        edges += self.edge_event("chain", JOIN, run, [LAST], run)
        self.close([JOIN], run)
        if self.fake.run(LAST, run) is not None:
            self.fake.advance(LAST, run, "running")
            self.fake.advance(LAST, run, "success")
        return edges


# --- figures ------------------------------------------------------------------------

SEGMENTS: list[tuple[str, str, str]] = [
    ("event put -> watch callback (observer.on_event)", "t0", "callback"),
    ("watch callback -> pass starts (run_pass)", "callback", "pass_start"),
    ("pass start -> listing request arrives", "pass_start", "listing"),
    ("  of which: pass start -> api.list_runs called", "pass_start", "list_call"),
    ("  of which: api.list_runs called -> arrives", "list_call", "listing"),
    ("pass start -> task-instance read arrives", "pass_start", "ti_read"),
    ("  of which: pass start -> api.task_instances called", "pass_start", "ti_call"),
    ("  of which: api.task_instances called -> arrives", "ti_call", "ti_read"),
    ("later of the two -> observe() returns", "reads", "observed"),
    ("observe() returns -> plan done", "observed", "planned"),
    ("plan done -> intent write starts", "planned", "intent_start"),
    ("intent write (Ledger.intend, fenced etcd txn)", "intent_start", "intent_end"),
    ("intent written -> trigger POST arrives", "intent_end", "post"),
    ("  of which: api.trigger called -> arrives", "trigger_call", "post"),
    ("TOTAL event put -> trigger POST arrives", "t0", "post"),
]


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"n": 0, "median": math.nan, "p90": math.nan, "max": math.nan}
    return {"n": len(values), "median": statistics.median(values),
            "p90": nearest_rank(values, 0.9), "max": max(values)}


def segment_values(edges: list[Edge], start: str, end: str) -> list[float]:
    out = []
    for e in edges:
        m = dict(e.marks, reads=max(e.marks["listing"], e.marks["ti_read"]))
        out.append(m[end] - m[start])
    return out


def span_figures(probe: Probe, edges: list[Edge]) -> dict[str, dict[str, float]]:
    """Per label: the wall time summed per event pass (one value per measured event)."""
    by_pass: dict[float, dict[str, float]] = {}
    calls: dict[str, list[int]] = {}
    starts = sorted({e.marks["pass_start"] for e in edges})
    ends = {e.marks["pass_start"]: e.marks["pass_end"] for e in edges}
    spans = sorted(probe.spans, key=lambda s: s.start)
    for start in starts:
        totals: dict[str, float] = {"pass (run_pass)": ends[start] - start}
        count: dict[str, int] = {}
        for s in spans:
            if start <= s.start <= ends[start]:
                label = s.label
                if label == "observer.observe":
                    label += " (refresh)" if s.arg else " (after the actions, no refresh)"
                totals[label] = totals.get(label, 0.0) + s.end - s.start
                count[label] = count.get(label, 0) + 1
        by_pass[start] = totals
        for label, n in count.items():
            calls.setdefault(label, []).append(n)
    labels: list[str] = []
    for totals in by_pass.values():
        labels += [k for k in totals if k not in labels]
    out = {}
    for label in labels:
        values = [t.get(label, 0.0) for t in by_pass.values()]
        figures = summary(values)
        figures["calls"] = statistics.median(calls.get(label, [1]))
        out[label] = figures
    return out


def profile_lines(stats: pstats.Stats, passes: int, top: int) -> list[str]:
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = \
        stats.stats  # type: ignore[attr-defined]
    rows = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in raw.items():
        short = path
        for base in (str(REPO) + "/", "site-packages/", "/lib/python3"):
            if base in short:
                short = short.split(base, 1)[1]
                break
        where = f"{short}:{line}:{name}" if path != "~" else name
        rows.append((where, calls / passes, tottime / passes, cumtime / passes))
    own = sorted((r for r in rows if r[0].startswith("reconciler/")),
                 key=lambda r: -r[3])[:top]
    flat = sorted(rows, key=lambda r: -r[2])[:top]
    out = ["  by cumulative time, the project's functions (ms per pass, calls per pass):"]
    out += [f"    {cum * 1000:7.2f} {n:6.1f}  {w}" for w, n, _, cum in own]
    out.append("  by own time, any function (ms per pass, calls per pass):")
    out += [f"    {tot * 1000:7.2f} {n:6.1f}  {w}" for w, n, tot, _ in flat]
    return out


def git_describe() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()[:90]
    return "?"


@contextlib.contextmanager
def running_loop(store: EtcdStore, fake: EventFake, probe: Probe
                 ) -> Iterator[Reconciler]:
    api = AirflowClient(AirflowSettings(url=fake.url, username="admin",
                                        password="secret-pw"))
    r = Reconciler(store, api, LoopSettings(interval=30, http_port=0), holder="bench")
    probe.install(r)
    runner = Runner(r, Health())
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), name="runner",
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not any(p.arg is not None and p.arg.leader for p in probe.passes):
            if time.monotonic() > deadline or not thread.is_alive():
                raise SystemExit("the loop did not lead a pass within 30 s")
            time.sleep(0.02)
        yield r
    finally:
        stop.set()
        runner.wake.set()
        thread.join(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20,
                        help="measured cycles of the example graph, 6 edges each")
    parser.add_argument("--profile-cycles", type=int, default=3,
                        help="extra cycles under cProfile (the runner's thread during the "
                        "event passes); 0: none")
    parser.add_argument("--top", type=int, default=12, help="lines per profile table")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures as JSON to FILE ('-': stdout)")
    args = parser.parse_args()
    total_cycles = args.cycles + args.profile_cycles
    if not 0 < total_cycles < 40:
        raise SystemExit("--cycles + --profile-cycles must be 1..39 (one hour apart, inside "
                         "the loop's 2-day window)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-event-path-") as tmp:
        work = Path(tmp)
        etcd = EtcdServer(work / "etcd").start()
        try:
            settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace="bench", timeout=10)
            store, plugin = EtcdStore(settings), EtcdStore(settings)
            now = datetime.now(UTC).replace(microsecond=0)
            assert sync(example_repo(work / "repo"), "HEAD", "pipelines", store,
                        source="bench", now=now - timedelta(days=60)).ok
            cycles = [now - timedelta(hours=total_cycles - i) for i in range(total_cycles)]
            probe = Probe()
            fake = EventFake(EXAMPLE_DAGS)
            with fake, running_loop(store, fake, probe) as r:
                driver = Driver(fake, plugin, r, probe)
                edges: list[Edge] = []
                for i, cycle in enumerate(cycles[:args.cycles]):
                    edges += driver.cycle(cycle, i)
                load_after = os.getloadavg()
                spans = span_figures(probe, edges)
                profile: list[str] = []
                if args.profile_cycles:
                    profiler = cProfile.Profile()
                    probe.profiler = profiler
                    profiled: list[Edge] = []
                    for i, cycle in enumerate(cycles[args.cycles:]):
                        profiled += driver.cycle(cycle, args.cycles + i)
                    probe.profiler = None
                    passes = len({e.marks["t0"] for e in profiled})
                    under = summary(segment_values(profiled, "t0", "post"))["median"]
                    profile = [f"cProfile of the runner's thread in the {passes} event passes "
                               f"of {args.profile_cycles} more cycles ({len(profiled)} edges, "
                               f"median edge {under * 1000:.1f} ms under the profiler; "
                               f"the listing and trigger threads are not profiled: their "
                               f"waits show as lock acquire)"]
                    profile += profile_lines(pstats.Stats(profiler), max(1, passes), args.top)
                missing, extra = driver.missing, driver.extra_actions
            store.close()
            plugin.close()
        finally:
            etcd.stop()

    events = len({e.marks["t0"] for e in edges})
    figures = {label: summary(segment_values(edges, a, b)) for label, a, b in SEGMENTS}
    kinds = {k: summary(segment_values([e for e in edges if e.kind == k], "t0", "post"))
             for k in ("fan-out", "join", "chain")}
    load = (f"load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
            f"{' '.join(f'{x:.2f}' for x in load_after)} after ({os.cpu_count()} CPUs)")
    print(f"event path: {git_describe()}")
    print(f"  {args.cycles} cycles of the example graph, {len(edges)} edges from {events} "
          f"task events (6 edges a cycle: fan-out 01->02..05 counted once per downstream, "
          f"the join's last upstream ->06, 06->07); {load}")
    if missing:
        print(f"  NOT TRIGGERED within 15 s: {len(missing)} edges: {', '.join(missing[:8])}")
    if extra:
        print(f"  the event passes took {extra} other actions besides the measured triggers")
    print(f"  {'segment (ms)':<50} {'median':>8} {'p90':>8} {'max':>8} {'n':>5}")
    for label, f in figures.items():
        print(f"  {label:<50} {f['median'] * 1000:8.1f} {f['p90'] * 1000:8.1f} "
              f"{f['max'] * 1000:8.1f} {f['n']:5d}")
    for kind, f in kinds.items():
        print(f"  {'  total, ' + kind + ' edges':<50} {f['median'] * 1000:8.1f} "
              f"{f['p90'] * 1000:8.1f} {f['max'] * 1000:8.1f} {f['n']:5d}")
    print(f"  inside the {events} event passes: wall time per pass, summed over its calls "
          f"(calls on other threads included: they overlap)")
    print(f"  {'step (ms per pass)':<58} {'median':>7} {'p90':>7} {'calls':>5}")
    for label, f in spans.items():
        print(f"  {label:<58} {f['median'] * 1000:7.2f} {f['p90'] * 1000:7.2f} "
              f"{f['calls']:5.0f}")
    for line in profile:
        print(line)
    if args.json:
        doc = {"commit": git_describe(), "cycles": args.cycles, "edges": len(edges),
               "events": events, "loadavg_before": load_before, "loadavg_after": load_after,
               "cpus": os.cpu_count(), "missing": missing, "segments_s": figures,
               "total_by_kind_s": kinds, "pass_steps_s": spans, "profile": profile,
               "edges_marks": [{"kind": e.kind, "upstream": e.upstream,
                                "downstream": e.downstream, **e.marks} for e in edges]}
        text = json.dumps(doc, indent=1, default=str)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text)


if __name__ == "__main__":
    main()
