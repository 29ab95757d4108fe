"""The observed mirror: `observed/<cycle>/<dag_id>`, the last status and Airflow state
the leader saw per pipeline and cycle (the ETL state store), and `status/loop`, the
leader's heartbeat. Written by the recorder (service/recorder.py), read by `status`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from reconciler.adapters.store.codec import _short
from reconciler.adapters.store.errors import Unreadable
from reconciler.adapters.store.ledger import LedgerStore


class ObservedStore(LedgerStore):
    """observed/ and status/loop (cycle-keyed like the ledger, scanned the same way)."""

    def observed_key(self, cycle: str, dag_id: str) -> str:
        return self.key("observed", cycle, dag_id)


    def get_observed(self, cycle: str, dag_id: str) -> dict[str, Any] | None:
        data: dict[str, Any] | None = self.get_json(self.observed_key(cycle, dag_id))
        return data

    def put_observed(self, cycle: str, dag_id: str, data: Mapping[str, Any]) -> None:
        self.put_json(self.observed_key(cycle, dag_id), dict(data))

    def read_observed(self, cycle: str | None = None) -> dict[tuple[str, str], Any]:
        return dict(self.scan_observed(cycle))

    def scan_observed(self, cycle: str | None = None) -> Iterator[tuple[tuple[str, str], Any]]:
        return self._scan_cycles("observed", cycle)

    def read_heartbeat(self) -> dict[str, Any] | Unreadable | None:
        """`status/loop` (None when no leader wrote it yet; Unreadable if not an object)."""
        key = self.heartbeat_key()
        value = self.get(key).value
        if value is None:
            return None
        try:
            data = json.loads(value)
        except ValueError as exc:
            return Unreadable(key, _short(exc))
        if not isinstance(data, dict):
            return Unreadable(key, f"a JSON {type(data).__name__}, not an object")
        return data

    def heartbeat_key(self) -> str:
        """`status/loop`: the leader's last pass, written at most once a minute (fenced)."""
        return self.key("status", "loop")
