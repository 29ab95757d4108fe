"""A fake clock for the service's roles: time moves only when a test says so (or when a
role waits on it), so tests never sleep. Wall time starts at a given instant (default:
the real now, so real services that check dates stay happy), monotonic time at 1000."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class FakeClock:
    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._mono = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._mono += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Returns at once: set events count, else the timeout passes in fake time."""
        if event.is_set():
            return True
        self.advance(max(0.0, timeout))
        return event.is_set()

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
