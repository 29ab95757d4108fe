"""The ledger: the one owner of what the loop asked Airflow to do, in etcd and in memory.

The loop plans on an in-memory copy of `ledger/` (read once per term: 150,000 entries at
50,000 pipelines are not re-read every pass). Two copies of one fact drift apart unless
one role writes both, so every write goes through here, never to the store directly:

- `intend()` (before the Airflow call) puts the intent in memory first, then in etcd,
  whatever etcd answers. An intent etcd did not confirm (unreachable, timed out) is still
  what memory holds, so the plan's rule for an unconfirmed intent (core/plan.py: adopt
  the run if the call took effect, else act again) applies to it in the next pass; a
  memory without it would take our own run for a stranger's and clear it.
- `settle()` (the result: done or failed) changes memory only once etcd confirmed it: if
  the write fails, memory keeps the intent (unconfirmed), as etcd does, and the next pass
  decides from Airflow's state.
- `reset()` at a new term (another leader may have written), `forget()` for closed cycles.

Writes are fenced by the leader key (store.put_ledger). The executor's threads call in
concurrently; a lock keeps the map and its version consistent.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType

from reconciler.adapters.store import Unreadable
from reconciler.core.state import FingerprintItem, LedgerEntry, iso, parse_time
from reconciler.service.ports import Store

Key = tuple[datetime, str]
"""(cycle, dag_id)"""


def read_ledger(store: Store, quarantine: Callable[[str, str], None]
                ) -> dict[Key, LedgerEntry]:
    """Every readable ledger entry in etcd; `quarantine(key, why)` for each that is not
    (the entry is then absent: the run's own timestamps decide)."""
    out: dict[Key, LedgerEntry] = {}
    # One datetime per cycle and one copy of each fingerprint item, not one per entry.
    shared: dict[FingerprintItem, FingerprintItem] = {}
    cycles: dict[str, datetime | None] = {}
    for (cycle, dag_id), data in store.scan_ledger():
        if isinstance(data, Unreadable):
            quarantine(data.key, data.why)
            continue
        try:
            parsed = cycles[cycle] if cycle in cycles else cycles.setdefault(
                cycle, parse_time(cycle))
            if parsed is None:
                raise ValueError("the cycle in the key is empty")
            out[(parsed, sys.intern(dag_id))] = LedgerEntry.from_json(data, shared)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            quarantine(store.scanned_key("ledger", cycle, dag_id),
                       f"{type(exc).__name__}: {exc}")
    return out


class Ledger:
    """The run ledger, written through: etcd and the loop's memory of it change together."""

    def __init__(self, store: Store, quarantine: Callable[[str, str], None],
                 release: Callable[[str], None] | None = None) -> None:
        self.store = store
        self._quarantine = quarantine
        self._release = release or (lambda key: None)
        """Called with a key whose quarantined value was just replaced by a good one."""
        self._entries: dict[Key, LedgerEntry] | None = None
        self.version = 0
        """Changes whenever the entries do: a caller can tell "the same ledger" cheaply."""
        self._lock = threading.Lock()

    # --- reading ---

    def entries(self) -> Mapping[Key, LedgerEntry]:
        """The ledger as the loop knows it (read from etcd once per term): a read-only view."""
        with self._lock:
            if self._entries is None:
                self._entries = self.load()
                self.version += 1
            return MappingProxyType(self._entries)

    def load(self) -> dict[Key, LedgerEntry]:
        """Read every entry from etcd (what `entries()` does once per term)."""
        return read_ledger(self.store, self._quarantine)

    @property
    def loaded(self) -> bool:
        return self._entries is not None

    def get(self, cycle: datetime, dag_id: str) -> LedgerEntry | None:
        return self.entries().get((cycle, dag_id))

    def reset(self) -> None:
        """A new term: another leader may have written; read etcd again when next asked."""
        with self._lock:
            self._entries = None

    # --- writing (the leader) ---

    def intend(self, holder: str, cycle: datetime, dag_id: str, entry: LedgerEntry) -> None:
        """Record an intent before its Airflow call: in memory at once, then in etcd.
        The store's error (unreachable, not the leader) is raised after memory holds it."""
        self._remember(cycle, dag_id, entry)
        self._put(holder, cycle, dag_id, entry)

    def settle(self, holder: str, cycle: datetime, dag_id: str, entry: LedgerEntry) -> None:
        """Record a result (done, failed): in etcd, then in memory once etcd took it. If the
        write fails, memory keeps what it held (the unconfirmed intent) and this raises."""
        self._put(holder, cycle, dag_id, entry)
        self._remember(cycle, dag_id, entry)

    def forget(self, cycles: Iterable[datetime]) -> None:
        """Drop closed cycles from memory (the recorder deletes their keys, fenced)."""
        gone = set(cycles)
        with self._lock:
            if self._entries is None or not gone:
                return
            kept = {k: v for k, v in self._entries.items() if k[0] not in gone}
            if len(kept) != len(self._entries):
                self._entries = kept
                self.version += 1

    def _put(self, holder: str, cycle: datetime, dag_id: str, entry: LedgerEntry) -> None:
        self.store.put_ledger(holder, iso(cycle), dag_id, entry.to_json())
        self._release(self.store.ledger_key(iso(cycle), dag_id))

    def _remember(self, cycle: datetime, dag_id: str, entry: LedgerEntry) -> None:
        with self._lock:
            if self._entries is None:
                return  # not read yet this term: the next read gets it from etcd
            if self._entries.get((cycle, dag_id)) != entry:
                self._entries[(cycle, dag_id)] = entry
                self.version += 1
