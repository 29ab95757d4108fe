"""The executor: intent -> Airflow call -> result, for each action; outcomes as values.

Per action:
1. Start only with enough lease left (`min_lease`): the call must end while we lead.
2. Record the intent in the ledger (ledger.py: in the loop's memory first, then in etcd
   in a transaction that compares the leader key): whatever etcd answers, the next pass
   plans with this intent, unconfirmed.
3. Call Airflow, with a deadline shorter than the lease left.
   - trigger: deterministic run id; a repeat answers 409 and is adopted.
   - clear: not idempotent in Airflow, so never sent twice for one re-run. If the ledger
     already holds this clear's intent (an earlier attempt whose answer was lost, a
     crash, another leader), the run is read first: if it restarted since the recorded
     end date, the clear took effect and is not sent again.
4. Record the result (fenced again; memory follows only what etcd confirmed).

Every answer Airflow gives becomes an `Outcome`: an error of the hierarchy
(core/errors.py) for one it refuses, cannot be reached for, or answers with something
that is not the run asked for (a 200 without a run id, a list, HTML); one bad answer
never drops the other outcomes of a pass.

A crash anywhere in between is repaired by the next pass: the plan decides again from
Airflow's state and the intent. Independent actions of one pass (a plan's actions never
depend on each other: a downstream waits while a trigger of its upstream is planned) go
out concurrently, so a fan-out to N downstreams costs one round trip, not N: as many at
a time as Airflow answers promptly (the pacer, core/pacing.py, behind a gate,
service/pacing.py), at most `concurrency` (--concurrency, the ceiling).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.adapters.airflow import (
    AirflowDagAway,
    AirflowError,
    AirflowNotFound,
    AirflowRejected,
    AirflowUnavailable,
    restarted,
)
from reconciler.adapters.store import StoreError
from reconciler.core.errors import LostLeadership, ReconcilerError, disposition
from reconciler.core.pacing import Change, Pacer
from reconciler.core.state import (
    Action,
    ActionKind,
    DagRun,
    LedgerEntry,
    LedgerState,
    iso,
)
from reconciler.service.leadership import Leadership
from reconciler.service.ledger import Ledger
from reconciler.service.observability import Metrics, event
from reconciler.service.pacing import Gate, Slot
from reconciler.service.ports import AirflowApi, Clock

DAG_AWAY_TRIES = 4
"""A trigger's 404 for a DAG that took runs here before is retried this many times at the
normal backoff (about a minute in all at the default interval: Airflow parses a file again
every 30 s) before it waits for a human (30 s between tries)."""

FAILPOINT_ENV = "RECONCILER_FAILPOINT"
"""Test-only (as etcd's gofail): `after-intent:<kind>:<dag_id>` kills the process between
recording an intent and calling Airflow. Unset in production."""


@dataclass(frozen=True)
class Outcome:
    """What became of one action. `entry` is what the ledger holds now (None: unchanged),
    `run` the run as Airflow last answered it (None: not asked)."""

    action: Action
    result: str
    """triggered | adopted-409 | cleared | already-cleared | adopted | deferred | failed"""
    entry: LedgerEntry | None = None
    run: DagRun | None = None
    error: ReconcilerError | None = None

    @property
    def took_effect(self) -> bool:
        return self.result not in ("deferred", "failed")


class Executor:
    def __init__(self, ledger: Ledger, api: AirflowApi, leadership: Leadership, clock: Clock,
                 *, concurrency: int = 8, call_deadline: float = 10.0,
                 metrics: Metrics | None = None, interval: float = 5.0,
                 margin: float = 1.0, failpoint: str | None = None) -> None:
        self.ledger = ledger
        self.api = api
        self.leadership = leadership
        self.clock = clock
        self.concurrency = max(1, concurrency)
        self.call_deadline = call_deadline
        self.margin = margin
        self.min_lease = call_deadline + margin
        """Lease an action needs left to start: its call's deadline plus the result write."""
        self.metrics = metrics
        self.interval = interval
        self.failpoint = os.environ.get(FAILPOINT_ENV, "") if failpoint is None else failpoint
        self._retry_after: dict[tuple[datetime, str], tuple[float, int]] = {}
        self._ran_here: set[tuple[str | None, str]] = set()
        """(deployment, dag_id) that Airflow answered with a run of ours in this process."""
        self._ran_here_read = False
        """Whether the ledger's confirmed entries (another replica's runs) were added to it."""
        self._pool: ThreadPoolExecutor | None = None
        self._stall_hinted = False
        self.pacer = Pacer(self.concurrency)
        """How many Airflow calls to keep in flight; `concurrency` is its ceiling."""
        self.gate = Gate(self.pacer, self._limit_moved)
        if metrics is not None:
            metrics.airflow_concurrency.set_function(lambda: float(self.pacer.limit))

    @property
    def holder(self) -> str:
        return self.leadership.holder

    def execute(self, actions: Sequence[Action]) -> list[Outcome]:
        """Apply `actions` (independent of each other); outcomes in the same order.

        Raises LostLeadership when a fenced write found another holder: the remaining
        outcomes are of no use to a replica that is not the leader."""
        if not actions:
            return []
        # What the ledger held when the pass planned, before this pass's intents.
        ledger = self.ledger.entries()
        previous = [ledger.get((a.cycle, a.dag_id)) for a in actions]
        limit = self.pacer.limit
        if len(actions) == 1 or self.concurrency == 1:
            outcomes = [self._guarded(a, p) for a, p in zip(actions, previous, strict=True)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="act")
            futures = [self._pool.submit(self._guarded, a, p)
                       for a, p in zip(actions, previous, strict=True)]
            outcomes = [f.result() for f in futures]
        self._hint_if_stalled(outcomes, limit)
        lost = next((o.error for o in outcomes if isinstance(o.error, LostLeadership)), None)
        if lost is not None:
            raise lost
        return outcomes

    def _hint_if_stalled(self, outcomes: Sequence[Outcome], limit: int) -> None:
        """Say once when the calls went unanswered one at a time: the pacer backs off
        from a stall of concurrent calls (an Airflow on SQLite), but at 1 there is nothing
        left to give back, and Airflow itself (its API server, its database) is stuck."""
        sent = [o for o in outcomes if o.result != "deferred"]
        if self._stall_hinted or limit > 1 or len(sent) < 2 or not all(
                isinstance(o.error, AirflowUnavailable) and o.error.no_answer for o in sent):
            return
        self._stall_hinted = True
        event("Airflow left every call of this pass unanswered, one at a time",
              logging.WARNING, calls=len(sent),
              hint="check Airflow's API server and its database (on SQLite: is another "
                   "process holding its lock?)")

    def _limit_moved(self, change: Change) -> None:
        """Log a halving (once per change, not per call); growth shows in the gauge."""
        level = logging.INFO if change.new < change.old else logging.DEBUG
        event("Airflow calls in flight: limit changed", level, limit=change.new,
              was=change.old, why=change.why, ceiling=self.concurrency)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- one action ---

    def _guarded(self, action: Action, previous: LedgerEntry | None) -> Outcome:
        """`_one`, whose every failure is an outcome: a bug in one action (logged with
        its traceback) must not drop the outcomes of the others in the same pass."""
        try:
            return self._one(action, previous)
        except Exception as exc:
            logging.getLogger("reconciler").exception(
                "unexpected error in action %s %s", action.kind.value, action.dag_id)
            return self._failed(action, ReconcilerError(
                f"unexpected {type(exc).__name__} in {action.kind.value} of "
                f"{action.dag_id}: {exc}"))

    def _one(self, action: Action, previous: LedgerEntry | None) -> Outcome:
        key = (action.cycle, action.dag_id)
        mono = self.clock.monotonic()
        retry = self._retry_after.get(key)
        if retry is not None and retry[0] > mono:
            return Outcome(action, "deferred")
        if action.kind is ActionKind.ADOPT:
            return self._act(action, previous, None)  # nothing is sent to Airflow
        slot = self.gate.slot()  # before the lease check: waiting for it takes time
        try:
            return self._act(action, previous, slot)
        finally:
            slot.release()  # unless the call already gave it back with what it saw

    def _act(self, action: Action, previous: LedgerEntry | None,
             slot: Slot | None) -> Outcome:
        left = self.leadership.remaining()
        if left < self.min_lease:
            # Not enough lease to finish the call: the next pass, after a renewal, will.
            return Outcome(action, "deferred")
        now = self.clock.now()
        try:
            self.ledger.intend(self.holder, action.cycle, action.dag_id,
                               action.ledger_entry(at=now, state=LedgerState.INTENT))
        except LostLeadership as exc:
            return Outcome(action, "failed", error=exc)
        except StoreError as exc:
            return self._failed(action, exc, write_failed=False)
        if self.failpoint == f"after-intent:{action.kind.value}:{action.dag_id}":
            os.kill(os.getpid(), signal.SIGKILL)  # the crash tests: die right here
        budget = min(self.call_deadline, self.leadership.remaining() - self.margin)
        try:
            with self.api.deadline_of(max(0.1, budget)), self._paced(slot):
                result, raw = self._call(action, previous)
            run = _run_of(action, raw)
        except ReconcilerError as exc:
            return self._failed(action, exc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A run read back (a retried clear looks first) that is not a run.
            return self._failed(action, AirflowRejected(
                f"{action.kind.value} of DAG {action.dag_id!r} run {action.run_id!r}: "
                f"Airflow answered something that is not a run ({type(exc).__name__}: "
                f"{exc})"))
        entry = action.ledger_entry(at=now, state=LedgerState.DONE)
        try:
            self.ledger.settle(self.holder, action.cycle, action.dag_id, entry)
        except LostLeadership as exc:
            return Outcome(action, "failed", run=run, error=exc)
        except StoreError as exc:
            # The call took effect; the intent stays (in etcd and in memory, unconfirmed)
            # and the next pass adopts the run.
            return Outcome(action, "failed", run=run, error=exc)
        self._retry_after.pop((action.cycle, action.dag_id), None)
        self._ran_here.add((action.deployment, action.dag_id))
        if self.metrics is not None:
            self.metrics.actions.labels(action.kind.value, "ok").inc()
        event(result, action=action.kind.value, dag_id=action.dag_id, cycle=iso(action.cycle),
              run_id=action.run_id, reason=action.reason)
        return Outcome(action, result, entry=entry, run=run)

    @contextlib.contextmanager
    def _paced(self, slot: Slot | None) -> Iterator[None]:
        """Give the slot back, once the call ended, with what it says of Airflow's load."""
        if slot is None:
            yield
            return
        started = self.clock.monotonic()
        try:
            yield
        except AirflowError as exc:
            why = _congestion(exc)
            if why is not None:
                slot.congested(why)
            else:
                slot.answered(self.clock.monotonic() - started)
            raise
        slot.answered(self.clock.monotonic() - started)

    def _call(self, action: Action, previous: LedgerEntry | None
              ) -> tuple[str, dict[str, Any] | None]:
        if action.kind is ActionKind.TRIGGER:
            raw, created = self.api.trigger(action.dag_id, action.run_id, action.logical_date,
                                            action.conf)
            return ("triggered" if created else "adopted-409"), raw
        if action.kind is ActionKind.CLEAR:
            if (previous is not None and previous.action is ActionKind.CLEAR
                    and previous.run_id == action.run_id
                    and previous.state is not LedgerState.DONE
                    and previous.cleared_end == action.cleared_end):
                # This very clear was attempted before and its outcome is unknown.
                seen = self.api.get_run(action.dag_id, action.run_id)
                if seen is not None and restarted(seen, action.cleared_end):
                    return "already-cleared", seen
            raw, sent = self.api.clear(action.dag_id, action.run_id,
                                       cleared_end=action.cleared_end)
            return ("cleared" if sent else "already-cleared"), raw
        return "adopted", None

    def _failed(self, action: Action, exc: ReconcilerError, *,
                write_failed: bool = True) -> Outcome:
        key = (action.cycle, action.dag_id)
        failures = self._retry_after.get(key, (0.0, 0))[1] + 1
        exc = self._dag_away(action, exc, failures)
        how = disposition(exc, failures, interval=self.interval)
        self._retry_after[key] = (self.clock.monotonic() + how.delay, failures)
        if self.metrics is not None:
            self.metrics.actions.labels(action.kind.value, "error").inc()
        event("action failed", how.level, action=action.kind.value, dag_id=action.dag_id,
              cycle=iso(action.cycle), run_id=action.run_id, error=str(exc), next=how.kind,
              retry_in=round(how.delay, 1))
        entry = None
        if write_failed:
            entry = action.ledger_entry(at=self.clock.now(), state=LedgerState.FAILED)
            try:
                self.ledger.settle(self.holder, action.cycle, action.dag_id, entry)
            except StoreError:
                entry = None  # the intent stays: the next pass decides from Airflow's state
        return Outcome(action, "failed", entry=entry, error=exc)

    def _dag_away(self, action: Action, exc: ReconcilerError, failures: int
                  ) -> ReconcilerError:
        """A trigger's 404 for a DAG that ran here before: most likely Airflow is parsing
        its file again (a parse killed for the timeout takes the DAG away until the next
        one), so the first few tries wait the normal backoff, not a human's 30 s."""
        if (not isinstance(exc, AirflowNotFound) or action.kind is not ActionKind.TRIGGER
                or failures > DAG_AWAY_TRIES or not self._ran_before(action)):
            return exc
        return AirflowDagAway(f"{exc} (it took runs here before: its file is most likely "
                              f"being parsed again; try {failures} of {DAG_AWAY_TRIES} at "
                              f"the normal backoff)")

    def _ran_before(self, action: Action) -> bool:
        if not self._ran_here_read:
            # This replica may be new: the ledger's confirmed entries are runs taken too.
            self._ran_here_read = True
            self._ran_here.update((e.deployment, key[1])
                                  for key, e in self.ledger.entries().items() if e.confirmed)
        return (action.deployment, action.dag_id) in self._ran_here


def _congestion(exc: AirflowError) -> str | None:
    """What a failed call says of Airflow's load; None: it answered (a 404, a 409, ...).
    An Airflow that cannot be reached at all brings the limit down too: it grows back
    once Airflow answers."""
    if isinstance(exc, AirflowUnavailable):
        return "no answer in time" if exc.no_answer else "unavailable"
    if isinstance(exc, AirflowRejected) and " answered 429" in str(exc):
        return "429 Too Many Requests"
    return None


def _run_of(action: Action, raw: Any) -> DagRun | None:
    """The run Airflow answered with, checked: an answer that is not this run (no run id,
    another run's, fields of the wrong type) is AirflowRejected, not a crash of the pass.
    The call may still have taken effect: the intent stays unconfirmed and the next pass
    decides from the run as listed."""
    if action.kind is ActionKind.ADOPT:
        return None  # nothing was asked of Airflow
    what = f"{action.kind.value} of DAG {action.dag_id!r} run {action.run_id!r}"
    if not isinstance(raw, Mapping):
        raise AirflowRejected(f"{what} answered a {type(raw).__name__}, not a run")
    try:
        run = DagRun.from_api({**raw, "dag_id": action.dag_id})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        missing = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise AirflowRejected(f"{what} answered something that is not a run ({missing})"
                              ) from None
    if run.run_id != action.run_id:
        raise AirflowRejected(f"{what} answered run {run.run_id!r}, not the one asked for")
    return run
