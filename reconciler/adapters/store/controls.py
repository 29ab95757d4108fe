"""Operator controls: `suspended/<dag_id|*>` marks (who, when, why; honoured by the
loop) and `control/<name>` requests to the loop (`reconcile`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reconciler.adapters.store.client import EtcdClient
from reconciler.adapters.store.codec import _short
from reconciler.adapters.store.errors import Unreadable


class ControlStore(EtcdClient):
    """suspended/ and control/."""

    def suspended_prefix(self) -> str:
        return self.key("suspended") + "/"

    def suspend_key(self, target: str) -> str:
        """`suspended/<dag_id>`, or `suspended/*` for the whole namespace."""
        return self.key("suspended", target)

    def read_suspended(self) -> dict[str, Any]:
        """{dag_id or "*": the mark (who, when, why)}; an unreadable mark still suspends."""
        base = self.suspended_prefix()
        out: dict[str, Any] = {}
        for key, value in self.get_prefix(base):
            try:
                out[key[len(base):]] = json.loads(value)
            except ValueError as exc:
                out[key[len(base):]] = Unreadable(key, _short(exc))
        return out

    def put_suspend(self, target: str, mark: Mapping[str, Any]) -> None:
        self.put_json(self.suspend_key(target), dict(mark))

    def delete_suspend(self, target: str) -> bool:
        """Remove the mark; False when there was none. `target` is any name that
        `read_suspended` lists, even one that is not a DAG id (a mark written by hand
        with a "/" in it): whatever status shows, resume can remove."""
        if not target or target in (".", ".."):
            raise ValueError(f"{target!r} names no suspend mark")
        key = self.suspended_prefix() + target
        self._count_write()
        return bool(self._call(f"delete {key}", lambda c: c.delete(key)))

    def control_key(self, name: str) -> str:
        """`control/<name>`: requests to the loop (e.g. `reconcile`: a pass and a relist now)."""
        return self.key("control", name)
