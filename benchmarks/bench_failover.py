"""Failover time: from the leader replica killed (-9) to the new leader's first action.

Two `reconciler run` replicas (real processes) on a real etcd (tests/fixtures/etcd.py's
EtcdServer) and the fake Airflow playing the scheduler. Each repetition kills the leader
and, at the same instant, a root run of a new cycle ends, so there is work waiting; the
new leader's first action is the first trigger POST the fake Airflow receives for that
cycle. Also splits it: kill -> "became leader" (the lease lapsing; from the replica's JSON
log) and "became leader" -> first trigger. The killed replica is restarted as the standby
for the next repetition.

Target: below lease TTL + one interval (the lease must lapse, then one pass acts).
Usage: python benchmarks/bench_failover.py [--repeat 5] [--lease-ttl 2] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakes.fake_airflow import FakeAirflow  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402
from tests.fixtures.replicas import PASSWORD, Deployment, Replica, poll_until  # noqa: E402
from tests.helpers import EXAMPLE_DAGS  # noqa: E402

TRIGGER = "POST /api/v2/dags/{dag_id}/dagRuns"


def became_leader_after(replica: Replica, wall_after: datetime) -> datetime | None:
    for line in replica.lines():
        if line.get("message") == "became leader":
            at = datetime.fromisoformat(str(line["time"]))
            if at >= wall_after:
                return at
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    target = args.lease_ttl + args.interval
    totals: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp, \
            FakeAirflow(EXAMPLE_DAGS, password=PASSWORD) as fake:
        fake.auto_schedule(run_seconds=0.3, queue_seconds=0.1)
        server = EtcdServer(Path(tmp) / "etcd").start()
        deployment = Deployment.create(Path(tmp) / "d", server.endpoints, fake.url)
        try:
            for _ in range(2):
                deployment.start(lease_ttl=args.lease_ttl, interval=args.interval)
            print(f"2 replicas, lease TTL {args.lease_ttl:g} s, interval {args.interval:g} s; "
                  f"target < {target:g} s")
            for rep in range(args.repeat):
                leader = deployment.leader(timeout=60)
                standby = next(r for r in deployment.replicas if r is not leader)
                # the standby is up and campaigning (its metrics answer)
                poll_until(lambda s=standby: s.metrics(), 60, what="the standby", alive=[standby])
                cycle = datetime.now(UTC).replace(microsecond=0)
                wall = datetime.now(UTC)
                killed_at = time.monotonic()
                leader.kill()
                fake.add_run(EXAMPLE_DAGS[0], f"scheduled__{cycle.isoformat()}", cycle,
                             state="success", run_type="scheduled", start_date=wall,
                             end_date=wall)
                first = poll_until(lambda k=killed_at: fake.first_request(TRIGGER, after=k),
                                   60, what="the new leader's first trigger", alive=[standby])
                total = first.at - killed_at
                elected = became_leader_after(standby, wall)
                lease = (elected - wall).total_seconds() if elected else float("nan")
                totals.append(total)
                print(f"  {rep + 1}: {total:.2f} s (lease lapsed, new leader after "
                      f"{lease:.2f} s; its first trigger {total - lease:.2f} s later)")
                leader.restart()  # the next standby
                # wait until the whole cycle is done, so the next one starts from quiet
                poll_until(lambda c=cycle: all(
                    any(r.state == "success" for r in fake.cycle_runs(c).get(d, []))
                    for d in EXAMPLE_DAGS), 60, what="the cycle", alive=[standby])
        finally:
            deployment.kill_all()
            server.stop()
    print(f"failover: median {statistics.median(totals):.2f} s, max {max(totals):.2f} s "
          f"(target < lease TTL + interval = {target:g} s): "
          f"{'OK' if max(totals) < target else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
