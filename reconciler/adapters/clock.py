"""The real clock: wall time for dates, monotonic time for intervals and deadlines.

Everything in the service takes a `Clock` (reconciler.service.ports) instead of calling
`time` or `datetime.now`, so tests drive time with a fake clock and never sleep.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Ticker(Protocol):
    """What an adapter needs of a clock: intervals and deadlines (`monotonic`) and waits
    between retries (`sleep`). Every `Clock` of the service is one; the fault simulation
    injects its simulated clock so that real time never leaks into a seed."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until `event` is set or `timeout` seconds passed; True when it was set."""
        return event.wait(max(0.0, timeout))

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))
