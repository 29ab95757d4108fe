"""One error hierarchy, ordered by what happens next (kopf's TemporaryError/PermanentError).

Every adapter's errors inherit from one of these bases, so the service never sorts errors
by their text or their module:

- `RetryLater`: a dependency did not answer, or answered 5xx; retried with capped
  exponential backoff and jitter (or after `delay`, if the error knows better).
- `NeedsHuman`: credentials refused, a permission missing, a DAG absent in Airflow, a
  login page instead of the API; retried slowly, because a human will fix it without
  restarting us, and readiness says what to fix.
- `LostLeadership`: a fenced write found another holder (or none); stop acting at once.
- `BadStoredData`: a value in etcd this version cannot read; quarantined by key (one log
  line naming it), never a stop.

`disposition()` is the one place that maps an error to its log level, backoff and
readiness. Everything else (an unexpected exception) is a bug: logged with its traceback,
retried with backoff, never a crash of the loop.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass


class ReconcilerError(Exception):
    """Base of every expected error. `dependency` names what failed: etcd, airflow, git."""

    dependency = "internal"

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
        """Seconds to wait before trying again, when the error knows (else: backoff)."""


class RetryLater(ReconcilerError):
    """Transient: the same call may well succeed after a while."""


class NeedsHuman(ReconcilerError):
    """Permanent until someone changes configuration, credentials or Airflow."""


class LostLeadership(ReconcilerError):
    """This replica is not the leader any more: it must not act until elected again."""

    dependency = "etcd"


class BadStoredData(ReconcilerError):
    """A stored value that cannot be read; `key` names it so an operator can look."""

    dependency = "etcd"

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"unreadable value at {key}: {why}")
        self.key = key
        self.why = why


class ConfigError(NeedsHuman):
    """A setting that cannot work (an interval of 0, missing credentials): exit 2 at start."""

    dependency = "config"


MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
HUMAN_BACKOFF = 30.0
"""A NeedsHuman error is retried at most this often: the fix comes from outside."""


@dataclass(frozen=True)
class Disposition:
    """What the runner does with an error: log at `level`, wait `delay` s, and whether the
    dependency counts as unready (readiness) or the pass is simply not the leader's."""

    kind: str
    """retry | human | lost-leadership | bad-data | bug"""
    dependency: str
    level: int
    delay: float
    unready: bool


def backoff(failures: int, base: float, *, cap: float = MAX_BACKOFF,
            rand: random.Random | None = None) -> float:
    """Capped exponential backoff with "equal jitter": half fixed, half random, so that
    replicas that failed together do not retry together."""
    rng = rand or random
    step = min(cap, max(MIN_BACKOFF, base) * (2 ** max(0, min(failures - 1, 16))))
    return step / 2 + rng.uniform(0, step / 2)


def disposition(exc: BaseException, failures: int, *, interval: float,
                rand: random.Random | None = None) -> Disposition:
    """The one mapping from an error to log level, backoff and readiness.

    `failures` counts consecutive failed passes (1 for the first); `interval` is the
    loop's normal pause, the base of the backoff.
    """
    dependency = getattr(exc, "dependency", "internal")
    explicit = getattr(exc, "delay", None)
    if isinstance(exc, LostLeadership):
        # Not an outage: campaign again at once, nothing to back off from.
        return Disposition("lost-leadership", dependency, logging.WARNING, 0.0, False)
    if isinstance(exc, BadStoredData):
        return Disposition("bad-data", dependency, logging.ERROR,
                           explicit if explicit is not None else interval, False)
    if isinstance(exc, NeedsHuman):
        delay = max(HUMAN_BACKOFF, backoff(failures, interval, rand=rand))
        return Disposition("human", dependency, logging.ERROR,
                           explicit if explicit is not None else delay, True)
    if isinstance(exc, RetryLater):
        delay = backoff(failures, interval, rand=rand)
        return Disposition("retry", dependency, logging.WARNING,
                           explicit if explicit is not None else delay, True)
    return Disposition("bug", "internal", logging.ERROR,
                       backoff(failures, interval, rand=rand), False)
