"""Sync wall time, peak memory and blob size for a committed graph of 50,000 pipelines
(~3 upstreams each).

Target (issue 11): under 5 s for `reconciler sync` at 50,000, also as a CLI process (read
the commit's tree, validate, compress, write to etcd), under 1 GB. Starts its own etcd
(tests/fixtures/etcd.py's EtcdServer) on a free loopback port with a temporary data dir,
and stops it. Times the library call (the sync itself) and the CLI as a child process
(start-up and imports included, peak RSS from getrusage), each in a fresh namespace,
plus the no-op re-sync. `--part-bytes` makes the store split the blob into parts that
small (the default part is 1 MiB: the 50,000 graph is one value). The graph blob's sha256
is printed (the synthetic graph is the same on every run, whatever its commit): it must
not change from one version to the next; the CLI's blob must be the library's.
Usage: python benchmarks/bench_sync.py [--pipelines N] [--repeat R]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic import layered_graph, write_pipelines  # noqa: E402

from reconciler.adapters.store import EtcdStore  # noqa: E402
from reconciler.service.sync import Status, sync  # noqa: E402
from tests.fixtures.etcd import EtcdServer  # noqa: E402


def git(repo: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--part-bytes", type=int, default=0,
                        help="split the blob into parts this large (library syncs only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        graph = layered_graph(args.pipelines)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.name", "Bench")
        git(repo, "config", "user.email", "bench@example.invalid")
        write_pipelines(repo / "pipelines", graph)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "synthetic graph")
        server = EtcdServer(Path(tmp) / "etcd").start()
        try:
            base = server.settings(prefix="bench", timeout=10.0)
            lib_times, noop_times, blob = [], [], 0
            for _ in range(args.repeat):
                settings = replace(base, namespace=f"b-{uuid.uuid4().hex[:8]}")
                with EtcdStore(settings) as store:
                    if args.part_bytes:
                        store.part_bytes = args.part_bytes
                    store.ping()  # connect outside the timing, like a warm loop would be
                    start = time.perf_counter()
                    result = sync(repo, "HEAD", "pipelines", store, source="bench")
                    lib_times.append(time.perf_counter() - start)
                    if result.status is not Status.SYNCED:
                        sys.exit(f"sync failed: {result.message}")
                    blob = result.blob_bytes
                    start = time.perf_counter()
                    if sync(repo, "HEAD", "pipelines", store).status is not Status.NOOP:
                        sys.exit("re-sync was not a no-op")
                    noop_times.append(time.perf_counter() - start)
                    since_bytes = len(store.read_since_blob(result.commit) or b"")
                    parts = result.head.graph_parts if result.head else 0
                    blob_sha = hashlib.sha256(store.read_graph_blob(result.commit) or b""
                                              ).hexdigest()
            cli_times = []
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            for _ in range(args.repeat):
                env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
                env.update(RECONCILER_ETCD_ENDPOINTS=server.endpoint,
                           RECONCILER_ETCD_PREFIX="bench",
                           RECONCILER_NAMESPACE=f"c-{uuid.uuid4().hex[:8]}")
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "reconciler", "sync", "--repo",
                                       str(repo)], capture_output=True, text=True, env=env)
                cli_times.append(time.perf_counter() - start)
                if proc.returncode != 0:
                    sys.exit(f"reconciler sync failed:\n{proc.stdout}{proc.stderr}")
            cli_peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            with EtcdStore(replace(base, namespace=env["RECONCILER_NAMESPACE"])) as store:
                cli_blob = store.read_graph_blob(result.commit) or b""
            if hashlib.sha256(cli_blob).hexdigest() != blob_sha:
                sys.exit("the CLI wrote another graph blob than the library")
        finally:
            server.stop()
    edges = sum(len(v) for v in graph.values())
    print(f"sync: {args.pipelines} pipelines, {edges} edges")
    print(f"  sync (library): median {statistics.median(lib_times):.2f} s, "
          f"min {min(lib_times):.2f} s, max {max(lib_times):.2f} s (target < 5 s at 50,000)")
    print(f"  reconciler sync (CLI process): median {statistics.median(cli_times):.2f} s, "
          f"min {min(cli_times):.2f} s, max {max(cli_times):.2f} s; peak RSS "
          f"{cli_peak / 1024:.0f} MB (target < 1 GB)")
    print(f"  no-op re-sync: median {statistics.median(noop_times):.2f} s")
    print(f"  graph blob: {blob} bytes compressed ({blob / 1024:.0f} KiB; "
          f"{f'{parts} parts' if parts else 'one etcd value'}); since-map: {since_bytes} bytes")
    print(f"  graph blob sha256: {blob_sha}")


if __name__ == "__main__":
    main()
