"""The run ledger: `ledger/<cycle>/<dag_id>`, a JSON LedgerEntry (core/state.py) per
pipeline and cycle: what the loop asked Airflow to do and why. Written only by the
leader, fenced by the leader key; read once per term by the loop (service/ledger.py keeps
it in memory, written through), and by `status` and `plan`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import etcd3

from reconciler.adapters.store.client import EtcdClient
from reconciler.adapters.store.codec import _dumps, _short
from reconciler.adapters.store.errors import NotLeader, Unreadable


class LedgerStore(EtcdClient):
    """ledger/, and forgetting a closed cycle (its ledger and observed keys)."""

    def ledger_key(self, cycle: str, dag_id: str) -> str:
        return self.key("ledger", cycle, dag_id)


    def get_ledger(self, cycle: str, dag_id: str) -> dict[str, Any] | None:
        data: dict[str, Any] | None = self.get_json(self.ledger_key(cycle, dag_id))
        return data

    def read_ledger(self, cycle: str | None = None) -> dict[tuple[str, str], Any]:
        """Every ledger entry (of one cycle, if given), keyed by (cycle, dag_id) as written.

        A value that is not JSON comes back as `Unreadable` (the caller quarantines it)."""
        return dict(self.scan_ledger(cycle))

    def scan_ledger(self, cycle: str | None = None) -> Iterator[tuple[tuple[str, str], Any]]:
        """As `read_ledger`, one entry at a time: a caller that keeps a compact form never
        holds every decoded entry at once (150,000 at 50,000 pipelines x 3 cycles)."""
        return self._scan_cycles("ledger", cycle)

    def put_ledger(self, holder: str, cycle: str, dag_id: str, entry: Mapping[str, Any]) -> None:
        """Write a ledger entry only while `holder` leads; StoreConflict otherwise."""
        if not self.put_fenced(holder, [(self.ledger_key(cycle, dag_id), _dumps(entry))]):
            raise NotLeader(f"not the leader any more ({holder}); ledger entry for "
                            f"{dag_id} {cycle} not written")

    def delete_cycle(self, holder: str, cycle: str) -> None:
        """Forget a cycle that left the window (ledger and observed), fenced like every
        write of the loop: a deposed leader cannot delete what the new one relies on."""
        leader = self.leader_key()
        ranges = []
        for kind in ("ledger", "observed"):
            prefix = self.key(kind, cycle) + "/"
            ranges.append((prefix, etcd3.utils.prefix_range_end(prefix.encode())))

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(
                compare=[c.transactions.value(leader) == holder],
                success=[c.transactions.delete(p, range_end=e) for p, e in ranges],
                failure=[])
            return bool(ok)

        self._count_write()
        if not self._call(f"delete cycle {cycle}", txn):
            raise NotLeader(f"not the leader any more ({holder}); cycle {cycle} not deleted")

    def scanned_key(self, kind: str, cycle: str, dag_id: str) -> str:
        """The key a scan of `kind` (ledger, observed) yielded as (cycle, dag_id), rebuilt
        as it was, whatever it holds (it never raises: it names a bad key)."""
        return self.key(kind) + "/" + (f"{cycle}/" if cycle else "") + dag_id

    def _scan_cycles(self, kind: str, cycle: str | None
                     ) -> Iterator[tuple[tuple[str, str], Any]]:
        base = self.key(kind) + "/"
        prefix = self.key(kind, cycle) + "/" if cycle is not None else base
        for chunk in self.scan_prefix(prefix):
            for key, value in chunk:
                # dag ids never contain "/" (Airflow's rule), cycles are ISO strings: split
                # once.
                found_cycle, _, dag_id = key[len(base):].rpartition("/")
                try:
                    yield (found_cycle, dag_id), json.loads(value)
                except ValueError as exc:
                    yield (found_cycle, dag_id), Unreadable(key, _short(exc))

