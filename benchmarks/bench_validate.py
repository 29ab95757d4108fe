"""Validate wall time and peak memory for a synthetic repository of 10,000 pipelines.

Target on a 2-core machine: under 3 s and under 300 MB. Runs `reconciler validate` as a
child process (so start-up and imports count) and reads its peak RSS from getrusage.
Usage: python benchmarks/bench_validate.py [--pipelines N] [--repeat R]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import layered_graph, write_pipelines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pipelines = Path(tmp) / "pipelines"
        write_pipelines(pipelines, layered_graph(args.pipelines))
        times, peaks = [], []
        for _ in range(args.repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(pipelines)],
                                  capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"validate failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            # ru_maxrss of children is the max over all of them: fine, each run is alike.
            peaks.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
        edges = sum(len(v) for v in layered_graph(args.pipelines).values())
        print(f"validate: {args.pipelines} pipelines, {edges} edges")
        print(f"  wall time: median {statistics.median(times):.2f} s, "
              f"min {min(times):.2f} s, max {max(times):.2f} s (target < 3 s)")
        print(f"  peak memory: {max(peaks) / 1024:.0f} MB (target < 300 MB)")


if __name__ == "__main__":
    main()
