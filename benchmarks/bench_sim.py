"""The randomized fault simulation (tests/sim), as many seeds as asked.

Starts a real 3-member etcd cluster (tests/fixtures/etcd.py; `--single`: one server, no
etcd faults but the in-process partition), runs seeds `--start` .. `--start + --seeds - 1`
(or the one `--seed`), each in a fresh namespace, and prints: seeds run, faults injected
by kind, actions taken, violations by kind with each violating seed's replay command,
the seeds per Airflow API generation (v2, v1 of 2.11, v1 of 2.5) and with one or two
deployments, and the time per seed. Exit 1 when any seed violated an invariant.

Usage: python benchmarks/bench_sim.py --seeds 1000 [--start N] [--seed N] [--verbose]
       [--generation v2|v1|v1-2.5] [--deployments one|two]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fixtures.etcd import EtcdCluster, EtcdServer  # noqa: E402
from tests.sim.runner import (  # noqa: E402
    SeedResult,
    SimEnv,
    deployments_of,
    replay_command,
    run_seed,
)
from tests.sim.world import GENERATIONS  # noqa: E402


def main() -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # The loop iterates sets of strings in places: with a fixed hash seed a replay
        # sends its requests in the same order as the run that found the violation.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, default=None, help="run (replay) this seed only")
    parser.add_argument("--single", action="store_true",
                        help="one etcd server instead of a 3-member cluster (no etcd faults)")
    parser.add_argument("--generation", choices=sorted(GENERATIONS), default=None,
                        help="run against this Airflow instead of each seed's own")
    parser.add_argument("--deployments", choices=["one", "two"], default=None,
                        help="every seed with one Airflow, or with two deployments, "
                             "instead of each seed's own (a third have two)")
    parser.add_argument("--verbose", action="store_true", help="one line per seed")
    parser.add_argument("--trace", type=Path, default=None, metavar="DIR",
                        help="for each seed with a violation, write its history and the "
                             "reconciler's log (WARNING and up) to DIR/seed-N.txt")
    args = parser.parse_args()
    # SIGTERM ends it like Ctrl-C: the etcd cluster is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    # The loop's own log lines: not on the terminal. The loggers stay at WARNING, so that
    # the checker's watch for tracebacks (logged at ERROR) sees them, and --trace keeps
    # those lines (not INFO: the seeds would run slower, and differently).
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.CRITICAL)
    trace = _Trace() if args.trace else None
    if trace is not None:
        logging.getLogger().addHandler(trace)
        args.trace.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed] if args.seed is not None else list(
        range(args.start, args.start + args.seeds))
    results: list[SeedResult] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        cluster: EtcdCluster | None = None
        server: EtcdServer | None = None
        if args.single:
            server = EtcdServer(Path(tmp) / "etcd").start()
            env = SimEnv(server.settings(timeout=0.5))
        else:
            cluster = EtcdCluster(Path(tmp) / "cluster").start()
            env = SimEnv(cluster.settings(timeout=0.5), cluster)
        try:
            for seed in seeds:
                if trace is not None:
                    trace.lines.clear()
                try:
                    deployments = (None if args.deployments is None else {}
                                   if args.deployments == "one" else
                                   deployments_of(seed, args.generation, two=True))
                    result = run_seed(seed, env, generation=args.generation,
                                      deployments=deployments)
                except (KeyboardInterrupt, SystemExit):
                    print(f"interrupted during seed {seed}", flush=True)
                    break
                results.append(result)
                if trace is not None and not result.ok:
                    (args.trace / f"seed-{seed}.txt").write_text(
                        result.report() + "\n\nhistory:\n" + "\n".join(result.history)
                        + "\n\nlog:\n" + "\n".join(trace.lines) + "\n", encoding="utf-8")
                if args.verbose or args.seed is not None or not result.ok:
                    status = "ok" if result.ok else f"{len(result.violations)} VIOLATION(S)"
                    print(f"seed {seed}: {status}, {result.seconds:.1f} s, "
                          f"{result.airflow}, "
                          f"{result.steps} steps, {result.replicas} replica(s), "
                          f"{sum(result.actions.values())} actions; {result.faults}",
                          flush=True)
                    for kind, detail in result.violations:
                        print(f"  {kind}: {detail}", flush=True)
                    if not result.ok:
                        replay = replay_command(seed, single=args.single,
                                                two=bool(result.deployments))
                        print(f"  replay: {replay}", flush=True)
        finally:
            if cluster is not None:
                cluster.stop()
            if server is not None:
                server.stop()
    summarize(results, time.monotonic() - started, args.single)
    return 0 if all(r.ok for r in results) else 1


class _Trace(logging.Handler):
    """The log records of the seed under way, one line each (kept for --trace)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.lines.append(f"{record.relativeCreated:.0f} {record.levelname} "
                          f"{record.getMessage()} "
                          + " ".join(f"{k}={v}" for k, v in fields.items()))


def summarize(results: list[SeedResult], wall: float, single: bool) -> None:
    if not results:
        return
    injected: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    kinds: dict[str, list[int]] = {}
    for r in results:
        injected.update(r.injected)
        actions.update(r.actions)
        for kind in {k for k, _ in r.violations}:
            kinds.setdefault(kind, []).append(r.seed)
    times = [r.seconds for r in results]
    print(f"\nseeds run: {len(results)} in {wall:.0f} s "
          f"({statistics.mean(times):.2f} s a seed, median {statistics.median(times):.2f}, "
          f"max {max(times):.2f})")
    print("faults injected: " + ", ".join(f"{k} {n}" for k, n in sorted(injected.items())
                                          if not k.startswith("workload:")))
    print("workload: " + ", ".join(f"{k.removeprefix('workload:')} {n}"
                                   for k, n in sorted(injected.items())
                                   if k.startswith("workload:")))
    generations = Counter(r.generation for r in results)
    print("Airflow generations: " + ", ".join(f"{k} {n}" for k, n in sorted(generations.items())))
    two = [r for r in results if r.deployments]
    print(f"deployments: one Airflow {len(results) - len(two)}, two {len(two)} "
          f"({', '.join(f'{k} {n}' for k, n in sorted(Counter(r.airflow for r in two).items()))})")
    print("actions taken: " + ", ".join(f"{k} {n}" for k, n in sorted(actions.items())))
    bad = [r for r in results if not r.ok]
    print(f"violations: {sum(len(r.violations) for r in bad)} in {len(bad)} seed(s)")
    two_of = {r.seed: bool(r.deployments) for r in results}
    for kind, seeds in sorted(kinds.items()):
        print(f"  {kind}: {len(seeds)} seed(s), e.g. "
              f"{replay_command(seeds[0], single=single, two=two_of[seeds[0]])}"
              f"  (seeds {', '.join(map(str, seeds[:12]))}{' ...' if len(seeds) > 12 else ''})")


if __name__ == "__main__":
    sys.exit(main())
