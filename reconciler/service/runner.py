"""The runner: when the next pass runs, and what an error means for it.

Passes run every `interval`, earlier when an etcd watch fires (`desired/head`: the graph
changed; `events/`: the Airflow listener saw a run end), later while a dependency is down
(capped exponential backoff with jitter, from `core.errors.disposition`, the one mapping
of an error to log level, backoff and readiness). Errors are logged once per change of
state, not once per pass, and never end the loop. Leadership and pulling run on their own
threads, started and stopped here.

Each pass is timed (`Health.pass_began`/`pass_ended`): one running past
`settings.pass_deadline` makes the replica unready and its keep-alive give the lease to a
standby (Leadership.stuck). A leader that etcd refuses a write gives its lease up too.
`shutdown()` (SIGTERM) releases the leader key at once from another thread, whatever the
pass is doing, and calls `overrun` if the loop has not ended within `grace` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from reconciler.adapters.store import StoreAccessDenied, StoreError
from reconciler.core.errors import disposition
from reconciler.service.loop import Reconciler
from reconciler.service.observability import Health, event
from reconciler.service.puller import Puller

MIN_GAP = 0.02
"""Seconds between the starts of two passes at least: a burst of wake-ups costs one
pass, not many; a wake-up later than that is not delayed."""


class Runner:
    def __init__(self, reconciler: Reconciler, health: Health, *,
                 puller: Puller | None = None) -> None:
        self.r = reconciler
        self.clock = reconciler.clock
        self.settings = reconciler.settings
        self.health = health
        self.puller = puller
        self.wake = threading.Event()
        self.failures = 0
        self._last_error: str | None = None
        self._watches: list[Any] = []
        self._finished = threading.Event()
        self._stopping = False
        if health.pass_deadline is None:
            health.pass_deadline = self.settings.pass_deadline
        reconciler.leadership.stuck = health.stuck
        reconciler.metrics.pass_running.set_function(health.running_for)

    # --- wake-ups ---

    def _ensure_watch(self) -> None:
        if self._watches and not any(h.broken.is_set() for h in self._watches):
            return
        self._drop_watch()
        observer, wake = self.r.observer, self.wake

        class _HeadChanged(threading.Event):
            def set(self) -> None:
                observer.head_dirty.set()
                wake.set()

        class _SuspendedChanged(threading.Event):
            def set(self) -> None:
                observer.suspended_dirty.set()
                wake.set()

        class _ReconcileNow(threading.Event):
            def set(self) -> None:
                observer.cache.listed_at = None  # `reconciler reconcile`: relist as well
                wake.set()

        # A watch (re)made now has missed whatever changed while there was none.
        observer.head_dirty.set()
        observer.suspended_dirty.set()
        store = self.r.store
        self._watches = [store.watch([store.head_key()], _HeadChanged()),
                         store.watch([store.events_prefix()], wake,
                                     on_put=observer.on_event),
                         store.watch([store.suspended_prefix()], _SuspendedChanged()),
                         store.watch([store.control_key("reconcile")], _ReconcileNow())]

    def _drop_watch(self) -> None:
        for handle in self._watches:
            with contextlib.suppress(StoreError):
                handle()
        self._watches = []

    # --- one turn ---

    def turn(self) -> float:
        """One pass and what follows from it; the seconds to wait before the next."""
        started = self.clock.monotonic()
        ok = False
        self.health.pass_began()
        try:
            self._ensure_watch()
            self.r.run_pass()
        except Exception as exc:
            delay = self._failed(exc)
        else:
            ok = True
            delay = self.settings.interval
            if self.failures or self._last_error:
                event("pass succeeds again", after_failures=self.failures)
            self.failures = 0
            self._last_error = None
            self.health.passed()
        finally:
            self.health.pass_ended()
            self.r.metrics.pass_seconds.observe(self.clock.monotonic() - started)
            self.health.beat()
            self._readiness(ok)
        return delay

    def _failed(self, exc: BaseException) -> float:
        self.failures += 1
        how = disposition(exc, self.failures, interval=self.settings.interval)
        self.r.metrics.errors.labels(how.dependency, how.kind).inc()
        if how.kind == "lost-leadership":
            self.r.leadership.lost(str(exc))
            self.failures = 0
            return MIN_GAP
        text = f"{how.kind}:{exc}"
        if text != self._last_error:
            if how.kind == "bug":
                event("unexpected error in a pass", logging.ERROR, exc_info=True,
                      error=repr(exc))
            else:
                event(f"{how.dependency} problem, retrying", how.level, error=str(exc),
                      next=how.kind, retry_in=round(how.delay, 1))
            self._last_error = text
        if isinstance(exc, StoreAccessDenied) and self.r.leadership.is_leader():
            # A leader that may not write cannot act: a standby that can should lead.
            self.r.leadership.give_up(f"etcd refused a write: {exc}")
        if how.unready:
            self.health.unready(how.dependency, str(exc))
        if how.dependency == "etcd":
            self._drop_watch()
        return how.delay

    def _readiness(self, ok: bool) -> None:
        """Each dependency from its last real contact, not from the last pass's luck."""
        for name, client in (("etcd", self.r.store), ("airflow", self.r.api)):
            contact = getattr(client, "last_contact", None)
            failure = getattr(client, "last_failure", None)
            if failure is not None and (contact is None or failure[0] >= contact):
                self.health.unready(name, failure[1])
            elif ok and contact is not None:
                self.health.ready(name)
        cannot_lead = self.r.leadership.cannot_lead
        if cannot_lead is not None:
            self.health.unready("leadership", cannot_lead)
        else:
            self.health.ready("leadership")
        self.health.leader = self.r.leadership.is_leader()
        if self.health.leader and getattr(self.r.api, "last_contact", None) is None:
            # A leader is ready once it has really talked to Airflow, not before.
            self.health.unready("airflow", "not contacted yet")
        self.r.metrics.ready.set(1 if self.health.is_ready else 0)

    # --- the loop ---

    def shutdown(self, stop: threading.Event, *, grace: float,
                 overrun: Callable[[], None]) -> None:
        """Stop the loop (from a signal handler): the leader key is released now, on a
        thread of its own, whatever the pass is doing; `overrun()` is called if the loop
        has not ended `grace` seconds later (a call that will not return)."""
        stop.set()
        self.wake.set()
        if self._stopping:
            return
        self._stopping = True
        threading.Thread(target=self.r.leadership.stop, name="resign", daemon=True).start()

        def enforce() -> None:
            if not self._finished.wait(grace):
                overrun()

        threading.Thread(target=enforce, name="stop-deadline", daemon=True).start()

    def run_forever(self, stop: threading.Event) -> None:
        self.health.start()
        # Elected: act at once rather than at the end of the current wait.
        self.r.leadership.on_change = lambda leading: self.wake.set()
        self.r.leadership.start()
        if self.puller is not None:
            self.puller.is_leader = self.r.leadership.is_leader
            self.puller.on_synced = self.wake.set
            self.puller.start()
        try:
            while not stop.is_set():
                self.wake.clear()
                began = self.clock.monotonic()
                delay = self.turn()
                if stop.is_set():
                    break
                self.clock.wait(self.wake, max(MIN_GAP, delay))
                # A burst of wake-ups costs one pass per MIN_GAP; a wake-up after a quiet
                # spell starts its pass at once (the event path waits for nothing here).
                rest = MIN_GAP - (self.clock.monotonic() - began)
                if rest > 0:
                    self.clock.wait(stop, rest)
        finally:
            self.r.leadership.stop()  # first: a standby takes over while we tidy up
            self._drop_watch()
            if self.puller is not None:
                self.puller.stop()
            self.r.close()
            self._finished.set()
