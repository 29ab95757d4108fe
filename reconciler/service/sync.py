"""Sync a commit's graph into etcd (DESIGN section 4): decide, then write once.

The decision is pure (`decide`, `build_head`, `carry_since`): it takes the synced head,
how the new commit relates to it in git, and the flags, and returns what to do. `sync`
is the thin shell around it: read the commit's tree (never the working tree), validate
it with the same checks as `validate`, read the head with its mod revision, decide, and
write in one transaction guarded by that revision. When another sync wins the race the
transaction's comparison fails; `sync` re-reads and re-decides (a bounded number of
times), so it ends as a no-op, a fast-forward, or a refusal, and never overwrites a newer
head. A graph over one etcd value is split across part keys by the store (see
adapters/store/desired.py); the head names its parts.
"""

from __future__ import annotations

import enum
import gzip
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.adapters.sources import (
    PathNotFound,
    SourceError,
    open_repo,
    open_tree,
    read_tree,
    read_tree_deployments,
    resolve_commit,
)
from reconciler.adapters.store import (
    EtcdStore,
    HeadRecord,
    StoreConflict,
    StoreCorrupt,
    StoreNotFound,
    Unreadable,
)
from reconciler.core.checks import SourceFile, check_files
from reconciler.core.graph import Graph
from reconciler.core.problems import Problem, redact
from reconciler.core.settings import EtcdSettings

_SEGMENT = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}$")

__all__ = ["read_tree"]  # re-exported: the tree reader lives in adapters/sources.py

# Each retry follows a sync that moved the head: more than a few means something is
# hammering the head, and the caller should hear about it rather than spin.
MAX_ATTEMPTS = 5


class Ancestry(enum.StrEnum):
    """How the commit to sync relates to the synced head's commit, in the local repo."""

    SAME = "same"
    DESCENDANT = "descendant"  # the new commit descends from the head: a fast-forward
    OLDER = "older"  # the new commit is an ancestor of the head: a rollback
    DIVERGED = "diverged"  # neither: another branch, or rewritten history
    UNKNOWN = "unknown"  # the head's commit is not in the local repo (not fetched)


class Status(enum.StrEnum):
    SYNCED = "synced"
    NOOP = "noop"
    REFUSED = "refused"


class Reason(enum.StrEnum):
    FIRST = "first"
    FAST_FORWARD = "fast-forward"
    FORCED = "forced"
    SAME_COMMIT = "same-commit"
    INVALID = "invalid"
    EMPTY = "empty"  # no pipeline files: would remove every dependency
    MISSING_PATH = "missing-path"  # --path is not in the commit
    NOT_FAST_FORWARD = "not-fast-forward"
    UNKNOWN_HEAD = "unknown-head"
    DIGEST_MISMATCH = "digest-mismatch"


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: Reason
    message: str

    @property
    def writes(self) -> bool:
        return self.status is Status.SYNCED


def decide(head: HeadRecord | None, commit: str, digest: str, ancestry: Ancestry | None,
           *, force: bool) -> Decision:
    """What a sync of `commit` (whose graph has `digest`) does, given the synced head.

    `ancestry` is how `commit` relates to `head.commit` (None when there is no head).
    """
    short = commit[:12]
    if head is None:
        return Decision(Status.SYNCED, Reason.FIRST, f"first sync: {short}")
    was = head.commit[:12]
    if head.commit == commit:
        if head.graph_digest == digest:
            return Decision(Status.NOOP, Reason.SAME_COMMIT,
                            f"{short} is already the synced head; nothing written")
        if force:
            return Decision(Status.SYNCED, Reason.FORCED,
                            f"re-synced {short} with a different graph (--force)")
        return Decision(Status.REFUSED, Reason.DIGEST_MISMATCH,
                        f"{short} is the synced head but its graph now reads differently "
                        f"({digest} vs {head.graph_digest}): a different --path or reconciler "
                        "version? Pass --force to overwrite it")
    if ancestry is Ancestry.DESCENDANT:
        return Decision(Status.SYNCED, Reason.FAST_FORWARD, f"fast-forward {was} -> {short}")
    if force:
        what = "rollback" if ancestry is Ancestry.OLDER else "forced sync"
        return Decision(Status.SYNCED, Reason.FORCED, f"{what} {was} -> {short} (--force)")
    synced = f"synced head {was} (synced {head.synced_at:%Y-%m-%d %H:%M:%S}Z by {head.source})"
    if ancestry is Ancestry.UNKNOWN:
        return Decision(Status.REFUSED, Reason.UNKNOWN_HEAD,
                        f"the {synced} is not in this repository: fetch the full history "
                        "(git fetch; fetch-depth: 0 in CI) and try again, or pass --force")
    if ancestry is Ancestry.OLDER:
        detail = f"{short} is older than the {synced}"
    else:
        detail = f"{short} does not descend from the {synced}"
    return Decision(Status.REFUSED, Reason.NOT_FAST_FORWARD,
                    f"not a fast-forward: {detail}; sync a newer commit, or pass --force to "
                    "roll back")


def build_head(commit: str, digest: str, *, now: datetime, source: str,
               previous: HeadRecord | None, forced: bool) -> HeadRecord:
    """The head record of a sync; `previous` chains it to the head it replaces."""
    return HeadRecord(commit=commit, graph_digest=digest, synced_at=now.astimezone(UTC),
                      source=redact(source), previous=previous.commit if previous else None,
                      forced=forced, seq=(previous.seq if previous else 0) + 1)


def carry_since(previous: Mapping[str, datetime], dag_ids: Iterable[str], now: datetime
                ) -> dict[str, datetime]:
    """When each pipeline first appeared in a synced head, for the `backfill: false` rule.

    Pipelines of the previous head keep their time; new ones (or ones that come back
    after a removal) get `now`.
    """
    return {dag_id: previous.get(dag_id, now) for dag_id in sorted(dag_ids)}


@dataclass(frozen=True)
class SyncResult:
    status: Status
    reason: Reason
    commit: str
    message: str
    namespace: str = ""
    head: HeadRecord | None = None
    """The synced head after this sync (None when refused before reading etcd)."""
    problems: tuple[Problem, ...] = ()
    pipelines: int = 0
    blob_bytes: int = 0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.status is not Status.REFUSED

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "SyncResult", "status": self.status.value, "reason": self.reason.value,
            "ok": self.ok,
            "commit": self.commit, "namespace": self.namespace, "message": self.message,
            "head": self.head.to_dict() if self.head else None,
            "problems": [p.to_dict() for p in self.problems], "pipelines": self.pipelines,
            "blob_bytes": self.blob_bytes, "attempts": self.attempts,
        }


def ancestry(repo: Any, head_commit: str, commit: Any) -> Ancestry:
    """How `commit` (a git.Commit) relates to `head_commit` (a hash) in `repo`."""
    if head_commit == commit.hexsha:
        return Ancestry.SAME
    import git

    try:
        head = resolve_commit(repo, head_commit)
        if repo.is_ancestor(head, commit):
            return Ancestry.DESCENDANT
        if repo.is_ancestor(commit, head):
            return Ancestry.OLDER
    except (SourceError, git.GitCommandError):
        return Ancestry.UNKNOWN  # not fetched, or a partial clone missing objects
    if (Path(repo.git_dir) / "shallow").exists():
        # A shallow clone cuts the history: "unrelated" may only mean "not fetched".
        return Ancestry.UNKNOWN
    return Ancestry.DIVERGED


def sync(repo_path: str | Path, rev: str, subdir: str, store: EtcdStore, *,
         force: bool = False, source: str = "", now: datetime | None = None,
         max_attempts: int = MAX_ATTEMPTS, allow_empty: bool = False) -> SyncResult:
    """Sync the graph of commit `rev` of `repo_path` into the store's namespace.

    Returns a result for synced, no-op and refused (invalid, empty, `subdir` missing in
    the commit, or not a fast-forward). An empty graph removes every dependency, so it is
    only synced with `allow_empty`. Raises SourceError (no such repository or commit, an
    unreadable tree), StoreUnavailable (etcd unreachable), StoreConflict (still racing
    after `max_attempts`).
    """
    repo = open_repo(repo_path)
    commit = resolve_commit(repo, rev)
    sha = commit.hexsha
    files: Iterable[SourceFile]
    try:
        # Checked as git reads them: the checks run while git reads the next blobs.
        files = open_tree(repo, commit, subdir)
    except PathNotFound:
        if not allow_empty:
            return SyncResult(Status.REFUSED, Reason.MISSING_PATH, sha,
                              f"{subdir} is not in commit {sha[:12]}: syncing it would remove "
                              "every dependency; check --path, or pass --allow-empty if that "
                              "is what you mean; nothing written", namespace=store.root)
        files = []
    # The deployments beside the pipelines go into the same blob, so the loop reads them
    # from etcd with the graph; none declared: today's blob, byte for byte.
    checked = check_files(files, deployments=read_tree_deployments(repo, commit, subdir))
    if not checked.ok or checked.graph is None:
        return SyncResult(Status.REFUSED, Reason.INVALID, sha,
                          f"{sha[:12]}:{subdir} has {len(checked.problems)} problem(s); "
                          "nothing written", namespace=store.root,
                          problems=tuple(checked.problems))
    graph = checked.graph
    if not len(graph) and not allow_empty:
        return SyncResult(Status.REFUSED, Reason.EMPTY, sha,
                          f"{sha[:12]}:{subdir} holds no pipeline file: syncing it would "
                          "remove every dependency; pass --allow-empty if that is what you "
                          "mean; nothing written", namespace=store.root)
    digest = graph.digest()
    blob = graph.compressed()
    for attempt in range(1, max_attempts + 1):
        head, mod_revision = store.read_head()
        relation = ancestry(repo, head.commit, commit) if head else None
        decision = decide(head, sha, digest, relation, force=force)
        result = SyncResult(decision.status, decision.reason, sha, decision.message,
                            namespace=store.root, head=head, pipelines=len(graph),
                            blob_bytes=len(blob), attempts=attempt)
        if not decision.writes:
            if decision.status is Status.NOOP and head is not None and head.graph_parts:
                repaired = store.repair_parts(sha, blob)
                if repaired:
                    return replace(result, message=f"{result.message} (but rewrote "
                                   f"{repaired} missing part(s) of its graph)")
            return result
        at = now or datetime.now(UTC)
        new_head = build_head(sha, digest, now=at, source=source, previous=head,
                              forced=decision.reason is Reason.FORCED)
        previous_since = store.read_since(head.commit) if head else {}
        # The blob of a commit is written once; a rollback to it reuses what is there.
        keep = _is_stored(store, sha, graph)
        try:
            new_head = store.write_sync(new_head, mod_revision, None if keep else blob,
                                        carry_since(previous_since, graph.pipelines, at),
                                        split=True)
        except StoreConflict:
            continue  # another sync moved the head: read it again and decide again
        return SyncResult(decision.status, decision.reason, sha, decision.message,
                          namespace=store.root, head=new_head, pipelines=len(graph),
                          blob_bytes=len(blob), attempts=attempt)
    raise StoreConflict(f"{store.head_key()} kept changing during {max_attempts} attempts to "
                        f"sync {sha[:12]}; try again")


def _is_stored(store: EtcdStore, commit: str, graph: Graph) -> bool:
    """True when etcd already holds this graph for `commit` (a rollback to it). Compared
    by content, not bytes: a blob written with another compression level is the same
    graph. A torn or unreadable one is not stored: writing it again repairs it."""
    try:
        stored = store.read_graph_blob(commit)
    except StoreCorrupt:
        return False
    if stored is None:
        return False
    if stored == graph.compressed():
        return True
    try:
        return gzip.decompress(stored) == graph.canonical_json()
    except (OSError, EOFError, ValueError):
        return False


def _with_store(target: EtcdStore | EtcdSettings) -> tuple[EtcdStore, bool]:
    if isinstance(target, EtcdStore):
        return target, False
    return EtcdStore(target), True


def read_synced_graph(target: EtcdStore | EtcdSettings, commit: str | None = None
                      ) -> tuple[str, Graph]:
    """The graph etcd holds for `commit` (a full hash or a unique prefix; None = the head).

    Raises StoreNotFound when nothing (or no such commit) was synced, StoreUnavailable
    when etcd is unreachable.
    """
    store, owned = _with_store(target)
    try:
        if commit is None:
            head, _ = store.read_head()
            if head is None:
                raise StoreNotFound(f"nothing has been synced to {store.root} yet: run "
                                    "`reconciler sync` first")
            commit = head.commit
        elif not _SEGMENT.match(commit):  # asked for by a user: never a path of keys
            raise StoreNotFound(f"commit {commit} has never been synced to {store.root} "
                                "(see `reconciler history`)")
        blob = store.read_graph_blob(commit)
        if blob is None:
            matches = store.synced_commits(commit.lower())
            if len(matches) > 1:
                raise StoreNotFound(f"{commit} is ambiguous in {store.root}: "
                                    + ", ".join(m[:12] for m in matches))
            if not matches:
                raise StoreNotFound(f"commit {commit} has never been synced to {store.root} "
                                    "(see `reconciler history`)")
            commit = matches[0]
            blob = store.read_graph_blob(commit)
            if blob is None:
                raise StoreNotFound(f"the graph of {commit} disappeared from {store.root}")
        try:
            return commit, Graph.from_compressed(blob)
        except Exception as exc:  # any decoding failure of stored bytes is bad data
            raise StoreCorrupt(store.graph_key(commit),
                               f"{type(exc).__name__}: {exc}"[:200]) from None
    finally:
        if owned:
            store.close()


def read_since(target: EtcdStore | EtcdSettings, commit: str) -> dict[str, datetime]:
    """{dag_id: when it first appeared in a synced head} for the graph of `commit`."""
    store, owned = _with_store(target)
    try:
        return store.read_since(commit)
    finally:
        if owned:
            store.close()


def read_history(target: EtcdStore | EtcdSettings, limit: int = 0
                 ) -> list[HeadRecord | Unreadable]:
    """The synced heads, newest first; an entry that cannot be read is an `Unreadable`
    naming its key, in its place."""
    store, owned = _with_store(target)
    try:
        return store.history_entries(limit)
    finally:
        if owned:
            store.close()
