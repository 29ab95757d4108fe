"""Time of one `plan()` pass on 50,000 pipelines x 3 open cycles (target: under 2 s;
it was under 1 s at 10,000).

The graph is the synthetic layered one of benchmarks/synthetic.py (100 roots, layers of
100, about 3 upstreams each). Run histories come from simulated durations (30-90 s, each
run starting 1-2 s after its last upstream ended), cut at a moment: the oldest cycle is
finished (3 failed runs, whose descendants are blocked) and a user re-ran 5 late
pipelines after it finished (their downstreams get a clear), the middle one is half way
(runs in flight, a frontier to trigger), the newest has just had its root runs (its
first layer gets triggered). About half of all (pipeline, cycle) pairs are done.
The inputs are frozen out of the cyclic GC's reach first (`gc.collect(); gc.freeze()`),
as the loop does once a relist has built them (reconciler/service/loop.py, settle_heap):
otherwise the GC's full collections, set off by plan()'s own allocations, rescan the
150,000 runs and entries and make the figure swing by a second. `--no-freeze` shows that.
Usage: python benchmarks/bench_plan.py [--pipelines N] [--repeat R] [--no-freeze]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import layered_graph

from reconciler.core.graph import Graph, Pipeline
from reconciler.core.plan import plan
from reconciler.core.state import (
    ActionKind,
    DagRun,
    Fingerprint,
    LedgerEntry,
    LedgerState,
    run_id_for,
)


def build(n: int, seed: int = 11
          ) -> tuple[Graph, list[DagRun], dict[tuple[datetime, str], LedgerEntry], datetime]:
    """Graph, runs (shuffled), ledger and `now` of a realistic moment of the loop."""
    rng = random.Random(seed)
    graph = Graph(Pipeline(dag_id=d, depends_on=tuple(ups))
                  for d, ups in layered_graph(n).items())
    order = graph.topological_order()
    now = datetime(2025, 6, 3, 12, tzinfo=UTC)
    # oldest cycle finished (a few failures), middle one half way, newest just opened
    cycles = [(now - timedelta(hours=40), 1.0), (now - timedelta(hours=16), 0.5),
              (now - timedelta(minutes=5), 0.0)]
    failing = set(rng.sample(order[-1500:-1000], 3))
    runs: list[DagRun] = []
    ledger: dict[tuple[datetime, str], LedgerEntry] = {}
    for cycle, progress in cycles:
        # When each run would start and end if nothing stopped it (seconds from the open).
        start: dict[str, float] = {}
        end: dict[str, float] = {}
        for dag_id in order:
            ups = graph.upstreams(dag_id)
            start[dag_id] = max((end[u] for u in ups), default=0.0) + (1 + rng.random()
                                                                       if ups else 0.0)
            end[dag_id] = start[dag_id] + 30 + 60 * rng.random()
        ends = sorted(end.values())
        snapshot = ends[min(len(ends) - 1, int(progress * len(ends)))] + 0.5
        if progress == 0.0:
            snapshot = max(end[d] for d in graph.roots()) + 0.5
        opened = cycle + timedelta(minutes=1)

        def at(seconds: float, opened: datetime = opened) -> datetime:
            return opened + timedelta(seconds=seconds)

        by_id: dict[str, DagRun] = {}
        for dag_id in order:
            ups = graph.upstreams(dag_id)
            if start[dag_id] > snapshot or any(
                    u not in by_id or by_id[u].state != "success" for u in ups):
                continue  # not triggered yet, or blocked behind a failure
            run_id = run_id_for(cycle) if ups else f"scheduled__{cycle.isoformat()}"
            if end[dag_id] > snapshot:
                state, finished = "running", None
            else:
                state = "failed" if dag_id in failing and progress == 1.0 else "success"
                finished = at(end[dag_id])
            run = by_id[dag_id] = DagRun(dag_id, run_id, cycle, state, at(start[dag_id]),
                                         at(start[dag_id]), finished, "manual")
            if ups:
                ledger[(cycle, dag_id)] = LedgerEntry(
                    run.run_id, ActionKind.TRIGGER, Fingerprint.of(by_id[u] for u in ups),
                    "c0", at(start[dag_id] - 0.5), LedgerState.DONE)
        if progress == 1.0:  # a user re-ran a few late runs: downstreams get a clear
            rerun = [d for d in order[8000:8500] if d in by_id and by_id[d].state == "success"]
            for dag_id in rerun[:5]:
                old = by_id[dag_id]
                by_id[dag_id] = DagRun(dag_id, old.run_id, cycle, "success", now, now,
                                       now + timedelta(seconds=40))
        runs.extend(by_id.values())
    rng.shuffle(runs)
    return graph, runs, ledger, now + timedelta(minutes=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the inputs to the cyclic GC (the loop freezes them)")
    args = parser.parse_args()
    graph, runs, ledger, now = build(args.pipelines)
    if not args.no_freeze:
        gc.collect()
        gc.freeze()
    times = []
    result = None
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = plan(graph, runs, ledger, now, window=timedelta(days=2), commit="c1")
        times.append(time.perf_counter() - start)
    assert result is not None
    kinds: dict[str, int] = {}
    for a in result.actions:
        kinds[a.kind.value] = kinds.get(a.kind.value, 0) + 1
    states: dict[str, int] = {}
    for st in result.statuses:
        states[st.state.value] = states.get(st.state.value, 0) + 1
    print(f"plan: {len(graph)} pipelines, {graph.edge_count()} edges, "
          f"{len(result.cycles)} open cycles, {len(runs)} runs, {len(ledger)} ledger entries")
    print(f"  one pass: median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms (target < 2 s at "
          "50,000)" + (", inputs not frozen" if args.no_freeze else ""))
    print(f"  actions: {len(result.actions)} {dict(sorted(kinds.items()))}")
    print(f"  statuses: {dict(sorted(states.items()))}")


if __name__ == "__main__":
    main()
