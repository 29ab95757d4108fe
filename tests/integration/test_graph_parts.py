"""A graph over one etcd value, split across part keys, against a real etcd.

The store splits a blob over `part_bytes` into `desired/graphs/<commit>/<n>` and keeps a
manifest at `desired/graphs/<commit>`; the head names the parts. These tests sync graphs
that need parts (one far over etcd's 1.5 MiB request limit, with the default part size),
read them back as `graph`, `history` and the loop do, tear one, and re-sync.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.store import (
    MAX_REQUEST_BYTES,
    PARTS_MAGIC,
    EtcdStore,
    HeadRecord,
    StoreCorrupt,
)
from reconciler.core.graph import Graph
from reconciler.core.settings import EtcdSettings, LoopSettings
from reconciler.service.observer import Observer
from reconciler.service.sync import Status, read_since, read_synced_graph, sync
from tests.helpers import namespace_writes
from tests.integration.test_sync import GitRepo

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def repo(tmp_path):  # type: ignore[no-untyped-def]
    return GitRepo(tmp_path / "repo")


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[EtcdStore]:
    with EtcdStore(etcd_settings) as s:
        yield s


def noisy_graph(count: int, noise_chars: int, seed: int = 5) -> dict[str, str | None]:
    """`count` pipelines in a chain, each with `noise_chars` of random hex in its conf:
    hex compresses to about half, so the blob is about count * noise_chars / 2 bytes."""
    rng = random.Random(seed)
    files: dict[str, str | None] = {}
    for i in range(count):
        noise = "".join(rng.choice("0123456789abcdef") for _ in range(noise_chars))
        text = f"dag_id: p{i:03d}\nowner: t\nconf: {{noise: '{noise}'}}\n"
        if i:
            text += f"depends_on: [p{i - 1:03d}]\n"
        files[f"pipelines/p{i:03d}.yaml"] = text
    return files


def do_sync(repo: GitRepo, store: EtcdStore, rev: str = "HEAD", *, force: bool = False):  # type: ignore[no-untyped-def]
    return sync(repo.path, rev, "pipelines", store, force=force, source="test", now=T0)


def part_keys(store: EtcdStore, commit: str) -> list[str]:
    prefix = store.graph_key(commit) + "/"
    return [k for k, _ in store.get_prefix(prefix, keys_only=True)]


def observer(store: EtcdStore) -> Observer:
    # load_desired reads only etcd: no Airflow behind this observer.
    return Observer(store, None, LoopSettings(), SystemClock())  # type: ignore[arg-type]


def test_a_graph_over_one_etcd_value_round_trips(repo: GitRepo, store: EtcdStore) -> None:
    sha = repo.commit(noisy_graph(60, 60_000))  # about 1.8 MB compressed
    result = do_sync(repo, store)
    assert result.status is Status.SYNCED, result.message
    assert result.blob_bytes > MAX_REQUEST_BYTES  # more than etcd takes in one request
    head, _ = store.read_head()
    assert head is not None
    assert head.commit == sha
    parts = part_keys(store, sha)
    assert head.graph_parts == len(parts) >= 2
    assert head.graph_blob_digest.startswith("sha256:")
    assert head.to_dict()["graph_parts"] == len(parts)  # the head names its parts
    manifest = store.get(store.graph_key(sha)).value
    assert manifest is not None
    assert manifest.startswith(PARTS_MAGIC)
    commit, graph = read_synced_graph(store)
    assert commit == sha
    assert len(graph) == 60
    assert graph.digest() == head.graph_digest
    assert graph.upstreams("p059") == ("p058",)
    assert read_synced_graph(store, sha[:10])[1] == graph  # by a prefix, as `graph` does
    assert store.synced_commits(sha[:8]) == [sha]  # the parts are not listed as commits
    assert store.read_history()[0] == head
    desired = observer(store).load_desired()
    assert desired is not None
    assert desired.commit == sha
    assert desired.graph == graph
    assert set(read_since(store, sha)) == set(graph.pipelines)


def test_small_parts_are_written_with_the_head_in_one_transaction(
        repo: GitRepo, store: EtcdStore) -> None:
    store.part_bytes = 4096
    sha = repo.commit(noisy_graph(20, 2_000))  # about 20 KB: 5 or 6 parts
    before = store.writes
    assert do_sync(repo, store).status is Status.SYNCED
    assert store.writes - before == 1  # parts, manifest, head, history, since: one txn
    parts = part_keys(store, sha)
    assert len(parts) >= 4
    revisions = {store.get(k).mod_revision for k in [*parts, store.head_key()]}
    assert len(revisions) == 1  # the same transaction
    assert read_synced_graph(store)[1].digest() == store.read_head()[0].graph_digest  # type: ignore[union-attr]


def test_a_torn_write_is_corrupt_stored_data_not_a_crash(repo: GitRepo,
                                                          store: EtcdStore) -> None:
    store.part_bytes = 4096
    sha = repo.commit(noisy_graph(20, 2_000))
    assert do_sync(repo, store).status is Status.SYNCED
    missing = part_keys(store, sha)[2]
    store.delete_prefix(missing)  # as if the write of that part never happened
    with pytest.raises(StoreCorrupt, match="missing") as caught:
        read_synced_graph(store)
    assert caught.value.key == missing
    watcher = observer(store)
    assert watcher.load_desired() is None  # nothing good to fall back on: no graph
    assert missing in watcher.quarantined  # one log line naming the key, no exception
    # A re-sync of the same commit is still a no-op for the head, and rewrites the part.
    head_revision = store.read_head()[1]
    result = do_sync(repo, store)
    assert result.status is Status.NOOP
    assert "rewrote 1 missing part" in result.message
    assert store.read_head()[1] == head_revision
    assert read_synced_graph(store)[0] == sha


def test_mixed_parts_fail_the_digest(repo: GitRepo, store: EtcdStore) -> None:
    store.part_bytes = 4096
    sha = repo.commit(noisy_graph(20, 2_000))
    assert do_sync(repo, store).status is Status.SYNCED
    first = part_keys(store, sha)[0]
    store.put(first, b"\x1f\x8b" + b"0" * 4094)  # a part of some other blob
    with pytest.raises(StoreCorrupt, match="not the blob the manifest names"):
        read_synced_graph(store)


def test_a_resync_of_the_same_commit_writes_nothing(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(noisy_graph(60, 60_000))
    assert do_sync(repo, store).status is Status.SYNCED
    revision = namespace_writes(store)
    result = do_sync(repo, store)
    assert result.status is Status.NOOP
    assert "rewrote" not in result.message
    assert namespace_writes(store) == revision


def test_a_rollback_reuses_the_parts_and_the_head_names_them(repo: GitRepo,
                                                              store: EtcdStore) -> None:
    store.part_bytes = 4096
    c1 = repo.commit(noisy_graph(20, 2_000))
    assert do_sync(repo, store).status is Status.SYNCED
    first_head = store.read_head()[0]
    assert first_head is not None
    revisions = [store.get(k).mod_revision for k in part_keys(store, c1)]
    c2 = repo.commit(noisy_graph(21, 2_000, seed=6))
    assert do_sync(repo, store).status is Status.SYNCED
    assert store.read_head()[0].commit == c2  # type: ignore[union-attr]
    result = do_sync(repo, store, c1, force=True)
    assert result.status is Status.SYNCED
    head = store.read_head()[0]
    assert head is not None
    assert head.commit == c1
    assert head.forced
    assert (head.graph_parts, head.graph_blob_digest) == (first_head.graph_parts,
                                                          first_head.graph_blob_digest)
    assert [store.get(k).mod_revision for k in part_keys(store, c1)] == revisions
    assert read_synced_graph(store)[0] == c1


def test_a_graph_of_one_value_is_stored_as_before(repo: GitRepo, store: EtcdStore) -> None:
    sha = repo.commit(noisy_graph(3, 100))
    assert do_sync(repo, store).status is Status.SYNCED
    assert part_keys(store, sha) == []
    blob = store.get(store.graph_key(sha)).value
    assert blob is not None
    assert blob[:2] == b"\x1f\x8b"
    head = store.read_head()[0]
    assert head is not None
    assert "graph_parts" not in head.to_dict()
    assert Graph.from_compressed(blob) == read_synced_graph(store)[1]


def test_an_old_single_value_graph_is_still_read(store: EtcdStore, repo: GitRepo) -> None:
    # What an older reconciler wrote: one value, a head without the parts fields.
    sha = repo.commit(noisy_graph(4, 100))
    graph = Graph.from_compressed(_compressed_of(repo, sha))
    head = HeadRecord(commit=sha, graph_digest=graph.digest(), synced_at=T0, source="old")
    store.write_sync(head, 0, graph.compressed(), dict.fromkeys(graph.pipelines, T0))
    assert read_synced_graph(store) == (sha, graph)
    assert do_sync(repo, store).status is Status.NOOP
    desired = observer(store).load_desired()
    assert desired is not None
    assert desired.graph == graph
    assert desired.since == dict.fromkeys(graph.pipelines, T0)
    assert store.read_history() == [head]


def _compressed_of(repo: GitRepo, sha: str) -> bytes:
    """The graph blob of `sha` as sync builds it."""
    from reconciler.adapters.sources import open_repo, read_tree, resolve_commit
    from reconciler.core.checks import check_files

    git_repo = open_repo(repo.path)
    checked = check_files(read_tree(git_repo, resolve_commit(git_repo, sha), "pipelines"))
    assert checked.graph is not None
    return checked.graph.compressed()
