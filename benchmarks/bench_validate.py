"""Validate wall time and peak memory for a synthetic repository of 50,000 pipelines.

Target on a 2-core machine (issue 11): under 10 s and under 1 GB at 50,000 (it was 3 s and
300 MB at 10,000). Runs `reconciler validate` as a child process (so start-up and
imports count) and reads its peak RSS from getrusage (ru_maxrss of the children: the
largest of them, each run is alike).
A second case adds --unknown files (3,000 by default) whose upstream exists nowhere, half
of them typos of a real id: every one gets its "did you mean" search (23-73 s before the
suggestions were indexed).
Usage: python benchmarks/bench_validate.py [--pipelines N] [--unknown U] [--repeat R]
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
    parser.add_argument("--pipelines", type=int, default=50_000)
    parser.add_argument("--unknown", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    valid(args)
    unknown_upstreams(args)


def timed_validate(pipelines: Path, expect: int) -> tuple[float, int, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(pipelines)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != expect:
        sys.exit(f"validate exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    # ru_maxrss of children is the max over all of them: fine, each run is alike.
    return elapsed, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), \
        proc.stdout


def unknown_upstreams(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipelines = Path(tmp) / "pipelines"
        write_pipelines(pipelines, layered_graph(args.pipelines))
        for i in range(args.unknown):
            # half a typo of a real id (the suggestion index finds it), half made up
            up = f"pipeline_{i:05d}"[::-1] if i % 2 else f"pipleine_{i:05d}"
            (pipelines / f"down_{i:05d}.yaml").write_text(
                f"dag_id: down_{i:05d}\nowner: t\ndepends_on: [{up}]\n")
        times = []
        for _ in range(args.repeat):
            elapsed, _, out = timed_validate(pipelines, 1)
            times.append(elapsed)
        hints = out.count("did you mean")
        print(f"validate with {args.unknown} unknown upstreams ({args.pipelines} valid "
              f"pipelines beside them, {hints} suggestions found)")
        print(f"  wall time: median {statistics.median(times):.2f} s, "
              f"min {min(times):.2f} s, max {max(times):.2f} s (was 23-73 s)")


def valid(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipelines = Path(tmp) / "pipelines"
        write_pipelines(pipelines, layered_graph(args.pipelines))
        times, peaks = [], []
        for _ in range(args.repeat):
            elapsed, peak, _ = timed_validate(pipelines, 0)
            times.append(elapsed)
            peaks.append(peak)
        edges = sum(len(v) for v in layered_graph(args.pipelines).values())
        print(f"validate: {args.pipelines} pipelines, {edges} edges")
        print(f"  wall time: median {statistics.median(times):.2f} s, "
              f"min {min(times):.2f} s, max {max(times):.2f} s (target < 10 s at 50,000)")
        print(f"  peak RSS: {max(peaks) / 1024:.0f} MB (target < 1 GB)")


if __name__ == "__main__":
    main()
