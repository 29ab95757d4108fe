"""Small helpers shared by the test tiers and the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline",
                "05_pipeline", "06_pipeline", "07_pipeline"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def example_repo(path: Path) -> Path:
    """A new git repository at `path` whose one commit holds the shipped example graph."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "test")
    shutil.copytree(REPO / "pipelines", path / "pipelines")
    git(path, "add", ".")
    git(path, "commit", "-qm", "example graph")
    return path


def namespace_writes(store: Any) -> list[tuple[str, int]]:
    """Every key of the store's namespace with the revision it was last written at: what a
    "writes nothing" assertion compares. Not the cluster's revision: the session's Airflow
    servers (their listener plugins) write to other namespaces of the same etcd at any
    moment, which moves it."""
    response = store.client.get_prefix_response(store.root, sort_order="ascend",
                                                sort_target="key")
    return [(kv.key.decode(), int(kv.mod_revision)) for kv in response.kvs]
