"""The UI's reads of etcd, through the JSON gateway client the listener plugin already has
(`reconciler_events.Gateway`: standard library, auth, TLS, failover), so that it runs
inside Airflow's API server without the reconciler's own dependencies.

The keys it reads are the reconciler's (docs/design.md, "etcd layout"): `desired/head` and
the graph blob it names (joined from its parts when large; cached by commit, since a
synced graph is never rewritten), `observed/<cycle>/<dag_id>` (the leader's mirror of
every status), `ledger/<cycle>/<dag_id>` (how a run was decided: the eager path),
`suspended/<target>` and `status/loop` (the leader's last pass). It writes nothing.

Settings come from the API server's environment: the reconciler's own RECONCILER_ETCD_*
and RECONCILER_NAMESPACE, and RECONCILER_UI_COMMIT_URL, RECONCILER_UI_FILE_URL,
RECONCILER_UI_PIPELINES_PATH, RECONCILER_UI_CYCLES, RECONCILER_UI_TIMEOUT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.plugin.reconciler_events import (
    Config,
    Gateway,
    GatewayError,
    GraphUnreadable,
    prefix_end,
    read_graph,
    read_head,
)
from reconciler.plugin.ui.view import Links

__all__ = ["EtcdUnavailable", "NotConfigured", "Reader", "UISettings"]


class NotConfigured(Exception):
    """RECONCILER_ETCD_ENDPOINTS is not set in the API server's environment."""


class EtcdUnavailable(Exception):
    """etcd cannot be read, or what it holds cannot be (one line, for the page)."""


@dataclass(frozen=True)
class UISettings:
    etcd: Config | None
    links: Links = field(default_factory=Links)
    cycles: int = 10
    """How many recent cycles a pipeline's tab lists."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UISettings:
        env = os.environ if env is None else env
        etcd = Config.from_env(env)
        if etcd is not None:  # a page waits for etcd at most this long per request
            etcd = dataclasses.replace(etcd, timeout=float(env.get("RECONCILER_UI_TIMEOUT",
                                                                    "2")))
        return cls(etcd=etcd,
                   links=Links(commit=env.get("RECONCILER_UI_COMMIT_URL", ""),
                               file=env.get("RECONCILER_UI_FILE_URL", ""),
                               pipelines_path=env.get("RECONCILER_UI_PIPELINES_PATH",
                                                      "pipelines")),
                   cycles=max(1, int(env.get("RECONCILER_UI_CYCLES", "10"))))


class Reader:
    """One per app; safe to share between the API server's request threads (each read
    makes its own HTTP request; the graph cache is guarded)."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self._gateway = Gateway(settings.etcd) if settings.etcd is not None else None
        self._lock = threading.Lock()
        self._graph: tuple[str, dict[str, Any]] | None = None

    @property
    def root(self) -> str:
        assert self.settings.etcd is not None
        return self.settings.etcd.root

    def _gw(self) -> Gateway:
        if self._gateway is None:
            raise NotConfigured("the reconciler's etcd is not configured: set "
                                "RECONCILER_ETCD_ENDPOINTS in the API server's environment")
        return self._gateway

    def graph(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The synced head and its pipelines ((None, {}) when nothing is synced)."""
        try:
            head = read_head(self._gw(), self.root)
            if head is None:
                return None, {}
            with self._lock:
                cached = self._graph
            if cached is not None and cached[0] == head["commit"]:
                return head, cached[1]
            head, pipelines = read_graph(self._gw(), self.root, head)
            if pipelines:
                with self._lock:
                    self._graph = (str(head["commit"]) if head else "", pipelines)
            return head, pipelines
        except (GatewayError, GraphUnreadable) as exc:
            raise EtcdUnavailable(_line(exc)) from None

    def cycles(self) -> list[str]:
        """The cycles the mirror holds, newest first: one keys-only read per cycle (each
        skips every key of the cycle before), not a read of every record."""
        base = f"{self.root}observed/"
        out: list[str] = []
        start = base
        try:
            while True:
                found = self._gw().range(start, prefix_end(base), keys_only=True, limit=1)
                if not found:
                    break
                cycle, _, _ = found[0][0][len(base):].rpartition("/")
                if not cycle:  # a key outside the layout: step past it
                    start = found[0][0] + "\0"
                    continue
                out.append(cycle)
                start = prefix_end(f"{base}{cycle}/")
        except GatewayError as exc:
            raise EtcdUnavailable(_line(exc)) from None
        return sorted(out, reverse=True)

    def _json_range(self, prefix: str) -> dict[str, Any]:
        """{the key's last segment: its JSON value (None when unreadable)} under prefix."""
        try:
            found = self._gw().range(prefix, prefix_end(prefix))
        except GatewayError as exc:
            raise EtcdUnavailable(_line(exc)) from None
        return {key[len(prefix):]: _json(value) for key, value in found}

    def _json_get(self, key: str) -> Any:
        try:
            value = self._gw().get(key)
        except GatewayError as exc:
            raise EtcdUnavailable(_line(exc)) from None
        return None if value is None else _json(value)

    def observed(self, cycle: str) -> dict[str, Any]:
        """{dag_id: observed record} of one cycle."""
        return self._json_range(f"{self.root}observed/{cycle}/")

    def history(self, dag_id: str, cycles: list[str]) -> list[tuple[str, Any, Any]]:
        """(cycle, observed record, ledger entry) of `dag_id` in each of `cycles`."""
        return [(c, self._json_get(f"{self.root}observed/{c}/{dag_id}"),
                 self._json_get(f"{self.root}ledger/{c}/{dag_id}")) for c in cycles]

    def suspended(self) -> dict[str, Any]:
        return self._json_range(f"{self.root}suspended/")

    def heartbeat(self) -> dict[str, Any] | None:
        beat = self._json_get(f"{self.root}status/loop")
        return beat if isinstance(beat, dict) else None


def _json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]
