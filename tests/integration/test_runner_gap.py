"""The runner's gap between passes (service/runner.py), with a real etcd and the fake
Airflow: a wake-up after a quiet spell starts its pass at once (the event path waits for
nothing in the loop), and a burst of wake-ups still costs at most one pass per MIN_GAP."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.clock import SystemClock
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.service.loop import PassReport, Reconciler
from reconciler.service.observability import Health
from reconciler.service.runner import MIN_GAP, Runner
from tests.fakes.fake_airflow import FakeAirflow
from tests.helpers import EXAMPLE_DAGS


class RecordingClock(SystemClock):
    """The system clock, noting every wait on the stop event (the gap after a pass)."""

    def __init__(self) -> None:
        self.stop: threading.Event | None = None
        self.gaps: list[float] = []

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event is self.stop:
            self.gaps.append(timeout)
        return super().wait(event, timeout)


@pytest.fixture
def running(example_store: EtcdStore) -> Iterator[tuple[Runner, RecordingClock, list[float]]]:
    """A runner with a long interval on its own thread; yields it, its clock and the
    monotonic start of every pass."""
    with FakeAirflow(EXAMPLE_DAGS) as fake:
        api = AirflowClient(AirflowSettings(url=fake.url, username="admin",
                                            password="secret-pw", timeout=2, retries=2))
        clock = RecordingClock()
        r = Reconciler(example_store, api, LoopSettings(interval=30, lease_ttl=6), holder="r1",
                       clock=clock)
        runner = Runner(r, Health())
        starts: list[float] = []
        run_pass = r.run_pass

        def counted() -> PassReport:
            starts.append(time.monotonic())
            return run_pass()

        r.run_pass = counted  # type: ignore[method-assign]
        stop = threading.Event()
        clock.stop = stop
        thread = threading.Thread(target=runner.run_forever, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(starts) >= 1)
            yield runner, clock, starts
        finally:
            stop.set()
            runner.wake.set()
            thread.join(10)


def wait_for(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_wake_up_after_a_quiet_spell_is_not_held_back(
        running: tuple[Runner, RecordingClock, list[float]]) -> None:
    runner, clock, starts = running
    time.sleep(0.3)  # quiet: the loop waits out its 30 s interval
    gaps = len(clock.gaps)
    runner.wake.set()  # an event from the listener
    wait_for(lambda: len(starts) >= 2)
    time.sleep(0.1)  # the pass has ended and the loop waits again
    assert clock.gaps[gaps:] == []  # no coalescing sleep before or after this pass


def test_a_burst_of_wake_ups_costs_at_most_one_pass_per_gap(
        running: tuple[Runner, RecordingClock, list[float]]) -> None:
    runner, _, starts = running
    first = len(starts)
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        runner.wake.set()
        time.sleep(0.001)
    burst = starts[first:]
    assert len(burst) >= 2  # it did pass on wake-ups
    spacing = [b - a for a, b in itertools.pairwise(burst)]
    assert min(spacing) >= MIN_GAP * 0.95  # time.monotonic's resolution aside
