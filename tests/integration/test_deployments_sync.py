"""Deployments through the sync, against a real etcd (issue 18, items 1, 2 and 4's diff).

Old etcd data (a head and a graph blob as written before deployments) still reads, and
re-syncing its commit with this code is a no-op (same bytes, same digest); a repository
with deployments syncs them into the same blob, which the listener plugin still reads; a
move keeps the pipeline's name, so what etcd keeps by name (the since-map here; the ledger
and the mirror likewise) carries over; an invalid deployment writes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.adapters.sources import read_directory
from reconciler.adapters.store import EtcdStore
from reconciler.core.checks import check_files
from reconciler.core.settings import EtcdSettings
from reconciler.plugin import reconciler_events as ev
from reconciler.service.sync import (
    Reason,
    Status,
    build_head,
    read_since,
    read_synced_graph,
    sync,
)
from tests.fixtures.etcd import EtcdServer
from tests.helpers import example_repo, namespace_writes
from tests.integration.test_plugin_gateway import plugin_config
from tests.integration.test_sync import T0, GitRepo

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden" / "example_graph_before_deployments.json"
TWO = REPO / "tests" / "data" / "valid" / "two_deployments"


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> EtcdStore:
    with EtcdStore(etcd_settings) as s:
        yield s  # type: ignore[misc]


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_old_etcd_data_still_reads_and_resyncing_its_commit_is_a_noop(
        store: EtcdStore, tmp_path: Path) -> None:
    repo = example_repo(tmp_path / "repo")
    sha = git(repo, "rev-parse", "HEAD")
    old_json = GOLDEN.read_bytes()  # the canonical graph as the code before wrote it
    digest = "sha256:" + hashlib.sha256(old_json).hexdigest()
    head = build_head(sha, digest, now=T0, source="older reconciler", previous=None,
                      forced=False)
    store.write_sync(head, 0, gzip.compress(old_json, mtime=0),
                     {"01_pipeline_init": T0}, split=True)
    commit, graph = read_synced_graph(store, None)
    assert commit == sha
    assert graph.deployments == {}
    assert graph.default_deployment == "default"
    expected = check_files(read_directory(REPO / "pipelines")).graph
    assert graph == expected
    _, revision = store.read_head()
    before = namespace_writes(store)
    result = sync(repo, "HEAD", "pipelines", store, source="test", now=T0 + timedelta(hours=1))
    assert (result.status, result.reason) == (Status.NOOP, Reason.SAME_COMMIT)
    assert store.read_head()[1] == revision
    assert namespace_writes(store) == before  # nothing written


def two_deployment_repo(path: Path) -> GitRepo:
    repo = GitRepo(path)
    shutil.copytree(TWO / "pipelines", path / "pipelines")
    shutil.copytree(TWO / "airflow-deployments", path / "airflow-deployments")
    repo.commit({}, "two deployments")
    return repo


def test_sync_writes_the_deployments_into_the_blob_and_the_plugin_still_reads_it(
        store: EtcdStore, etcd_server: EtcdServer, etcd_settings: EtcdSettings,
        tmp_path: Path) -> None:
    repo = two_deployment_repo(tmp_path / "repo")
    result = sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    assert (result.status, result.reason) == (Status.SYNCED, Reason.FIRST), result
    _, graph = read_synced_graph(store, None)
    assert sorted(graph.deployments) == ["af2", "af3"]
    assert graph.deployments["af2"].auth["password_env"] == "AF2_PASSWORD"
    assert graph.deployment_of("cleanup_af3") == "af3"
    assert graph["cleanup_af3"].dag_id == "cleanup"
    assert set(read_since(store, result.commit)) == set(graph.pipelines)
    config = plugin_config(etcd_settings, etcd_server)
    assert ev.graph_dag_ids(ev.Gateway(config), config.root) == set(graph.pipelines)


def test_a_move_keeps_the_name_so_what_etcd_keeps_by_name_carries_over(
        store: EtcdStore, tmp_path: Path) -> None:
    repo = two_deployment_repo(tmp_path / "repo")
    sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    c2 = repo.commit({"pipelines/extract.yaml": "dag_id: extract\nowner: t\n"
                      "deployment: af2\ndepends_on: [root]\n"}, "move extract to af2")
    t1 = T0 + timedelta(hours=3)
    result = sync(repo.path, "HEAD", "pipelines", store, source="test", now=t1)
    assert (result.status, result.reason) == (Status.SYNCED, Reason.FAST_FORWARD)
    _, graph = read_synced_graph(store, c2)
    assert graph.deployment_of("extract") == "af2"
    # First synced at T0 in af3, still T0 after the move: the backfill clock (and, keyed
    # by the same name, the ledger and the mirror) does not restart with a move.
    assert read_since(store, c2)["extract"] == T0
    diff = subprocess.run([sys.executable, "-m", "reconciler", "diff", "--repo", str(repo.path),
                           "--base", "HEAD~1", "-o", "text"],
                          capture_output=True, text=True, timeout=60)
    assert diff.returncode == 0, diff.stderr
    assert diff.stdout == "~ pipeline extract: moved from af3 to af2\n"


def test_a_commit_with_an_unknown_deployment_is_refused_and_writes_nothing(
        store: EtcdStore, tmp_path: Path) -> None:
    repo = two_deployment_repo(tmp_path / "repo")
    sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    before = namespace_writes(store)
    repo.commit({"pipelines/extract.yaml": "dag_id: extract\nowner: t\n"
                 "deployment: af4\ndepends_on: [root]\n"}, "typo")
    result = sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    assert (result.status, result.reason) == (Status.REFUSED, Reason.INVALID)
    assert [str(p) for p in result.problems] == [
        "pipelines/extract.yaml:3:13: deployment 'af4' is not declared; did you mean 'af3'?"]
    assert namespace_writes(store) == before


def test_a_deployments_folder_that_is_a_link_in_the_commit_is_exit_2_and_writes_nothing(
        store: EtcdStore, etcd_settings: EtcdSettings, tmp_path: Path) -> None:
    from reconciler.adapters.sources import SourceError

    repo = two_deployment_repo(tmp_path / "repo")
    sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    before = namespace_writes(store)
    shutil.move(repo.path / "airflow-deployments", repo.path / "elsewhere")
    (repo.path / "airflow-deployments").symlink_to("elsewhere")
    repo.commit({}, "deployments behind a link")
    with pytest.raises(SourceError, match="airflow-deployments is a symbolic link in commit"):
        sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    env = {"RECONCILER_ETCD_ENDPOINTS": ",".join(etcd_settings.endpoints),
           "RECONCILER_ETCD_PREFIX": etcd_settings.prefix,
           "RECONCILER_NAMESPACE": etcd_settings.namespace, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "reconciler", "sync", "--repo",
                           str(repo.path)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert namespace_writes(store) == before


def test_a_link_inside_the_deployments_folder_is_refused_and_writes_nothing(
        store: EtcdStore, tmp_path: Path) -> None:
    repo = two_deployment_repo(tmp_path / "repo")
    sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    before = namespace_writes(store)
    (repo.path / "airflow-deployments" / "af4.yaml").symlink_to("/etc/passwd")
    repo.commit({}, "a link")
    result = sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0)
    assert (result.status, result.reason) == (Status.REFUSED, Reason.INVALID)
    assert [(p.path, p.code) for p in result.problems] == [
        ("airflow-deployments/af4.yaml", "symlink")]
    assert "root:" not in str(result.problems[0])
    assert namespace_writes(store) == before
