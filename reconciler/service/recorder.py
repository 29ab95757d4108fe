"""The recorder: the status of each pipeline x cycle, mirrored into etcd, once per pass.

`observed/<cycle>/<dag_id>` holds the last status and run state the leader saw, written
only when it changed (a quiet pass writes nothing), in fenced transactions of at most
100 keys. What etcd holds is mirrored in memory as flat tuples of each record's values
(`compact`), not as the records' dicts: 150,000 dicts cost more than a quarter GB. One
log line per state change, never per pass. Cycles that closed (left the window) are
forgotten here too, by a fenced delete: a deposed leader cannot delete what
the new one relies on.
"""

from __future__ import annotations

import json
import logging
import sys
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
        self.mirror: dict[tuple[str, str], tuple[Any, ...] | None] | None = None
        """(cycle ISO, dag_id) -> `compact()` of what observed/ holds; read once per term."""
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
        intern = sys.intern
        self.mirror = {(intern(cycle), intern(dag_id)): compact(v)
                       for (cycle, dag_id), v in self.store.scan_observed()
                       if not isinstance(v, Unreadable)}

    def record(self, result: Plan, runs: Mapping[tuple[str, str], DagRun]) -> int:
        """Mirror what changed; returns the number of keys written."""
        last = self._recorded
        if last is not None and result.statuses is last.statuses \
                and result.cycles is last.cycles:
            return 0  # a reused plan (or one with only its actions held back) was recorded
        if self.mirror is None:
            self.load()
        assert self.mirror is not None
        changed: list[tuple[str, bytes]] = []
        counts: dict[str, int] = {}
        cycles: dict[datetime, str] = {}
        for status in result.statuses:
            counts[status.state.value] = counts.get(status.state.value, 0) + 1
            cycle = cycles.get(status.cycle)
            if cycle is None:
                cycle = cycles[status.cycle] = iso(status.cycle)
            key = (cycle, status.dag_id)
            run = runs.get((status.dag_id, status.run_id)) if status.run_id else None
            now = compact_of(status, cycle, run)
            before = self.mirror.get(key)
            if before != now:
                _log_change(status, before)
                changed.append((self.store.observed_key(*key),
                                _dumps(observed_record(status, runs))))
                self.mirror[key] = now
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
        return closed


def _log_change(status: PipelineStatus, before: tuple[Any, ...] | None) -> None:
    """One line when a status's state or message differs from what etcd held (`before`,
    its compact record), or on a first done/failed/blocked. The mirror is the memory of
    what was logged: a restart, whose mirror comes from etcd, logs what changed only,
    not 150,000 lines."""
    state = status.state.value
    if before is not None:
        if before[2] == state and before[4] == status.message:
            return  # only the run's dates moved
    elif state not in ("done", "failed", "blocked"):
        return
    event("state", dag_id=status.dag_id, cycle=iso(status.cycle), state=state,
          reason=status.reason.value, message=status.message)


def observed_record(status: PipelineStatus,
                    runs: Mapping[tuple[str, str], DagRun]) -> dict[str, Any]:
    data = status.to_json()
    run = runs.get((status.dag_id, status.run_id)) if status.run_id else None
    if run is not None:
        data["run"] = {"state": run.state,
                       "start_date": iso(run.start_date) if run.start_date else None,
                       "end_date": iso(run.end_date) if run.end_date else None}
    return data


_KEYS = frozenset(("dag_id", "cycle", "state", "reason", "message", "run_id", "waiting_for",
                   "blocked_by", "commit"))
_KEYS_WITH_RUN = _KEYS | {"run"}
_RUN_KEYS = frozenset(("state", "start_date", "end_date"))


def compact(data: Any) -> tuple[Any, ...] | None:
    """An observed record (as `observed_record` builds it, or as read back from etcd) as
    a flat tuple of its values in a fixed order: equal exactly when the records are.
    None for a record of any other shape: it never matches, so it is rewritten."""
    if not isinstance(data, dict):
        return None
    keys = data.keys()
    run = data.get("run")
    if keys == _KEYS_WITH_RUN:
        if not isinstance(run, dict) or run.keys() != _RUN_KEYS:
            return None
        ran: tuple[Any, ...] | None = (_text(run["state"]), run["start_date"], run["end_date"])
    elif keys == _KEYS:
        ran = None
    else:
        return None
    waiting, blocked = data["waiting_for"], data["blocked_by"]
    return (data["dag_id"], data["cycle"], _text(data["state"]), _text(data["reason"]),
            data["message"], _text(data["run_id"]),
            tuple(waiting) if type(waiting) is list else waiting,
            tuple(blocked) if type(blocked) is list else blocked, _text(data["commit"]), ran)


def compact_of(status: PipelineStatus, cycle: str, run: DagRun | None) -> tuple[Any, ...]:
    """`compact(observed_record(status, runs))` without building the record: what every
    recorded pass computes for each of its statuses. `cycle` is `iso(status.cycle)`."""
    ran = None if run is None else (
        run.state, iso(run.start_date) if run.start_date else None,
        iso(run.end_date) if run.end_date else None)
    return (status.dag_id, cycle, status.state.value, status.reason.value, status.message,
            status.run_id, status.waiting_for, status.blocked_by, status.commit, ran)


def _text(value: Any) -> Any:
    # The few values repeated on most records (states, reasons, run ids, the commit):
    # one copy each in the mirror.
    return sys.intern(value) if type(value) is str else value


def _parse(text: str) -> datetime | None:
    try:
        return parse_time(text)
    except ValueError:
        return None


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
