"""Peak memory and time of the Airflow client against oversized answers (the hostile stub of
tests/fixtures/hostile.py), each case in a fresh process so its peak RSS is its own:

- `fat-conf`: a listing of 3 runs with a 50 MB `conf` each (the probe: 529 MB in `plan`),
  read into the loop's run cache (which keeps no conf but the provenance);
- `huge-page`: one 400 MB page, chunked, no Content-Length (the probe: 1.5 GB in `plan`),
  refused at RECONCILER_AIRFLOW_MAX_ANSWER_BYTES (64 MiB by default);
- `announced`: the same page with its Content-Length, refused before it is read.

Usage: python benchmarks/bench_hostile_answers.py [--conf-mb 50] [--page-mb 400]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fixtures.hostile import HostileAirflow, fat_runs, huge  # noqa: E402

CHILD = """
import json, sys, time
from reconciler.adapters.airflow import AirflowClient, AirflowError
from reconciler.core.settings import AirflowSettings
from reconciler.service.observer import RunCache


def peak_mb():
    # VmHWM, not ru_maxrss: getrusage's peak survives the fork and exec from the parent,
    # whose stub built the big answers.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


url = sys.argv[1]
api = AirflowClient(AirflowSettings(url=url, username="admin", password="pw", retries=1,
                                    timeout=120), deadline=300)
cache = RunCache()
started = time.monotonic()
try:
    cache.absorb(api.iter_runs(["01_pipeline_init"]), {"01_pipeline_init"})
    outcome = f"{len(cache.runs)} runs cached"
except AirflowError as exc:
    outcome = f"{type(exc).__name__}"
print(json.dumps({"seconds": time.monotonic() - started, "outcome": outcome,
                  "requests": api.request_count,
                  "peak_rss_mb": peak_mb()}))
"""


def measure(stub: HostileAirflow) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, stub.url], capture_output=True,
                         text=True, check=True, cwd=ROOT, timeout=600)
    return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf-mb", type=int, default=50)
    parser.add_argument("--page-mb", type=int, default=400)
    args = parser.parse_args()
    cases = {
        "fat-conf": fat_runs(3, args.conf_mb * 10**6),
        "huge-page": huge(args.page_mb * 10**6, length=False),
        "announced": huge(args.page_mb * 10**6, length=True),
    }
    print(f"{'case':10} {'outcome':28} {'requests':>8} {'seconds':>8} {'peak RSS':>9}")
    for name, behaviour in cases.items():
        with HostileAirflow() as stub:
            stub.behave(behaviour)
            figures = measure(stub)
        print(f"{name:10} {figures['outcome']!s:28} {figures['requests']!s:>8} "
              f"{float(figures['seconds']):8.2f} {float(figures['peak_rss_mb']):7.0f} MB")


if __name__ == "__main__":
    main()
