"""The simulation's time: one simulated timeline, read by two clocks.

- `SimTime.reconciler` is the Clock the loop's roles get (now, monotonic, wait, sleep).
  Its wall time can jump (an NTP step, forwards or backwards) while its monotonic time
  only moves on.
- `SimTime.airflow()` is Airflow's wall clock (the fake's `now`, and the `Date` header of
  its answers): the timeline itself. The reconciler's clock is the timeline plus its
  jumps plus a skew, so it can run ahead of or behind Airflow's (Airflow's own clock
  never jumps: its run timestamps stay ordered).

Nothing sleeps: time moves when the simulation advances it (a tick, a trickled answer).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class SimTime:
    def __init__(self, start: datetime | None = None) -> None:
        # Whole seconds: Airflow's Date header has a resolution of one second.
        self._start = (start or datetime.now(UTC)).replace(microsecond=0)
        self._elapsed = 0.0
        self.jump = 0.0
        """Seconds the reconciler's wall clock was stepped by (clock jumps)."""
        self.skew = 0.0
        """Seconds the reconciler's clock runs ahead of Airflow's (negative: behind)."""
        self._lock = threading.Lock()
        self.reconciler = ReconcilerClock(self)

    @property
    def elapsed(self) -> float:
        with self._lock:
            return self._elapsed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._elapsed += max(0.0, seconds)

    def true_now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def airflow(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def reconciler_now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed + self.jump + self.skew)

    def monotonic(self) -> float:
        with self._lock:
            return 1000.0 + self._elapsed


class ReconcilerClock:
    """The Clock protocol of reconciler.service.ports over a SimTime."""

    def __init__(self, time: SimTime) -> None:
        self._time = time

    def now(self) -> datetime:
        return self._time.reconciler_now()

    def monotonic(self) -> float:
        return self._time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self._time.advance(max(0.0, timeout))
        return event.is_set()

    def sleep(self, seconds: float) -> None:
        self._time.advance(max(0.0, seconds))
