"""The value types of reconciliation: what was observed, what was recorded, what to do.

This module owns the immutable values that flow through `plan()` (reconciler/plan.py):

- `DagRun`: one observed Airflow DAG run (parsed from Airflow 3 REST JSON by `from_api`).
- `Fingerprint`: the sorted `(upstream id, run id, end_date ISO)` items of a downstream's
  upstream runs in one cycle; what the ledger compares to decide a re-run.
- `LedgerEntry`: what the reconciler recorded for one (cycle, pipeline), as stored in etcd
  under `ledger/<cycle>/<dag_id>` (`to_json` / `from_json`).
- `Action`: one thing the loop must do (trigger, clear, adopt), with the conf to send.
- `PipelineStatus`: state, machine-readable reason and human message per pipeline and cycle.
- `Plan`: the result of one planning pass.

No I/O here (an import-linter contract keeps it so). Every datetime is timezone-aware and
normalised to UTC; a naive datetime is a bug and is refused where values are built.

Formats (fixed, because the ledger keeps them across releases and a change of format
would make every stored fingerprint "differ" and re-run every open cycle):

- ISO timestamps: `iso(dt)` = `dt.astimezone(UTC).isoformat()`, e.g.
  `2025-06-01T00:00:00+00:00` or `2025-06-01T00:00:01.250000+00:00`.
- Run ids: `run_id_for(cycle)` = `"reconciler__" + iso(cycle)`, the same shape as Airflow's
  own `manual__2025-06-01T00:00:00+00:00`. Every character is inside Airflow's default
  `[scheduler] allowed_run_id_pattern` `^[A-Za-z0-9_.~:+-]+$` (colon, plus and dot
  included) and there is never a `..`. The `+` must be percent-encoded when the run id is
  put in a URL path (`/dagRuns/{run_id}/clear`): that is the Airflow client's job.
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple

RUN_ID_PREFIX = "reconciler__"

# Airflow 3 DAG-run states are exactly these four. Anything else (a future state, or a
# task-level state that leaked in) is treated as "not finished": waiting is the safe side.
QUEUED = "queued"
RUNNING = "running"
SUCCESS = "success"
FAILED = "failed"
FINISHED_STATES = frozenset({SUCCESS, FAILED})


def iso(dt: datetime) -> str:
    """The one ISO-8601 form used in run ids, fingerprints and the ledger."""
    return dt.astimezone(UTC).isoformat()


def parse_time(value: str | datetime | None) -> datetime | None:
    """ISO-8601 (with `Z` or an offset) to an aware UTC datetime; naive input is taken as UTC."""
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


@functools.lru_cache(maxsize=256)
def _parse_cycle(value: str) -> datetime | None:
    # A cycle's logical date is shared by every run of the cycle: one datetime for all.
    return parse_time(value)


_intern = sys.intern
"""The strings held per run and per ledger entry (dag ids, run ids, states, fingerprint
items) repeat across 150,000 runs and entries at 50,000 pipelines: one copy of each."""

_NO_CONF: Mapping[str, Any] = MappingProxyType({})
"""The conf of a run that has none (nearly all): shared, read-only."""


def run_id_for(cycle: datetime) -> str:
    """The deterministic run id of a run the reconciler triggers for `cycle`."""
    return RUN_ID_PREFIX + iso(cycle)


def _require_aware(owner: str, name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{owner}.{name} must be timezone-aware, got naive {value!r}")


# --- observed -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DagRun:
    """One Airflow DAG run as observed through the REST API."""

    dag_id: str
    run_id: str
    logical_date: datetime | None
    state: str
    queued_at: datetime | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None
    run_type: str = "manual"
    conf: Mapping[str, Any] = field(default_factory=dict)
    """Only the `reconciler` key of the run's conf (its provenance): the rest, a user's
    payload of any size, is never needed by the loop and not held in its run cache."""
    tasks_done_at: datetime | None = None
    """The eager path: every task instance of this (still running) run succeeded or was
    skipped, confirmed through the REST API; the latest task end. None otherwise."""

    def __post_init__(self) -> None:
        # One pass over the values, the names only on the error path (150,000 runs a relist).
        for value in (self.logical_date, self.queued_at, self.start_date, self.end_date,
                      self.tasks_done_at):
            if value is not None and value.tzinfo is None:
                for name in ("logical_date", "queued_at", "start_date", "end_date",
                             "tasks_done_at"):
                    _require_aware("DagRun", name, getattr(self, name))

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> DagRun:
        """Parse one element of `GET /api/v2/dags/{id}/dagRuns` (`dag_runs[]`).

        Airflow 2's API v1 names the logical date `execution_date`; it is accepted too.
        """
        logical = data.get("logical_date", data.get("execution_date"))
        conf = data.get("conf")
        provenance = conf.get("reconciler") if isinstance(conf, Mapping) else None
        return cls(
            dag_id=_intern(str(data["dag_id"])),
            run_id=_intern(str(data["dag_run_id"])),
            logical_date=_parse_cycle(logical) if isinstance(logical, str)
            else parse_time(logical),
            state=_intern(str(data.get("state") or QUEUED)),
            queued_at=parse_time(data.get("queued_at")),
            start_date=parse_time(data.get("start_date")),
            end_date=parse_time(data.get("end_date")),
            run_type=_intern(str(data.get("run_type") or "manual")),
            conf={"reconciler": provenance} if provenance is not None else _NO_CONF,
        )


# --- fingerprint ----------------------------------------------------------------------


class FingerprintItem(NamedTuple):
    upstream: str
    run_id: str
    end_date: str
    """`iso(end_date)`, or "" if Airflow reported a finished run without one."""


EAGER = "eager:"
"""The end date of a fingerprint item decided on the eager path: `eager:<run start ISO>`.
The run had no end yet; its start names the execution, so when the same execution
closes later the downstream is not re-run (the ledger is brought up to date instead)."""


def fingerprint_item(run: DagRun) -> FingerprintItem:
    end = run.end_date
    # tuple.__new__: the NamedTuple's own __new__ costs a Python call per finished run
    return tuple.__new__(FingerprintItem, (run.dag_id, run.run_id, iso(end) if end else ""))


def execution_start(run: DagRun) -> str:
    started = run.start_date or run.queued_at or run.logical_date
    return iso(started) if started else ""


def eager_item(run: DagRun) -> FingerprintItem:
    """The item of a run that is still running but has every task done (the eager path)."""
    return FingerprintItem(run.dag_id, run.run_id, EAGER + execution_start(run))


class Fingerprint(tuple[FingerprintItem, ...]):
    """Sorted upstream items; a plain tuple, so it compares equal to the same plain tuples."""

    __slots__ = ()

    def __new__(cls, items: Iterable[Sequence[str]] = ()) -> Fingerprint:
        return super().__new__(cls, sorted(FingerprintItem(*item) for item in items))

    @classmethod
    def of(cls, runs: Iterable[DagRun]) -> Fingerprint:
        return cls(fingerprint_item(r) for r in runs)

    @classmethod
    def presorted(cls, items: Iterable[FingerprintItem]) -> Fingerprint:
        """Build from items already sorted by upstream id (plan's hot path: no re-sort)."""
        return tuple.__new__(cls, items)

    def changed(self, current: Fingerprint) -> tuple[str, ...]:
        """Upstreams recorded here whose run id or end date is different in `current`.

        Only upstreams present in both count: an upstream added to the graph later, or
        removed from it, is a change of the graph, not a re-run of data, and must not
        re-run every open cycle of the downstream.
        """
        if tuple.__eq__(self, current):
            return ()  # nearly every confirmed entry: one comparison, no dict
        now = {item.upstream: item for item in current}
        return tuple(
            item.upstream for item in self
            if item.upstream in now and now[item.upstream] != item
        )

    def to_json(self) -> list[list[str]]:
        return [list(item) for item in self]

    @classmethod
    def from_json(cls, data: Iterable[Sequence[str]],
                  shared: dict[FingerprintItem, FingerprintItem] | None = None
                  ) -> Fingerprint:
        """Read a stored fingerprint. `to_json` wrote it sorted, so its order is checked
        (one comparison per item), not sorted again: 150,000 entries are read after each
        restart. Anything but a list of `[upstream, run id, end date]` strings raises
        ValueError (the entry is quarantined). `shared`: items already read (an upstream
        run is an item of each of its downstreams' entries), to hold each one once."""
        if not isinstance(data, list | tuple):
            raise ValueError(f"a fingerprint is a list of items, not {type(data).__name__}")
        items = []
        in_order = True
        previous: FingerprintItem | None = None
        for raw in data:
            if not isinstance(raw, list | tuple) or len(raw) != 3:
                raise ValueError(f"a fingerprint item is [upstream, run id, end date], "
                                 f"not {raw!r:.80}")
            upstream, run_id, end_date = raw
            if type(upstream) is not str or type(run_id) is not str \
                    or type(end_date) is not str:
                raise ValueError(f"a fingerprint item holds strings only, not {raw!r:.80}")
            item = tuple.__new__(FingerprintItem, (_intern(upstream), _intern(run_id),
                                                   _intern(end_date)))
            if shared is not None:
                item = shared.setdefault(item, item)
            if previous is not None and item < previous:
                in_order = False  # not written by this code: sorted as before
            items.append(item)
            previous = item
        return tuple.__new__(cls, items) if in_order else cls(items)


# --- ledger ---------------------------------------------------------------------------


class ActionKind(enum.StrEnum):
    TRIGGER = "trigger"
    CLEAR = "clear"
    ADOPT = "adopt"


class LedgerState(enum.StrEnum):
    INTENT = "intent"
    """Written before the Airflow call; still there means the outcome is unknown."""
    DONE = "done"
    FAILED = "failed"
    """The Airflow call failed (not the run): the action must be decided again."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the reconciler did for one (cycle, pipeline), and on which upstream runs."""

    run_id: str
    action: ActionKind
    fingerprint: Fingerprint
    commit: str
    at: datetime
    state: LedgerState = LedgerState.DONE
    cleared_end: datetime | None = None
    """A clear: the end date of the run it re-runs. A retry whose run has another end
    date (or is queued or running again) knows the clear took effect already."""
    deployment: str | None = None
    """The deployment the run is in, when the graph declares deployments (None: the
    implicit default; entries written before deployments read so). A pipeline moved
    since has its earlier runs there (docs/design.md section 13)."""

    def __post_init__(self) -> None:
        _require_aware("LedgerEntry", "at", self.at)
        _require_aware("LedgerEntry", "cleared_end", self.cleared_end)
        # Normalise so that an entry built by hand with strs/tuples equals one read back.
        if type(self.action) is not ActionKind:
            object.__setattr__(self, "action", ActionKind(self.action))
        if type(self.state) is not LedgerState:
            object.__setattr__(self, "state", LedgerState(self.state))
        if not isinstance(self.fingerprint, Fingerprint):
            object.__setattr__(self, "fingerprint", Fingerprint(self.fingerprint))

    @property
    def confirmed(self) -> bool:
        return self.state is LedgerState.DONE

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "action": self.action.value,
            "fingerprint": self.fingerprint.to_json(),
            "commit": self.commit,
            "at": iso(self.at),
            "state": self.state.value,
            "decided": self.decided,
            **({"cleared_end": iso(self.cleared_end)} if self.cleared_end else {}),
            **({"deployment": self.deployment} if self.deployment else {}),
        }

    @property
    def decided(self) -> str:
        """`eager` when an upstream counted as done because all its tasks were, else
        `run-end` (every upstream run had ended)."""
        for item in self.fingerprint:  # a loop, not any(): plan() asks once per entry
            if item.end_date.startswith(EAGER):
                return "eager"
        return "run-end"

    @classmethod
    def from_json(cls, data: Mapping[str, Any],
                  shared: dict[FingerprintItem, FingerprintItem] | None = None) -> LedgerEntry:
        """Raises ValueError (or KeyError) on an entry this version cannot read. `shared`:
        see Fingerprint.from_json (a whole ledger read at once passes one)."""
        at = parse_time(data["at"])
        if at is None:
            raise ValueError("ledger entry without 'at'")
        action = _ACTIONS.get(data["action"])
        state = _LEDGER_STATES.get(data.get("state", "done"))
        if action is None or state is None:  # an unknown value: the Enum's own error
            action, state = ActionKind(data["action"]), LedgerState(data.get("state", "done"))
        cleared = data.get("cleared_end")
        return cls(
            run_id=_intern(str(data["run_id"])),
            action=action,
            fingerprint=Fingerprint.from_json(data.get("fingerprint", []), shared),
            commit=_intern(str(data.get("commit", ""))),
            at=at,
            state=state,
            cleared_end=parse_time(cleared) if cleared else None,
            deployment=_intern(str(data["deployment"])) if data.get("deployment") else None,
        )


# A dict lookup, not Enum's __call__: a fifth of reading an entry back.
_ACTIONS: dict[Any, ActionKind] = {k.value: k for k in ActionKind}
_LEDGER_STATES: dict[Any, LedgerState] = {s.value: s for s in LedgerState}


# --- decisions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """One call the loop makes: trigger a run, clear (re-run) a run, or adopt one.

    `adopt` calls nothing in Airflow: it only records an existing run in the ledger.
    `conf` is what a trigger sends: the pipeline's conf plus the provenance under the
    `reconciler` key (which wins over a pipeline conf key of the same name).
    """

    kind: ActionKind
    dag_id: str
    cycle: datetime
    run_id: str
    fingerprint: Fingerprint
    reason: str
    conf: Mapping[str, Any] = field(default_factory=dict)
    commit: str = ""
    cleared_end: datetime | None = None
    """A clear: the end date of the run as observed when the clear was decided."""
    deployment: str | None = None
    """Where the call goes, when the graph declares deployments (recorded in the ledger)."""

    @property
    def logical_date(self) -> datetime:
        return self.cycle

    def ledger_entry(self, *, at: datetime,
                     state: LedgerState = LedgerState.INTENT) -> LedgerEntry:
        """The ledger record of this action: `intent` before the call, `done` after it.

        After a trigger answered 409 the run is there already: record `done` all the same.
        """
        return LedgerEntry(run_id=self.run_id, action=self.kind, fingerprint=self.fingerprint,
                           commit=self.commit, at=at, state=state,
                           cleared_end=self.cleared_end, deployment=self.deployment)


class State(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"
    RUNNING = "running"
    QUEUED = "queued"
    WAITING = "waiting"
    BLOCKED = "blocked"
    DISABLED = "disabled"
    SUSPENDED = "suspended"
    NOT_IN_CYCLE = "not_in_cycle"
    TRIGGERING = "triggering"
    RERUNNING = "rerunning"


class Reason(enum.StrEnum):
    DONE = "Done"
    FAILED = "Failed"
    RUNNING = "Running"
    QUEUED = "Queued"
    WAITING_FOR = "WaitingFor"
    BLOCKED_BY = "BlockedBy"
    DISABLED = "Disabled"
    SUSPENDED = "Suspended"
    NOT_SCHEDULED = "NotScheduled"
    TRIGGERING = "Triggering"
    RERUNNING = "Rerunning"
    ADOPTING = "Adopting"


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    """Where one pipeline stands in one cycle, for `status` and the logs."""

    dag_id: str
    cycle: datetime
    state: State
    reason: Reason
    message: str
    run_id: str | None = None
    waiting_for: tuple[str, ...] = ()
    blocked_by: tuple[str, ...] = ()
    commit: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "cycle": iso(self.cycle),
            "state": self.state.value,
            "reason": self.reason.value,
            "message": self.message,
            "run_id": self.run_id,
            "waiting_for": list(self.waiting_for),
            "blocked_by": list(self.blocked_by),
            "commit": self.commit,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """One planning pass: actions in the order to apply them, statuses, open cycles.

    Order is deterministic: cycles oldest first, pipelines in the graph's topological
    order (layer by layer, each layer sorted by id).
    """

    actions: tuple[Action, ...]
    statuses: tuple[PipelineStatus, ...]
    cycles: tuple[datetime, ...]

    def status(self, dag_id: str, cycle: datetime) -> PipelineStatus | None:
        for st in self.statuses:
            if st.dag_id == dag_id and st.cycle == cycle:
                return st
        return None
