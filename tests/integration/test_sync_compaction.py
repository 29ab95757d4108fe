"""A compaction during a sync (real etcd): etcd compacts its history between the sync's
read of the head and its transaction, or between the parts of a split graph and the head.
The sync's guard compares the head's mod revision, which a compaction keeps (it drops old
versions, never a key's current one), so the sync either lands whole or re-reads and
re-decides; nothing partial is left, and every reader (history, the graph) reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from reconciler.adapters.store import EtcdStore, codec
from reconciler.cli import main
from reconciler.core.settings import EtcdSettings
from reconciler.service.sync import Status, read_since, read_synced_graph, sync
from tests.helpers import example_repo, git


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings)
    yield s
    s.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return example_repo(tmp_path / "repo")


def add_pipeline(repo: Path, dag_id: str, upstream: str) -> str:
    (repo / "pipelines" / f"{dag_id}.yaml").write_text(
        f"dag_id: {dag_id}\nowner: t\ndepends_on: [{upstream}]\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", f"add {dag_id}")
    return git(repo, "rev-parse", "HEAD")


def compact_now(store: EtcdStore) -> int:
    """Compact etcd up to its current revision (physically: the old versions are gone)."""
    revision = store.revision()
    try:
        store.client.compact(revision, physical=True)
    except grpc.RpcError as exc:  # nothing written since the last compaction
        assert "compacted" in str(exc.details())  # noqa: PT017
    return revision


def keys(store: EtcdStore) -> list[str]:
    return sorted(k[len(store.root):] for k, _ in store.get_prefix(store.root, keys_only=True))


def before(store: EtcdStore, name: str, hook: Callable[[], None],
           monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """Run `hook` before the first `times` calls of `store.<name>`; the calls counted."""
    original = getattr(store, name)
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            hook()
        return original(*args, **kwargs)

    monkeypatch.setattr(store, name, wrapped)
    return calls


def assert_whole(store: EtcdStore, commit: str, seq: int, settings: EtcdSettings) -> None:
    head, _ = store.read_head()
    assert head is not None
    assert (head.commit, head.seq) == (commit, seq)
    assert [h.seq for h in store.read_history()] == list(range(seq, 0, -1))
    assert store.corrupt_values() == []
    synced, graph = read_synced_graph(store)
    assert synced == commit
    assert set(read_since(store, commit)) == set(graph.pipelines)
    result = CliRunner().invoke(main, ["history"], env={
        "RECONCILER_ETCD_ENDPOINTS": ",".join(settings.endpoints),
        "RECONCILER_ETCD_PREFIX": settings.prefix, "RECONCILER_NAMESPACE": settings.namespace})
    assert result.exit_code == 0, result.output
    assert commit[:12] in result.output.splitlines()[0]


def test_a_compaction_between_the_read_and_the_transaction_leaves_the_sync_whole(
        store: EtcdStore, repo: Path, etcd_settings: EtcdSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = git(repo, "rev-parse", "HEAD")
    assert sync(repo, "HEAD", "pipelines", store, source="t",
                now=datetime.now(UTC) - timedelta(days=1)).ok
    second = add_pipeline(repo, "08_pipeline", "07_pipeline")
    compacted: list[int] = []
    calls = before(store, "write_sync", lambda: compacted.append(compact_now(store)),
                   monkeypatch)
    result = sync(repo, "HEAD", "pipelines", store, source="t")
    assert compacted
    assert calls[0] == 1  # one transaction: the compaction did not make it conflict
    assert result.status is Status.SYNCED
    assert result.attempts == 1
    assert_whole(store, second, 2, etcd_settings)
    assert keys(store) == sorted([
        "desired/head", f"desired/graphs/{first}", f"desired/graphs/{second}",
        f"desired/since/{first}", f"desired/since/{second}",
        "desired/history/0000000001", "desired/history/0000000002"])


def test_a_compaction_and_a_rival_sync_between_the_read_and_the_transaction(
        store: EtcdStore, repo: Path, etcd_settings: EtcdSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another sync of the same commit lands, then etcd compacts: this sync's guard fails,
    it reads the head again and finds its commit synced (a no-op): one history entry."""
    second = add_pipeline(repo, "08_pipeline", "07_pipeline")
    rival = EtcdStore(etcd_settings)

    def rival_then_compact() -> None:
        assert sync(repo, "HEAD", "pipelines", rival, source="rival").ok
        compact_now(store)

    try:
        calls = before(store, "write_sync", rival_then_compact, monkeypatch)
        result = sync(repo, "HEAD", "pipelines", store, source="t")
    finally:
        rival.close()
    assert calls[0] == 1
    assert result.status is Status.NOOP
    assert result.attempts == 2
    assert_whole(store, second, 1, etcd_settings)
    head, _ = store.read_head()
    assert head is not None
    assert head.source == "rival"


def test_a_compaction_between_the_parts_and_the_head_of_a_split_graph(
        store: EtcdStore, repo: Path, etcd_settings: EtcdSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph written in parts first (they do not fit beside the head in one request),
    then the head: etcd compacts after the first part. The head's transaction checks every
    part exists, so it lands whole, and the parts join to the graph."""
    store.part_bytes = 256
    monkeypatch.setattr(codec, "MAX_REQUEST_BYTES", 4096 + 1500)  # the parts go first
    compactions = before(store, "_guarded_head", lambda: compact_now(store), monkeypatch)
    original_put = store.put
    parts: list[str] = []

    def put_then_compact(key: str, value: bytes, **kwargs: Any) -> None:
        original_put(key, value, **kwargs)
        if "/desired/graphs/" in key:
            parts.append(key)
            compact_now(store)

    monkeypatch.setattr(store, "put", put_then_compact)
    result = sync(repo, "HEAD", "pipelines", store, source="t")
    assert result.status is Status.SYNCED, result.message
    assert compactions[0] == 1
    head, _ = store.read_head()
    assert head is not None
    assert head.graph_parts > 1
    assert len(parts) == head.graph_parts  # each part was its own put, before the head
    assert_whole(store, head.commit, 1, etcd_settings)
