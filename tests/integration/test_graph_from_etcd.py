"""`reconciler graph --from-etcd` reads back exactly what `sync` wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reconciler.core.settings import EtcdSettings
from tests.helpers import example_repo

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path, etcd: EtcdSettings) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RECONCILER_ETCD_ENDPOINTS=",".join(etcd.endpoints),
               RECONCILER_ETCD_PREFIX=etcd.prefix, RECONCILER_NAMESPACE=etcd.namespace)
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_graph_from_etcd_matches_the_synced_commit(tmp_path: Path,
                                                   etcd_settings: EtcdSettings) -> None:
    example_repo(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout.strip()
    missing = cli("graph", "--from-etcd", cwd=tmp_path, etcd=etcd_settings)
    assert missing.returncode == 1
    assert "reconciler sync" in missing.stderr
    assert cli("sync", cwd=tmp_path, etcd=etcd_settings).returncode == 0
    from_etcd = cli("graph", "--from-etcd", "--format", "json", cwd=tmp_path,
                    etcd=etcd_settings)
    assert from_etcd.returncode == 0, from_etcd.stderr
    local = cli("graph", "--rev", "HEAD", "--format", "json", cwd=tmp_path, etcd=etcd_settings)
    assert json.loads(from_etcd.stdout) == json.loads(local.stdout)
    assert json.loads(from_etcd.stdout)["commit"] == head
    by_prefix = cli("graph", "--from-etcd", "--rev", head[:10], cwd=tmp_path,
                    etcd=etcd_settings)
    assert by_prefix.stdout == cli("graph", cwd=tmp_path, etcd=etcd_settings).stdout
