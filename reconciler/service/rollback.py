"""`rollback N`: history entry N back as the head, without git (DESIGN section 4).

The graph of every synced commit stays in etcd, so a rollback needs no clone: it is a
forced sync of that commit's stored graph, recorded as such (`forced`, `previous`), in
the same guarded transaction as every sync. Rolling back to the commit already at the
head is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from reconciler.adapters.store import (
    EtcdStore,
    HeadRecord,
    StoreConflict,
    StoreCorrupt,
    StoreNotFound,
    Unreadable,
)
from reconciler.service.sync import build_head, carry_since, read_synced_graph

MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class RollbackResult:
    changed: bool
    head: HeadRecord
    target: HeadRecord
    message: str


def rollback(store: EtcdStore, seq: int, *, now: datetime, by: str) -> RollbackResult:
    """Make the commit of history entry `seq` the head again. Raises StoreNotFound when
    there is no such entry, StoreConflict when the head kept moving."""
    entries = store.history_entries()
    target = next((h for h in entries if isinstance(h, HeadRecord) and h.seq == seq), None)
    if target is None:
        bad = next((u for u in entries
                    if isinstance(u, Unreadable) and u.key == store.history_key(seq)), None)
        if bad is not None:  # that entry is corrupt; the others still roll back
            raise StoreCorrupt(bad.key, bad.why)
        raise StoreNotFound(f"no history entry {seq} in {store.root}: see `reconciler history`")
    commit, graph = read_synced_graph(store, target.commit)
    for _ in range(MAX_ATTEMPTS):
        head, revision = store.read_head()
        if head is not None and head.commit == commit:
            return RollbackResult(False, head, target, f"{commit[:12]} (history entry {seq}) "
                                                       "is the head already; nothing written")
        new = build_head(commit, graph.digest(), now=now, source=f"rollback:{seq} by {by}",
                         previous=head, forced=True)
        since = carry_since(store.read_since(head.commit) if head else {}, graph.pipelines, now)
        try:
            store.write_sync(new, revision, None, since)
        except StoreConflict:
            continue  # another sync won: read the head again and decide again
        return RollbackResult(True, new, target,
                              f"rolled back to {commit[:12]} (history entry {seq}); "
                              f"it replaces {head.commit[:12] if head else 'nothing'} as "
                              f"sync number {new.seq}")
    raise StoreConflict(f"{store.head_key()} kept changing; try the rollback again")
