"""reconciler.service.sync against a real etcd and real git repositories.

Also home of the small git helpers the CLI tests import (`GitRepo`, `pipeline`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters.sources import SourceError
from reconciler.adapters.store import EtcdStore, HeadRecord, StoreConflict, StoreNotFound
from reconciler.core.settings import EtcdSettings
from reconciler.service.sync import (
    Reason,
    Status,
    read_history,
    read_since,
    read_synced_graph,
    sync,
)
from tests.helpers import namespace_writes

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def pipeline(dag_id: str, *upstreams: str, owner: str = "t") -> str:
    text = f"dag_id: {dag_id}\nowner: {owner}\n"
    if upstreams:
        text += f"depends_on: [{', '.join(upstreams)}]\n"
    return text


class GitRepo:
    """A throw-away repository driven with the git CLI (its own identity, no global config)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Test")
        self.git("config", "user.email", "test@example.invalid")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
        proc = subprocess.run(["git", "-C", str(self.path), *args], check=True,
                              capture_output=True, text=True, env=env, timeout=60)
        return proc.stdout.strip()

    def write(self, files: dict[str, str | None]) -> None:
        """Write (or with None, delete) files, paths relative to the repository."""
        for name, text in files.items():
            path = self.path / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        self.write(files)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


def pipelines(*specs: tuple[str, ...]) -> dict[str, str | None]:
    """('b', 'a') -> {'pipelines/b.yaml': 'dag_id: b ... depends_on: [a]'}."""
    return {f"pipelines/{s[0]}.yaml": pipeline(*s) for s in specs}


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[EtcdStore]:
    with EtcdStore(etcd_settings) as s:
        yield s


def do_sync(repo: GitRepo, store: EtcdStore, rev: str = "HEAD", *, force: bool = False,
            now: datetime = T0, subdir: str = "pipelines"):  # type: ignore[no-untyped-def]
    return sync(repo.path, rev, subdir, store, force=force, source="test", now=now)


def test_first_sync_writes_graph_head_since_and_history(repo: GitRepo, store: EtcdStore
                                                        ) -> None:
    c1 = repo.commit(pipelines(("a",), ("b", "a")))
    result = do_sync(repo, store)
    assert (result.status, result.reason, result.commit) == (Status.SYNCED, Reason.FIRST, c1)
    head, revision = store.read_head()
    assert head is not None
    assert revision > 0
    assert (head.commit, head.previous, head.forced, head.seq, head.source) == (
        c1, None, False, 1, "test")
    commit, graph = read_synced_graph(store, None)
    assert commit == c1
    assert sorted(graph.pipelines) == ["a", "b"]
    assert graph.upstreams("b") == ("a",)
    assert head.graph_digest == graph.digest()
    assert read_since(store, c1) == {"a": T0, "b": T0}
    assert [h.commit for h in read_history(store)] == [c1]


def test_fast_forward_chains_previous_and_carries_since(repo: GitRepo, store: EtcdStore
                                                        ) -> None:
    c1 = repo.commit(pipelines(("a",), ("b", "a")))
    do_sync(repo, store)
    c2 = repo.commit(pipelines(("c", "a", "b")))
    t1 = T0 + timedelta(hours=1)
    result = do_sync(repo, store, now=t1)
    assert (result.status, result.reason) == (Status.SYNCED, Reason.FAST_FORWARD)
    head, _ = store.read_head()
    assert head is not None
    assert (head.commit, head.previous, head.seq, head.forced) == (c2, c1, 2, False)
    assert read_since(store, c2) == {"a": T0, "b": T0, "c": t1}
    # Every synced commit's graph stays readable.
    assert sorted(read_synced_graph(store, c1)[1].pipelines) == ["a", "b"]
    assert sorted(read_synced_graph(store, c2[:10])[1].pipelines) == ["a", "b", "c"]


def test_resync_of_the_head_is_a_noop_that_writes_nothing(repo: GitRepo, store: EtcdStore
                                                          ) -> None:
    repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    _, head_revision = store.read_head()
    written = namespace_writes(store)
    result = do_sync(repo, store, now=T0 + timedelta(days=1))
    assert (result.status, result.reason, result.ok) == (Status.NOOP, Reason.SAME_COMMIT, True)
    assert store.read_head()[1] == head_revision
    assert namespace_writes(store) == written
    # --force on the same commit with the same graph is still a no-op.
    assert do_sync(repo, store, force=True).status is Status.NOOP
    assert namespace_writes(store) == written


def test_an_older_commit_is_refused_and_etcd_is_unchanged(repo: GitRepo, store: EtcdStore
                                                          ) -> None:
    c1 = repo.commit(pipelines(("a",)))
    c2 = repo.commit(pipelines(("b", "a")))
    do_sync(repo, store)
    before = namespace_writes(store)
    result = do_sync(repo, store, c1)
    assert (result.status, result.reason, result.ok) == (
        Status.REFUSED, Reason.NOT_FAST_FORWARD, False)
    assert "older than the synced head" in result.message
    assert "--force" in result.message
    assert namespace_writes(store) == before
    head, _ = store.read_head()
    assert head is not None
    assert head.commit == c2


def test_force_rolls_back_and_history_records_it(repo: GitRepo, store: EtcdStore) -> None:
    c1 = repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    c2 = repo.commit(pipelines(("b", "a")))
    t1, t2 = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    do_sync(repo, store, now=t1)
    blob_revision = store.get(store.graph_key(c1)).mod_revision
    result = do_sync(repo, store, c1, force=True, now=t2)
    assert (result.status, result.reason) == (Status.SYNCED, Reason.FORCED)
    assert "rollback" in result.message
    history = read_history(store)
    assert [(h.commit, h.previous, h.forced, h.seq) for h in history] == [
        (c1, c2, True, 3), (c2, c1, False, 2), (c1, None, False, 1)]
    commit, graph = read_synced_graph(store, None)
    assert (commit, sorted(graph.pipelines)) == (c1, ["a"])
    # The blob of c1 is immutable: the rollback reused it instead of writing it again.
    assert store.get(store.graph_key(c1)).mod_revision == blob_revision
    # `a` was in the previous head since T0; nothing new appeared.
    assert read_since(store, c1) == {"a": T0}
    # After the rollback, the newer commit is a fast-forward again.
    assert do_sync(repo, store, c2, now=t2).reason is Reason.FAST_FORWARD
    assert read_since(store, c2) == {"a": T0, "b": t2}


def test_an_invalid_commit_writes_nothing(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    before = namespace_writes(store)
    bad = repo.commit({"pipelines/b.yaml": pipeline("b", "missing"),
                       "pipelines/c.yaml": "dag_id: [\n"})
    result = do_sync(repo, store)
    assert (result.status, result.reason, result.commit) == (Status.REFUSED, Reason.INVALID, bad)
    shown = [str(p) for p in result.problems]
    assert any(s.startswith("pipelines/b.yaml:3:") and "missing" in s for s in shown)
    assert any(s.startswith("pipelines/c.yaml:") for s in shown)
    assert namespace_writes(store) == before


def test_an_invalid_first_commit_writes_nothing(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a", "a")))
    before = namespace_writes(store)
    assert do_sync(repo, store).reason is Reason.INVALID
    assert namespace_writes(store) == before
    assert store.read_head() == (None, 0)


def test_uncommitted_files_are_never_synced(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",), ("b", "a")))
    # Working-tree changes: a new file, a modified file, a deleted file, a staged file.
    repo.write({"pipelines/new.yaml": pipeline("new", "a"),
                "pipelines/b.yaml": pipeline("b", "a", owner="someone-else"),
                "pipelines/a.yaml": None, "pipelines/staged.yaml": pipeline("staged")})
    repo.git("add", "pipelines/staged.yaml")
    do_sync(repo, store)
    _, graph = read_synced_graph(store, None)
    assert sorted(graph.pipelines) == ["a", "b"]
    assert graph["b"].owner == "t"


def test_a_diverged_commit_is_refused_unless_forced(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",)))
    repo.git("checkout", "-q", "-b", "other")
    side = repo.commit(pipelines(("side", "a")))
    repo.git("checkout", "-q", "main")
    main = repo.commit(pipelines(("b", "a")))
    do_sync(repo, store, main)
    result = do_sync(repo, store, side)
    assert result.reason is Reason.NOT_FAST_FORWARD
    assert "does not descend from the synced head" in result.message
    forced = do_sync(repo, store, side, force=True)
    assert (forced.reason, forced.head and forced.head.previous) == (Reason.FORCED, main)


def test_a_head_unknown_to_the_local_repo_is_refused(tmp_path: Path, store: EtcdStore) -> None:
    one, two = GitRepo(tmp_path / "one"), GitRepo(tmp_path / "two")
    one.commit(pipelines(("a",)))
    two.commit(pipelines(("b",)))
    do_sync(one, store)
    result = do_sync(two, store)
    assert result.reason is Reason.UNKNOWN_HEAD
    assert "not in this repository" in result.message
    assert "fetch" in result.message
    assert do_sync(two, store, force=True).reason is Reason.FORCED


def test_same_commit_with_a_different_graph_is_refused_unless_forced(
        repo: GitRepo, store: EtcdStore) -> None:
    c1 = repo.commit({**pipelines(("a",)), "other/x.yaml": pipeline("x")})
    do_sync(repo, store)
    result = do_sync(repo, store, subdir="other")
    assert result.reason is Reason.DIGEST_MISMATCH
    forced = do_sync(repo, store, subdir="other", force=True)
    assert forced.reason is Reason.FORCED
    assert sorted(read_synced_graph(store, c1)[1].pipelines) == ["x"]


class RacingStore(EtcdStore):
    """A real store whose first write_sync is preceded by another sync (a real write).

    This puts a competing sync exactly between our read of the head and our transaction,
    the window that two processes racing hit by chance.
    """

    def __init__(self, settings: EtcdSettings, rival: GitRepo, rival_rev: str) -> None:
        super().__init__(settings)
        self.rival, self.rival_rev, self.raced = rival, rival_rev, False

    def write_sync(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.raced:
            self.raced = True
            with EtcdStore(self.settings) as other:
                assert do_sync(self.rival, other, self.rival_rev).ok
        return super().write_sync(*args, **kwargs)


@pytest.mark.parametrize(("ours", "theirs", "reason", "final"), [
    ("c2", "c2", Reason.SAME_COMMIT, "c2"),  # both sync the same commit: we no-op
    ("c3", "c2", Reason.FAST_FORWARD, "c3"),  # they sync our parent: we fast-forward over it
    ("c2", "c3", Reason.NOT_FAST_FORWARD, "c3"),  # they sync a newer commit: we never undo it
])
def test_a_lost_race_rereads_and_redecides(repo: GitRepo, etcd_settings: EtcdSettings,
                                           ours: str, theirs: str, reason: Reason, final: str
                                           ) -> None:
    commits = {"c1": repo.commit(pipelines(("a",)))}
    with EtcdStore(etcd_settings) as plain:
        do_sync(repo, plain)
    commits["c2"] = repo.commit(pipelines(("b", "a")))
    commits["c3"] = repo.commit(pipelines(("c", "b")))
    with RacingStore(etcd_settings, repo, commits[theirs]) as racing:
        result = do_sync(repo, racing, commits[ours])
        assert racing.raced
        assert (result.reason, result.attempts) == (reason, 2)
        head, _ = racing.read_head()
        assert head is not None
        assert head.commit == commits[final]
        # The history is one chain: each entry's previous is the entry before it.
        history = racing.read_history()
        assert [h.previous for h in history[:-1]] == [h.commit for h in history[1:]]
        assert [h.seq for h in history] == list(range(len(history), 0, -1))


def test_a_store_that_never_stops_racing_gives_up(repo: GitRepo, etcd_settings: EtcdSettings
                                                  ) -> None:
    repo.commit(pipelines(("a",)))

    class AlwaysLosing(EtcdStore):
        def write_sync(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise StoreConflict("lost")

    with AlwaysLosing(etcd_settings) as store, pytest.raises(StoreConflict, match="3 attempts"):
        sync(repo.path, "HEAD", "pipelines", store, source="t", max_attempts=3)


def test_read_synced_graph_errors(repo: GitRepo, store: EtcdStore,
                                  etcd_settings: EtcdSettings) -> None:
    with pytest.raises(StoreNotFound, match="nothing has been synced"):
        read_synced_graph(etcd_settings, None)
    c1 = repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    with pytest.raises(StoreNotFound, match="never been synced"):
        read_synced_graph(etcd_settings, "0" * 40)
    # By settings too (the `graph --from-etcd` path opens and closes its own store).
    assert read_synced_graph(etcd_settings, c1[:7])[0] == c1
    assert isinstance(store.read_head()[0], HeadRecord)


def test_ten_thousand_pipelines_sync(tmp_path: Path, store: EtcdStore) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from synthetic import layered_graph, write_pipelines

    repo = GitRepo(tmp_path / "big")
    write_pipelines(repo.path / "pipelines", layered_graph(10_000))
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "10k")
    result = do_sync(repo, store)
    assert (result.status, result.pipelines) == (Status.SYNCED, 10_000)
    assert len(read_synced_graph(store, None)[1]) == 10_000
    assert len(read_since(store, result.commit)) == 10_000


def test_sync_reads_the_tree_by_the_one_reading_rule(repo: GitRepo) -> None:
    from reconciler.adapters import sources
    from reconciler.service import sync as sync_module

    assert sync_module.read_tree is sources.read_tree  # the same reader as graph/diff --rev
    repo.commit({
        **pipelines(("a",), ("b", "a")),
        "pipelines/team/c.yml": pipeline("c"),
        "pipelines/.hidden.yaml": pipeline("hidden"),
        "pipelines/.dir/d.yaml": pipeline("d"),
        "pipelines/notes.txt": "not a pipeline\n",
        "pipelines/empty.yaml": "",
        "pipelines/big.yaml": "# " + "x" * 70_000 + "\n",
        "pipelines/ünïcode.yaml": pipeline("u"),
        "pipelines/upper.YAML": pipeline("upper"),
        "other/e.yaml": pipeline("e"),
        "pipelines_file": "x\n",
    })
    (repo.path / "pipelines" / "link.yaml").symlink_to("a.yaml")
    head = repo.commit({})
    git_repo = sources.open_repo(repo.path)
    commit = git_repo.commit(head)
    files = sources.read_tree(git_repo, commit, "pipelines")
    assert [(f.path, f.problem.code if f.problem else None) for f in files] == [
        ("pipelines/a.yaml", None), ("pipelines/b.yaml", None), ("pipelines/big.yaml", None),
        ("pipelines/empty.yaml", None), ("pipelines/link.yaml", "symlink"),
        ("pipelines/team/c.yml", None), ("pipelines/upper.YAML", "file-extension"),
        ("pipelines/ünïcode.yaml", None)]
    big = next(f for f in files if f.path.endswith("big.yaml"))
    assert (big.data, big.size) == (b"", 70_003)  # not read at all; its real size is kept
    for subdir in ("pipelines", "pipelines/", "./pipelines"):
        assert sources.read_tree(git_repo, commit, subdir) == files
    assert len(sources.read_tree(git_repo, commit, ".")) == len(files) + 1  # + other/e.yaml
    assert sources.read_tree(git_repo, commit, "") == sources.read_tree(git_repo, commit, ".")
    with pytest.raises(SourceError, match="not a directory"):
        sources.read_tree(git_repo, commit, "pipelines_file")
    with pytest.raises(sources.PathNotFound, match="missing is not in commit"):
        sources.read_tree(git_repo, commit, "missing")


def test_an_empty_graph_is_refused_unless_allowed(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",), ("b", "a")))
    do_sync(repo, store)
    before = namespace_writes(store)
    # Every pipeline file removed (a README stays): the whole graph would be gone.
    empty = repo.commit({"pipelines/a.yaml": None, "pipelines/b.yaml": None,
                         "pipelines/README.md": "moved elsewhere\n"})
    result = do_sync(repo, store)
    assert (result.status, result.reason, result.ok) == (Status.REFUSED, Reason.EMPTY, False)
    assert "holds no pipeline file" in result.message
    assert "--allow-empty" in result.message
    assert namespace_writes(store) == before
    allowed = sync(repo.path, "HEAD", "pipelines", store, source="test", now=T0,
                   allow_empty=True)
    assert (allowed.status, allowed.commit, allowed.pipelines) == (Status.SYNCED, empty, 0)


def test_a_missing_path_is_refused_unless_allowed(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    before = namespace_writes(store)
    result = do_sync(repo, store, subdir="pipeline")  # a typo of --path
    assert (result.status, result.reason) == (Status.REFUSED, Reason.MISSING_PATH)
    assert result.message.startswith("pipeline is not in commit ")
    assert namespace_writes(store) == before
    forced = sync(repo.path, "HEAD", "pipeline", store, source="test", now=T0,
                  allow_empty=True, force=True)
    assert (forced.status, forced.pipelines) == (Status.SYNCED, 0)


def test_credentials_in_the_source_are_never_stored(repo: GitRepo, store: EtcdStore) -> None:
    repo.commit(pipelines(("a",)))
    sync(repo.path, "HEAD", "pipelines", store, now=T0,
         source="pull:https://bot:hunter2@git.example.com/graphs.git@main")
    head, _ = store.read_head()
    assert head is not None
    assert head.source == "pull:https://git.example.com/graphs.git@main"
    assert all(b"hunter2" not in value for _, value in store.get_prefix(store.root))


def test_a_shallow_ci_clone_is_told_to_fetch_the_history(tmp_path: Path, repo: GitRepo,
                                                         store: EtcdStore) -> None:
    repo.commit(pipelines(("a",)))
    do_sync(repo, store)
    c2 = repo.commit(pipelines(("b", "a")))
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo.path}", str(shallow)],
                   check=True, capture_output=True, timeout=60)
    result = sync(shallow, "HEAD", "pipelines", store, source="ci", now=T0)
    assert (result.reason, result.commit) == (Reason.UNKNOWN_HEAD, c2)
    assert "fetch-depth: 0" in result.message
    # With the history fetched it is a plain fast-forward.
    subprocess.run(["git", "-C", str(shallow), "fetch", "-q", "--unshallow"], check=True,
                   capture_output=True, timeout=60)
    assert sync(shallow, "HEAD", "pipelines", store, now=T0).reason is Reason.FAST_FORWARD
