"""The audit: every stored value of the namespace that this version cannot read, each
named by its key (what `doctor` lists). It reads what the loop and the commands read: the
head, its graph and since-map, the history, the ledger, the observed mirror, the suspend
marks and the heartbeat. It changes nothing."""

from __future__ import annotations

from reconciler.adapters.store.controls import ControlStore
from reconciler.adapters.store.desired import DesiredStore
from reconciler.adapters.store.errors import StoreCorrupt, Unreadable
from reconciler.adapters.store.observed import ObservedStore
from reconciler.core.state import LedgerEntry


class AuditStore(DesiredStore, ObservedStore, ControlStore):
    """`corrupt_values()`: one `Unreadable` per bad value."""

    def corrupt_values(self) -> list[Unreadable]:
        found: list[Unreadable] = []
        try:
            head, _ = self.read_head()
        except StoreCorrupt as exc:
            head = None
            found.append(Unreadable(exc.key, exc.why))
        if head is not None:
            for read in (self.read_graph, self.read_since):
                try:
                    if read(head.commit) is None:
                        found.append(Unreadable(self.graph_key(head.commit),
                                                "the head names a graph that is not stored"))
                except StoreCorrupt as exc:
                    found.append(Unreadable(exc.key, exc.why))
        found += [h for h in self.history_entries() if isinstance(h, Unreadable)]
        for (cycle, dag_id), data in self.scan_ledger():
            if isinstance(data, Unreadable):
                found.append(data)
                continue
            try:
                LedgerEntry.from_json(data)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                found.append(Unreadable(self.scanned_key("ledger", cycle, dag_id),
                                        f"{type(exc).__name__}: {exc}"[:200]))
        for (cycle, dag_id), data in self.scan_observed():
            if isinstance(data, Unreadable):
                found.append(data)
            elif not isinstance(data, dict) or "dag_id" not in data:
                found.append(Unreadable(self.scanned_key("observed", cycle, dag_id),
                                        "not a status record"))
        for target, mark in self.read_suspended().items():
            key = self.suspended_prefix() + target
            if isinstance(mark, Unreadable):
                found.append(mark)
            elif "/" in target:
                found.append(Unreadable(key, "a suspend mark whose name is not a DAG id"))
            elif not isinstance(mark, dict):
                found.append(Unreadable(key, f"a JSON {type(mark).__name__}, not a mark"))
        beat = self.read_heartbeat()
        if isinstance(beat, Unreadable):
            found.append(beat)
        return found
