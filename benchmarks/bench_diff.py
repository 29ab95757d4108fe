"""`reconciler diff` on a deep chain, against `reconciler validate` of the same graph.

A chain of N pipelines (3,000 by default; each depends on the one before) gains a new
root upstream of its first pipeline, so every pipeline of the chain is affected. The
diff computes each side's transitive upstream sets once (bitsets in topological order);
before, it walked the ancestors of every pipeline (quadratic: 6x a validate at 3,000).
Also prints the markdown's size in full (for the job summary) and capped for a PR comment.
Usage: python benchmarks/bench_diff.py [--depth N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def git(repo: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def write_chain(folder: Path, depth: int, *, new_root: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(depth):
        ups = [f"c{i - 1:05d}"] if i else (["new_root"] if new_root else [])
        text = f"dag_id: c{i:05d}\nowner: t\n"
        if ups:
            text += f"depends_on: [{', '.join(ups)}]\n"
        (folder / f"c{i:05d}.yaml").write_text(text)
    if new_root:
        (folder / "new_root.yaml").write_text("dag_id: new_root\nowner: t\n")


def timed(*args: str, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"reconciler {args[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-diff-") as tmp:
        repo = Path(tmp)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.name", "Bench")
        git(repo, "config", "user.email", "bench@example.invalid")
        write_chain(repo / "pipelines", args.depth, new_root=False)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "chain")
        write_chain(repo / "pipelines", args.depth, new_root=True)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "new root")
        validate_times, diff_times = [], []
        for _ in range(args.repeat):
            validate_times.append(timed("validate", "pipelines", cwd=repo)[0])
            elapsed, full = timed("diff", "--base", "HEAD~1", cwd=repo)
            diff_times.append(elapsed)
        _, capped = timed("diff", "--base", "HEAD~1", "--max-chars", "60000", cwd=repo)
    v, d = statistics.median(validate_times), statistics.median(diff_times)
    print(f"diff of a {args.depth}-deep chain gaining a root (every pipeline affected)")
    print(f"  validate: median {v:.2f} s; diff (reads and checks both commits): median "
          f"{d:.2f} s = {d / v:.1f}x a validate (was 6x)")
    print(f"  markdown: {len(full):,} characters in full (job summary), {len(capped):,} "
          "capped with --max-chars 60000 (PR comment, limit 65,536)")


if __name__ == "__main__":
    main()
