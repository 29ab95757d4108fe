"""The loop at scale across deployments (issue 18, item 7), on fake Airflow APIs and a real
etcd: the same N pipelines x C cycles (every run finished and recorded) in one deployment
and split over D deployments, in one run, so the two can be compared as ratios.

Prints for each layout:
  first pass after a restart   a new replica takes over: relists every deployment, loads
                               the ledger and the mirror, plans
  quiet pass                   median and max over --quiet passes
  CPU of the reconciler        of its own threads (main and listing), for both: the
                               fakes answer from threads of the same process
  peak RSS                     of `reconciler run` (VmHWM after its first passes)
and, for the split layout, the quiet pass while one deployment does not answer (each of
its requests hangs past the client's timeout), beside the same layout's quiet pass: what
a slow deployment adds to the passes of the others (the deployments are listed at once,
and the loop leaves a listing much slower than the others' behind).

The pipelines go to deployments round-robin (pipeline i to deployment i mod D), so most
edges cross deployments. Each fake is benchmarks/bench_loop.py's IndexedFake (selection
memoised, JSON encoded once), so the figures are the reconciler's.

    python benchmarks/bench_deployments.py [--pipelines 50000] [--deployments 4] [--cycles 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_loop import (  # noqa: E402
    IndexedFake,
    process_peak,
    timed,
    wait_leader,
    write_steady_ledger,
)
from synthetic import layered_graph, write_pipelines  # noqa: E402

from reconciler.adapters.airflow import AirflowClient  # noqa: E402
from reconciler.adapters.airflow_fleet import AirflowFleet  # noqa: E402
from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.core.graph import Deployment  # noqa: E402
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings  # noqa: E402
from reconciler.core.state import iso  # noqa: E402
from reconciler.service.loop import Reconciler  # noqa: E402
from reconciler.service.sync import sync  # noqa: E402
from tests.fixtures.etcd import EtcdServer, free_port  # noqa: E402

PASSWORD = "secret-pw"
TIMEOUT = 2.0
"""Seconds of the clients' requests (both layouts): a hanging deployment costs this."""


@dataclass
class Figures:
    restart_s: float = 0.0
    restart_requests: int = 0
    restart_cpu: float = 0.0
    quiet: list[float] = field(default_factory=list)
    quiet_requests: list[int] = field(default_factory=list)
    quiet_cpu: list[float] = field(default_factory=list)
    """CPU seconds of the reconciler's own threads per quiet pass (the main thread and
    its listing threads; the fakes answer from threads of this same process, so a pass's
    wall time carries their work too)."""
    slow: list[float] = field(default_factory=list)
    slow_held: list[str] = field(default_factory=list)
    rss_kib: int = 0


def name_of(i: int) -> str:
    return f"af{i + 1}"


def make_repo(path: Path, spec: dict[str, list[str]], deployments: int,
              fakes: list[IndexedFake]) -> None:
    write_pipelines(path / "pipelines", spec)
    if deployments > 1:
        folder = path / "airflow-deployments"
        folder.mkdir()
        for i, fake in enumerate(fakes):
            (folder / f"{name_of(i)}.yaml").write_text(
                f"name: {name_of(i)}\nurl: {fake.url}\napi: v2\nauth:\n  kind: password\n"
                f"  username: admin\n  password_env: {name_of(i).upper()}_PASSWORD\n"
                + ("default: true\n" if i == 0 else ""))
        for n, dag_id in enumerate(spec):
            if n % deployments:
                file = path / "pipelines" / f"{dag_id}.yaml"
                file.write_text(file.read_text() + f"deployment: {name_of(n % deployments)}\n")
    for cmd in (["init", "-q"], ["config", "user.email", "b@x"], ["config", "user.name", "b"],
                ["add", "."], ["commit", "-qm", "synthetic"]):
        subprocess.run(["git", *cmd], cwd=path, check=True)


@contextlib.contextmanager
def fakes_for(spec: dict[str, list[str]], deployments: int, page: int
              ) -> Iterator[list[IndexedFake]]:
    order = list(spec)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(IndexedFake(order[i::deployments], page))
               for i in range(deployments)]


def fleet_of(fakes: list[IndexedFake], page: int) -> AirflowFleet:
    def settings(url: str) -> AirflowSettings:
        return AirflowSettings(url=url, username="admin", password=PASSWORD, timeout=TIMEOUT,
                               retries=1, page_size=page)

    urls = {name_of(i): f.url for i, f in enumerate(fakes)}

    def connect(declaration: Deployment) -> AirflowClient:
        return AirflowClient(settings(urls[declaration.name]))

    return AirflowFleet(AirflowClient(settings(fakes[0].url)), connect)


def measure(work: Path, etcd: EtcdServer, spec: dict[str, list[str]], deployments: int,
            cycles: int, quiet: int, page: int, process: bool) -> Figures:
    out = Figures()
    namespace = f"bench-d{deployments}"
    settings = EtcdSettings(endpoints=(etcd.endpoint,), namespace=namespace, timeout=30)
    with fakes_for(spec, deployments, page) as fakes, EtcdStore(settings) as store:
        repo = work / f"repo-{deployments}"
        make_repo(repo, spec, deployments, fakes)
        for i in range(deployments):
            os.environ[f"{name_of(i).upper()}_PASSWORD"] = PASSWORD
        now = datetime.now(UTC)
        sync(repo, "HEAD", "pipelines", store, source="bench", now=now - timedelta(days=1))
        home = {d: fakes[n % deployments] for n, d in enumerate(spec)}
        # Every run ended before now, each after its upstreams (10 ms apart, 5 ms long): a
        # run "updated" in the future would come back in every incremental listing, and
        # one started before its upstreams ended would be re-run.
        for cycle in (now.replace(microsecond=0) - timedelta(hours=h + 1)
                      for h in range(cycles)):
            for i, dag_id in enumerate(spec):
                start = cycle + timedelta(milliseconds=10 * i)
                run = home[dag_id].add_run(dag_id, f"reconciler__{iso(cycle)}", cycle,
                                           state="success", start_date=start,
                                           end_date=start + timedelta(milliseconds=5))
                run.queued_at = start
                run.updated_at = start + timedelta(milliseconds=5)
        loop = LoopSettings(interval=1)
        r = Reconciler(store, fleet_of(fakes, page), loop, holder="bench")
        r.leadership.start()
        wait_leader(r)
        write_steady_ledger(r, store, now)
        r.observer.cache.listed_at = None
        r.run_pass()  # records every status once
        r.leadership.stop()
        r.close()
        r2 = Reconciler(store, fleet_of(fakes, page), loop, holder="bench-restarted")
        r2.leadership.start()
        wait_leader(r2)
        out.restart_s, out.restart_cpu, report = pass_with_cpu(r2)
        out.restart_requests = report.airflow_requests
        for _ in range(quiet):
            wall, cpu, report = pass_with_cpu(r2)
            out.quiet.append(wall)
            out.quiet_cpu.append(cpu)
            out.quiet_requests.append(report.airflow_requests)
        if deployments > 1:
            slow = fakes[-1]
            slow.fail_next(10**6, "hang", TIMEOUT + 1.0)
            for _ in range(max(quiet, 8)):  # a pass every 0.5 s: its listing fails meanwhile
                time.sleep(0.5)
                out.slow.append(timed(r2.run_pass)[0])
            out.slow_held = sorted(r2.observer.unreachable)
            slow.clear_faults()
        r2.leadership.stop()
        r2.close()
        if process:
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
            env.update(RECONCILER_ETCD_ENDPOINTS=etcd.endpoint, RECONCILER_NAMESPACE=namespace,
                       RECONCILER_AIRFLOW_URL=fakes[0].url, RECONCILER_AIRFLOW_USERNAME="admin",
                       RECONCILER_AIRFLOW_PASSWORD=PASSWORD, RECONCILER_INTERVAL="1",
                       RECONCILER_HTTP_PORT=str(port),
                       RECONCILER_AIRFLOW_PAGE_SIZE=str(page))
            out.rss_kib = process_peak(env, port, passes=4, timeout=600)[0]
    return out


def pass_with_cpu(r: Reconciler) -> tuple[float, float, Any]:
    """One pass: its wall time, the CPU time of the reconciler's own threads (the main
    thread and its listing threads, not the fakes' handlers in this same process), and
    its report."""
    listing_cpu: list[float] = []
    inner = r.observer._list_job

    def list_job(*args: Any, **kwargs: Any) -> Any:
        job = inner(*args, **kwargs)

        def timed_job() -> Any:
            start = time.thread_time()
            try:
                return job()
            finally:
                listing_cpu.append(time.thread_time() - start)
        return timed_job

    r.observer._list_job = list_job  # type: ignore[method-assign]
    try:
        cpu = time.thread_time()
        wall, report = timed(r.run_pass)
        cpu = time.thread_time() - cpu + sum(listing_cpu)
    finally:
        del r.observer._list_job
    return wall, cpu, report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=50_000)
    parser.add_argument("--deployments", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--quiet", type=int, default=7, help="quiet passes to time")
    parser.add_argument("--page-size", type=int, default=AirflowSettings.page_size)
    parser.add_argument("--no-process", action="store_true",
                        help="skip the `reconciler run` processes (their peak RSS)")
    args = parser.parse_args()
    spec = layered_graph(args.pipelines)
    with tempfile.TemporaryDirectory(prefix="bench-deployments-") as tmp:
        work = Path(tmp)
        etcd = EtcdServer(work / "etcd").start()
        try:
            one = measure(work, etcd, spec, 1, args.cycles, args.quiet, args.page_size,
                          not args.no_process)
            split = measure(work, etcd, spec, args.deployments, args.cycles, args.quiet,
                            args.page_size, not args.no_process)
        finally:
            etcd.stop()
    load = os.getloadavg()[0]
    d = args.deployments
    print(f"deployments: {args.pipelines} pipelines x {args.cycles} cycles, in 1 deployment "
          f"and in {d} (round-robin: most edges cross), fake Airflows, real etcd; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    rows: list[tuple[str, Any, Any, str]] = [
        ("first pass after a restart, s", f"{one.restart_s:.2f}", f"{split.restart_s:.2f}",
         ratio(split.restart_s, one.restart_s)),
        ("  its Airflow requests", one.restart_requests, split.restart_requests, ""),
        ("  CPU of the reconciler's threads, s", f"{one.restart_cpu:.2f}",
         f"{split.restart_cpu:.2f}", ratio(split.restart_cpu, one.restart_cpu)),
        ("quiet pass, median ms", f"{statistics.median(one.quiet) * 1000:.0f}",
         f"{statistics.median(split.quiet) * 1000:.0f}",
         ratio(statistics.median(split.quiet), statistics.median(one.quiet))),
        ("quiet pass, max ms", f"{max(one.quiet) * 1000:.0f}",
         f"{max(split.quiet) * 1000:.0f}", ratio(max(split.quiet), max(one.quiet))),
        ("  its Airflow requests", one.quiet_requests[-1], split.quiet_requests[-1], ""),
        ("  CPU of the reconciler's threads, median ms",
         f"{statistics.median(one.quiet_cpu) * 1000:.1f}",
         f"{statistics.median(split.quiet_cpu) * 1000:.1f}",
         ratio(statistics.median(split.quiet_cpu), statistics.median(one.quiet_cpu))),
    ]
    if one.rss_kib:
        rows.append(("peak RSS of `reconciler run`, MB", f"{one.rss_kib / 1024:.0f}",
                     f"{split.rss_kib / 1024:.0f}", ratio(split.rss_kib, one.rss_kib)))
    width = max(len(r[0]) for r in rows)
    print(f"  {'':{width}}  {'1 deployment':>14}  {f'{d} deployments':>14}  ratio")
    for label, a, b, r in rows:
        print(f"  {label:{width}}  {a!s:>14}  {b!s:>14}  {r}")
    slow, quiet = statistics.median(split.slow), statistics.median(split.quiet)
    print(f"  one of the {d} deployments hanging (each request past the {TIMEOUT:.0f} s "
          f"timeout): quiet pass median {slow * 1000:.0f} ms ({ratio(slow, quiet)} of the "
          f"split layout's quiet pass), max {max(split.slow) * 1000:.0f} ms; held back "
          f"after its listing failed: {', '.join(split.slow_held) or 'none'}")


if __name__ == "__main__":
    main()
