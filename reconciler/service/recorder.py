"""The recorder: the status of each pipeline x cycle, mirrored into etcd, once per pass.

`observed/<cycle>/<dag_id>` holds the last status and run state the leader saw, written
only when it changed (a quiet pass writes nothing), in fenced transactions of at most
100 keys. One log line per state change, never per pass. Cycles that closed (left the
window) are forgotten here too, by a fenced delete: a deposed leader cannot delete what
the new one relies on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from reconciler.adapters.store import NotLeader, Unreadable
from reconciler.core.state import DagRun, PipelineStatus, Plan, iso, parse_time
from reconciler.service.observability import Metrics, event
from reconciler.service.ports import Store

BATCH = 100
HEARTBEAT_EVERY = 60.0
"""Seconds between two writes of `status/loop` (the leader's last pass, for `status`):
the one periodic write of a quiet loop."""


class Recorder:
    def __init__(self, store: Store, holder: str, metrics: Metrics | None = None) -> None:
        self.store = store
        self.holder = holder
        self.metrics = metrics
        self.mirror: dict[tuple[str, str], Any] | None = None
        """(cycle ISO, dag_id) -> what observed/ holds; read once per term."""
        self._last_state: dict[tuple[datetime, str], tuple[str, str]] = {}
        self._recorded: Plan | None = None
        self._beat: tuple[float, str] | None = None

    def reset(self) -> None:
        """A new term: what etcd holds may have been written by another leader."""
        self.mirror = None
        self._recorded = None
        self._beat = None

    def heartbeat(self, now: datetime, mono: float, commit: str, open_cycles: int) -> bool:
        """Write `status/loop` when the commit changed or a minute passed; True if written."""
        if self._beat is not None and self._beat[1] == commit \
                and mono - self._beat[0] < HEARTBEAT_EVERY:
            return False
        data = {"holder": self.holder, "last_pass": iso(now), "commit": commit,
                "open_cycles": open_cycles, "every": HEARTBEAT_EVERY}
        if not self.store.put_fenced(self.holder, [(self.store.heartbeat_key(), _dumps(data))]):
            raise NotLeader(f"not the leader any more ({self.holder}) while recording the "
                            "heartbeat")
        self._beat = (mono, commit)
        return True

    def load(self) -> None:
        self.mirror = {k: v for k, v in self.store.read_observed().items()
                       if not isinstance(v, Unreadable)}

    def record(self, result: Plan, runs: Mapping[tuple[str, str], DagRun]) -> int:
        """Mirror what changed; returns the number of keys written."""
        if result is self._recorded:
            return 0  # a reused plan was recorded already
        if self.mirror is None:
            self.load()
        assert self.mirror is not None
        changed: list[tuple[str, bytes]] = []
        counts: dict[str, int] = {}
        for status in result.statuses:
            counts[status.state.value] = counts.get(status.state.value, 0) + 1
            self._log_change(status)
            key = (iso(status.cycle), status.dag_id)
            data = observed_record(status, runs)
            if self.mirror.get(key) != data:
                changed.append((self.store.observed_key(*key), _dumps(data)))
                self.mirror[key] = data
        if self.metrics is not None:
            for state in ("waiting", "blocked"):
                self.metrics.waiting.labels(state).set(counts.get(state, 0))
            self.metrics.open_cycles.set(len(result.cycles))
        for start in range(0, len(changed), BATCH):
            if not self.store.put_fenced(self.holder, changed[start:start + BATCH]):
                self.mirror = None
                raise NotLeader(f"not the leader any more ({self.holder}) while recording "
                                "status")
        self._recorded = result
        return len(changed)

    def _log_change(self, status: PipelineStatus) -> None:
        key = (status.cycle, status.dag_id)
        summary = (status.state.value, status.message)
        if self._last_state.get(key) == summary:
            return
        if key in self._last_state or status.state.value in ("done", "failed", "blocked"):
            event("state", dag_id=status.dag_id, cycle=iso(status.cycle),
                  state=status.state.value, reason=status.reason.value,
                  message=status.message)
        self._last_state[key] = summary

    def forget_closed(self, open_cycles: Iterable[datetime],
                      ledger_cycles: Iterable[datetime], horizon: datetime) -> list[datetime]:
        """Delete ledger and observed keys of cycles that are not open and older than the
        window (fenced). Returns the cycles forgotten."""
        if self.mirror is None:
            self.load()
        assert self.mirror is not None
        still = set(open_cycles)
        candidates = set(ledger_cycles)
        for cycle_text, _ in self.mirror:
            parsed = _parse(cycle_text)
            if parsed is not None:
                candidates.add(parsed)
        closed = sorted(c for c in candidates if c not in still and c < horizon)
        for cycle in closed:
            self.store.delete_cycle(self.holder, iso(cycle))
            event("closed cycle forgotten", logging.INFO, cycle=iso(cycle))
        if closed:
            gone = {iso(c) for c in closed}
            self.mirror = {k: v for k, v in self.mirror.items() if k[0] not in gone}
            self._last_state = {k: v for k, v in self._last_state.items()
                                if k[0] not in set(closed)}
        return closed


def observed_record(status: PipelineStatus,
                    runs: Mapping[tuple[str, str], DagRun]) -> dict[str, Any]:
    data = status.to_json()
    run = runs.get((status.dag_id, status.run_id)) if status.run_id else None
    if run is not None:
        data["run"] = {"state": run.state,
                       "start_date": iso(run.start_date) if run.start_date else None,
                       "end_date": iso(run.end_date) if run.end_date else None}
    return data


def _parse(text: str) -> datetime | None:
    try:
        return parse_time(text)
    except ValueError:
        return None


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
