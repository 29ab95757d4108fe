"""The loop at scale, on the fake Airflow API and a real etcd: 50,000 pipelines x 3 open
cycles, every run finished and recorded.

Prints, with the targets of issue 11:
  first pass of a fresh namespace   relist + ledger load + recording every status once
  first pass after a restart        a new replica takes over: relist, ledger and mirror
                                    load, plan; nothing to record (target < 10 s)
  full plan()                       on the loop's own inputs (target < 2 s)
  quiet pass                        target < 50 ms, 1 Airflow request, 0 etcd writes
  peak RSS of `reconciler run`      a real process against the same fake and etcd, VmHWM
                                    after its first passes (target < 1 GB)

The reconciler asks for `--page-size` runs per list request (its --airflow-page-size,
default 1000) and the fake serves up to `--max-page-limit` (Airflow's [api]
maximum_page_limit; default: the page size, as with AIRFLOW__API__MAXIMUM_PAGE_LIMIT
raised to match). `--page-size 100` gives the figures of Airflow's default limit.

The fake answers each list page by scanning every run (fine for tests, not what Airflow's
indexed query costs): here its selection is memoised per listing and `updated_at_gte` is
answered from an index, so the figures are the reconciler's (the fake still runs in this
process, its JSON encoding included).

    python benchmarks/bench_loop.py [--pipelines 50000] [--cycles 3] [--page-size 1000]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import layered_graph, write_pipelines  # noqa: E402

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.plan import plan  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings  # noqa: E402
from reconciler.core.state import LedgerState, iso  # noqa: E402
from reconciler.service.loop import PassReport, Reconciler  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fakes.fake_airflow import FakeAirflow, FakeRun  # noqa: E402
from tests.fixtures.etcd import EtcdServer, free_port  # noqa: E402

T = TypeVar("T")


class IndexedFake(FakeAirflow):
    """The fake, with its selection memoised while its runs do not change (the benchmark
    changes nothing after the set-up), `updated_at_gte` listings answered by bisection, and
    each run's JSON encoded once (a GET page is the join of its runs' JSON), so a relist
    costs this process what it costs the reconciler, not the fake's encoding as well.
    Connections are kept alive, as Airflow's API server (uvicorn) keeps them."""

    keep_alive = True

    def __init__(self, dag_ids: list[str], maximum_page_limit: int,
                 encode_once: bool = True) -> None:
        super().__init__(dag_ids, maximum_page_limit=maximum_page_limit)
        self.encode_once = encode_once
        self._memo: dict[Any, list[FakeRun]] = {}
        self._memo_state: Any = None
        self._by_updated: list[tuple[datetime, int, FakeRun]] = []
        self._encoded: dict[int, bytes] = {}

    def _list(self, h: Any, query: dict[str, list[str]], dag_id: str | None) -> None:
        if not self.encode_once:
            return super()._list(h, query, dag_id)
        try:
            limit = int(query.get("limit", ["50"])[0])
            offset = int(query.get("offset", ["0"])[0])
        except ValueError:
            return super()._list(h, query, dag_id)
        ranges = {f"{col}_{op}": (op, query[f"{col}_{op}"][0])
                  for col in ("updated_at", "logical_date") for op in ("gte", "lte")
                  if f"{col}_{op}" in query}
        runs = self._select({dag_id} if dag_id else None, ranges,
                            query.get("order_by", ["id"])[0])
        if limit < 0 or offset < 0 or isinstance(runs, tuple):
            return super()._list(h, query, dag_id)
        if self._memo_state != getattr(self, "_encoded_state", None):
            self._encoded, self._encoded_state = {}, self._memo_state
        parts = []
        for run in runs[offset:offset + min(limit, self.maximum_page_limit)]:
            part = self._encoded.get(run.seq)
            if part is None:
                part = self._encoded[run.seq] = json.dumps(run.to_api()).encode()
            parts.append(part)
        body = (b'{"dag_runs": [' + b", ".join(parts) + b'], "total_entries": '
                + str(len(runs)).encode() + b', "total_entries_limit": null, '
                b'"next_cursor": null, "previous_cursor": null}')
        return self._reply(h, 200, body)

    def _select(self, dag_ids: set[str] | None, ranges: dict[str, tuple[str, str]],
                order_by: str) -> list[FakeRun] | tuple[int, dict[str, Any]]:
        state = (len(self._runs), self._seq)
        if state != self._memo_state:
            self._memo, self._memo_state = {}, state
            self._by_updated = sorted((r.updated_at, r.seq, r) for r in self._runs.values())
        key = (None if dag_ids is None else frozenset(dag_ids),
               tuple(sorted(ranges.items())), order_by)
        if key in self._memo:
            return self._memo[key]  # the next page of the same listing
        if order_by == "id" and list(ranges) == ["updated_at_gte"] and dag_ids is None:
            try:
                bound = datetime.fromisoformat(ranges["updated_at_gte"][1])
            except ValueError:
                return super()._select(dag_ids, ranges, order_by)
            at = bisect.bisect_left(self._by_updated, (bound, -1))
            found = sorted((r for _, _, r in self._by_updated[at:]), key=lambda r: r.seq)
        else:
            selected = super()._select(dag_ids, ranges, order_by)
            if isinstance(selected, tuple):
                return selected
            found = selected
        self._memo[key] = found
        return found


def write_steady_ledger(r: Reconciler, store: EtcdStore, now: datetime
                        ) -> list[tuple[str, bytes]]:
    """The ledger the loop would have written for every run Airflow has (adopt: no Airflow
    call), in bulk, so that a benchmark starts from a steady state; the entries written."""
    seen = r.observer.observe(with_ledger=False)
    assert seen.desired is not None
    result = plan(seen.desired.graph, seen.runs.values(), {}, now, window=timedelta(days=2),
                  since=seen.desired.since, commit=seen.desired.commit)
    puts = [(store.ledger_key(iso(a.cycle), a.dag_id),
             json.dumps(a.ledger_entry(at=now, state=LedgerState.DONE).to_json()).encode())
            for a in result.actions]
    for i in range(0, len(puts), 100):
        store.put_if_revision(store.key("bench-marker", str(i)), 0, b"1",
                              also=puts[i:i + 100])
    return puts


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def describe(seconds: float, report: PassReport) -> str:
    return (f"{seconds:.2f} s, {report.airflow_requests} Airflow requests, "
            f"{report.etcd_writes} etcd writes, {len(report.actions)} actions")


def quiet_passes(r: Reconciler, count: int) -> tuple[list[float], list[PassReport]]:
    times, reports = [], []
    for _ in range(count):
        elapsed, report = timed(r.run_pass)
        times.append(elapsed)
        reports.append(report)
    return times, reports


def phases(r: Reconciler) -> dict[str, float]:
    """Time the steps of `r`'s passes (wall clock, summed): where a slow pass goes."""
    spent: dict[str, float] = {}
    from reconciler.service import loop

    def wrap(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed_step)

    wrap(r.observer, "load_desired", "graph from etcd")
    wrap(r.observer, "relist", "relist (Airflow)")
    wrap(r.ledger, "load", "ledger load")
    wrap(r, "plan", "plan")
    wrap(r.recorder, "load", "mirror load")
    wrap(r.recorder, "record", "record")
    wrap(loop, "settle_heap", "gc collect + freeze")
    return spent


def wait_leader(r: Reconciler, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not r.leadership.is_leader():
        if time.monotonic() > deadline:
            raise SystemExit(f"{r.holder} did not become leader in {timeout:.0f} s")
        time.sleep(0.05)


def process_peak(env: dict[str, str], port: int, passes: int, timeout: float) -> tuple[int, float]:
    """Run `reconciler run`, wait for `passes` passes (its /metrics), return its VmHWM in
    KiB and the seconds it took; it is stopped by process group."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"reconciler run exited {proc.returncode}")
            with contextlib.suppress(OSError):
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode()
                done = [float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("reconciler_passes_total")]
                if done and done[0] >= passes:
                    break
            time.sleep(0.5)
        else:
            raise SystemExit(f"reconciler run did not make {passes} passes in {timeout:.0f} s")
        elapsed = time.perf_counter() - started
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmHWM:"))
        return hwm, elapsed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=50_000)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--quiet", type=int, default=7, help="quiet passes to time")
    parser.add_argument("--no-process", action="store_true",
                        help="skip the `reconciler run` process (its peak RSS)")
    parser.add_argument("--page-size", type=int, default=AirflowSettings.page_size,
                        metavar="N", help="runs the reconciler asks for per list request "
                        "(--airflow-page-size)")
    parser.add_argument("--max-page-limit", type=int, default=0, metavar="M",
                        help="the most runs the fake serves per GET page, Airflow's [api] "
                        "maximum_page_limit (default: the page size)")
    parser.add_argument("--fake-encodes", action="store_true",
                        help="the fake encodes every page afresh (its JSON work then counts "
                        "in the relist's time, as before the per-run cache)")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="write a cProfile of the first pass after the restart to FILE")
    parser.add_argument("--profile-quiet", type=Path, metavar="FILE",
                        help="write a cProfile of the quiet passes after the restart to FILE")
    args = parser.parse_args()
    max_page = args.max_page_limit or args.page_size
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
            settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace="bench", timeout=30)
            store = EtcdStore(settings)
            now = datetime.now(UTC)
            sync(repo, "HEAD", "pipelines", store, source="bench", now=now - timedelta(days=1))
            with IndexedFake(list(graph_spec), max_page, not args.fake_encodes) as fake:
                # Every pipeline ran in every cycle, layer after layer, and all of it
                # ended (and was last updated) before now: a run updated in the future,
                # or in the last seconds, comes back in every incremental listing.
                cycles = [now.replace(microsecond=0) - timedelta(hours=h + 1)
                          for h in range(args.cycles)]
                order = list(graph_spec)  # layered_graph lists ids layer by layer
                for cycle in cycles:
                    for i, dag_id in enumerate(order):
                        start = cycle + timedelta(milliseconds=10 * i)
                        run = fake.add_run(dag_id, f"reconciler__{iso(cycle)}", cycle,
                                           state="success", start_date=start,
                                           end_date=start + timedelta(milliseconds=5))
                        run.queued_at = start
                        run.updated_at = start + timedelta(milliseconds=5)
                api_settings = AirflowSettings(url=fake.url, username="admin",
                                               password="secret-pw", page_size=args.page_size)
                loop_settings = LoopSettings(interval=1)

                def client() -> AirflowClient:
                    return AirflowClient(api_settings)

                r = Reconciler(store, client(), loop_settings, holder="bench")
                r.leadership.start()  # as `reconciler run` does: its own keep-alive thread
                wait_leader(r)
                # Record the ledger the loop would have written (adopt = no Airflow call),
                # in bulk, so the benchmark starts from a steady state.
                puts = write_steady_ledger(r, store, now)
                desired = r.observer.desired
                assert desired is not None
                r.observer.cache.listed_at = None  # the first pass lists again
                fresh_s, fresh = timed(r.run_pass)
                quiet_times, quiet = quiet_passes(r, args.quiet)
                plan_times = []
                for _ in range(5):
                    elapsed, _ = timed(lambda: plan(
                        desired.graph, r.observer.cache.runs.values(),
                        r.ledger.entries(), datetime.now(UTC), window=timedelta(days=2),
                        since=desired.since, commit=desired.commit))
                    plan_times.append(elapsed)
                r.leadership.stop()  # resigns: the next replica takes over at once
                r.close()
                r2 = Reconciler(store, client(), loop_settings, holder="bench-restarted")
                r2.leadership.start()
                wait_leader(r2)
                steps = phases(r2)
                if args.profile:
                    import cProfile

                    profiler = cProfile.Profile()
                    restart_s, restart = timed(lambda: profiler.runcall(r2.run_pass))
                    profiler.dump_stats(args.profile)
                else:
                    restart_s, restart = timed(r2.run_pass)
                restart_steps = dict(steps)
                if args.profile_quiet:
                    import cProfile

                    quiet_profiler = cProfile.Profile()
                    quiet2_times, quiet2 = quiet_profiler.runcall(quiet_passes, r2, args.quiet)
                    quiet_profiler.dump_stats(args.profile_quiet)
                else:
                    quiet2_times, quiet2 = quiet_passes(r2, args.quiet)
                r2.leadership.stop()
                r2.close()
                bench_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                process = None
                if not args.no_process:
                    port = free_port()
                    env = {k: v for k, v in os.environ.items()
                           if not k.startswith("RECONCILER_")}
                    env.update(RECONCILER_ETCD_ENDPOINTS=etcd.endpoint,
                               RECONCILER_NAMESPACE="bench", RECONCILER_AIRFLOW_URL=fake.url,
                               RECONCILER_AIRFLOW_USERNAME="admin",
                               RECONCILER_AIRFLOW_PASSWORD="secret-pw",
                               RECONCILER_INTERVAL="1", RECONCILER_HTTP_PORT=str(port),
                               RECONCILER_AIRFLOW_PAGE_SIZE=str(args.page_size))
                    process = process_peak(env, port, passes=4, timeout=300)
            store.close()
        finally:
            etcd.stop()
    runs = len(r2.observer.cache.runs)
    print(f"loop: {args.pipelines} pipelines x {len(cycles)} open cycles, {runs} runs, "
          f"{len(puts)} ledger entries; {args.page_size} runs asked for per list request, "
          f"the fake's maximum_page_limit {max_page}"
          + ("; the fake encodes every page" if args.fake_encodes else ""))
    print(f"  first pass, fresh namespace (relist, ledger load, every status recorded): "
          f"{describe(fresh_s, fresh)}")
    print(f"  first pass after a restart (relist, ledger and mirror load; target < 10 s): "
          f"{describe(restart_s, restart)}")
    print("    of which: " + ", ".join(f"{k} {v:.2f} s" for k, v in restart_steps.items()))
    print(f"  full plan() on the loop's inputs: median "
          f"{statistics.median(plan_times):.2f} s (target < 2 s)")
    for label, times, reports in (("quiet pass", quiet_times, quiet),
                                  ("quiet pass after the restart", quiet2_times, quiet2)):
        print(f"  {label}: median {statistics.median(times) * 1000:.0f} ms, max "
              f"{max(times) * 1000:.0f} ms (target < 50 ms), Airflow requests "
              f"{[q.airflow_requests for q in reports]}, etcd writes "
              f"{[q.etcd_writes for q in reports]}, actions {[len(q.actions) for q in reports]}")
    print(f"  peak RSS of this benchmark process (two replicas in turn, the fake Airflow "
          f"with its {runs} runs): {bench_peak / 1024:.0f} MB")
    if process is not None:
        print(f"  peak RSS of `reconciler run` (VmHWM after 4 passes, {process[1]:.1f} s "
              f"from start): {process[0] / 1024:.0f} MB (target < 1 GB)")


if __name__ == "__main__":
    main()
