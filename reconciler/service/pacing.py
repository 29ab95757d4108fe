"""The gate in front of Airflow: at most the pacer's limit of calls in flight at once.

The executor's pool has `--concurrency` threads (the ceiling); each takes a slot here
before it calls Airflow and gives it back with what the call saw, which the pacer
(core/pacing.py) learns from. A smaller limit makes the other threads wait, a larger one
lets them through at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from reconciler.core.pacing import Change, Pacer


class Gate:
    def __init__(self, pacer: Pacer,
                 on_change: Callable[[Change], None] | None = None) -> None:
        self.pacer = pacer
        self.on_change = on_change
        """Called (outside the lock) when the limit moves."""
        self._cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        """The most slots ever held at once (tests check the ceiling with it)."""

    @property
    def limit(self) -> int:
        return self.pacer.limit

    def slot(self) -> Slot:
        """Wait for a free slot and take it; give it back through the Slot."""
        with self._cond:
            while self.in_flight >= self.pacer.limit:
                self._cond.wait()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return Slot(self, self.pacer.ticket(), self.in_flight)

    def _end(self, ticket: int, in_flight: int, latency: float | None,
             congested: str | None) -> None:
        with self._cond:
            change = None
            if congested is not None:
                change = self.pacer.congested(ticket, congested)
            elif latency is not None:
                change = self.pacer.answered(ticket, latency, in_flight)
            self.in_flight -= 1
            self._cond.notify_all()
        if change is not None and self.on_change is not None:
            self.on_change(change)


class Slot:
    """One call's place in flight; ended once, by the first of its three ends."""

    def __init__(self, gate: Gate, ticket: int, in_flight: int) -> None:
        self._gate = gate
        self._ticket = ticket
        self._in_flight = in_flight
        """Our calls in flight when this one was sent, itself included: how long a queue
        of ours it may have waited behind."""
        self._ended = False

    def answered(self, latency: float) -> None:
        """Airflow answered (whatever it said) after `latency` seconds."""
        self._end(latency, None)

    def congested(self, why: str) -> None:
        """No answer in time, or one that says Airflow is overloaded."""
        self._end(None, why)

    def release(self) -> None:
        """Nothing was learnt (the call was not sent)."""
        self._end(None, None)

    def _end(self, latency: float | None, congested: str | None) -> None:
        if not self._ended:
            self._ended = True
            self._gate._end(self._ticket, self._in_flight, latency, congested)
