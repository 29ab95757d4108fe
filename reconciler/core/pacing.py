"""How many Airflow calls to keep in flight: a congestion window, as TCP keeps one.

Airflow's width depends on its database: an Airflow 3 API server on SQLite stalls on
concurrent writes (a call waits out SQLite's 20 s lock, then times out), one on
PostgreSQL takes many at once. The pacer learns it from the answers:

- It starts at 1, so a default user on SQLite never stalls Airflow on the first fan-out.
- Slow start: while nothing went wrong yet, the limit doubles after each window of fast
  answers (a window: `limit` answers), 1, 2, 4, 8, so PostgreSQL has its width after a
  handful of answers.
- Then additive increase: +1 per window of fast answers.
- Multiplicative decrease: a call that got no answer (timeout, 5xx, 429) or a slow answer
  halves the limit (floor 1), once per window: the other calls sent under the same limit
  saw the same congestion, they do not halve it again.
- Queueing is not congestion. An answer slower than `slow_factor` x the smallest recent
  latency (plus `slack`) is *queued* when our own calls in flight explain it: an API
  server that answers one call at a time answers the k-th of k sent together after k
  service times. A queued answer holds the limit (Airflow takes no more width, and loses
  none); only an answer slower than `slow_factor` x the baseline x the calls in flight
  (plus `slack`) is slow. On a busy machine, PostgreSQL's API server answered 0.3-0.7 s
  with 8 in flight against 0.05 s alone: counted as congestion, that halved the limit 49
  times in one wide fan-out and queued 200 triggers at 1.7 a second.
- A level that failed is probed again only after `patience` windows at the level below,
  which doubles each time the probe fails (up to `max_patience`): SQLite, which fails at
  2, costs one timeout now and then, not one per window.
- Never above `ceiling` (--concurrency).

Pure: no clock, no threads. The caller measures and holds the lock (service/pacing.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

START = 1
"""1: the first fan-out of a default user (SQLite) must not stall Airflow; slow start
gives PostgreSQL 8 after 7 answers."""


@dataclass(frozen=True)
class Change:
    """The limit moved from `old` to `new` (`why`: what the answers said)."""

    old: int
    new: int
    why: str


class Pacer:
    def __init__(self, ceiling: int, *, start: int = START, slow_factor: float = 2.0,
                 slack: float = 0.25, history: int = 32, max_patience: int = 64) -> None:
        if ceiling < 1:
            raise ValueError(f"the ceiling must be at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.limit = max(1, min(start, ceiling))
        self.slow_factor = slow_factor
        self.slack = slack
        """Seconds above `slow_factor` x the baseline that are noise (a busy host, a GC
        pause), not congestion."""
        self.max_patience = max_patience
        self.epoch = 0
        """Bumped at each decrease: a call sent in an earlier epoch (`ticket`) cannot
        decrease the limit again."""
        self.slow_start = True
        self.failed_at: int | None = None
        """The lowest level that last failed; growing to it takes `patience` windows."""
        self.patience = 1
        self._good = 0
        self._latencies: deque[float] = deque(maxlen=history)

    @property
    def baseline(self) -> float | None:
        """The smallest recent latency: Airflow's answer time without a queue."""
        return min(self._latencies) if self._latencies else None

    def ticket(self) -> int:
        """Taken when a call is sent; given back with its outcome."""
        return self.epoch

    def answered(self, ticket: int, latency: float, in_flight: int = 1) -> Change | None:
        """An answer came after `latency` seconds (any answer, a 404 too: Airflow was
        not too busy to give it) to a call sent with `in_flight` calls of ours in flight,
        itself included."""
        baseline = self.baseline
        self._latencies.append(max(0.0, latency))
        if baseline is not None and latency > self.slow_factor * baseline + self.slack:
            if latency > self.slow_factor * baseline * max(1, in_flight) + self.slack:
                return self._decrease(ticket, f"slow answer ({latency:.2f} s with "
                                              f"{in_flight} in flight, usually "
                                              f"{baseline:.2f} s alone)")
            return None  # queued behind our own calls: hold
        self._good += 1
        if self._good >= self.limit:
            self._passed()
        if self.limit >= self.ceiling:
            self._good = min(self._good, self.limit)
            return None
        if self._good < self.limit * (self.patience if self._probing() else 1):
            return None
        old = self.limit
        self.limit = min(self.ceiling, old * 2 if self.slow_start else old + 1)
        self._good = 0
        return Change(old, self.limit, "fast answers")

    def congested(self, ticket: int, why: str) -> Change | None:
        """No answer came in time, or Airflow said it is overloaded (5xx, 429)."""
        return self._decrease(ticket, why)

    def _probing(self) -> bool:
        """Is the next step onto (or past) the level that failed last?"""
        return self.failed_at is not None and self.limit + 1 >= self.failed_at

    def _passed(self) -> None:
        """A full window went well at the level that had failed: it works now."""
        if self.failed_at is not None and self.limit >= self.failed_at:
            self.failed_at = None
            self.patience = 1

    def _decrease(self, ticket: int, why: str) -> Change | None:
        self._good = 0
        if ticket != self.epoch:
            return None  # this window already backed off
        self.slow_start = False
        old = self.limit
        if old == 1:
            return None  # nothing to give back: Airflow itself is the problem
        self.epoch += 1
        if self.failed_at is not None and old <= self.failed_at:
            self.patience = min(self.max_patience, self.patience * 2)
        else:
            self.patience = 2
        self.failed_at = old
        self.limit = max(1, old // 2)
        return Change(old, self.limit, why)
