"""Leadership: campaign for the `leader` key and keep its lease alive, on its own schedule.

The lease is refreshed every TTL/3 by a thread of its own, however long a pass, an Airflow
call or a backoff takes: a slow Airflow never costs the lease. The remaining lease is
measured locally and conservatively: from the moment a refresh was *sent* plus the TTL
etcd granted, so this replica stops believing it leads before etcd lets the key go.
An action starts only with `min_lease` left (the executor asks `remaining()`), and every
ledger write compares the leader key besides (fencing), so a deposed replica that has not
noticed yet cannot record anything.

`tick()` is one step (campaign or keep-alive) and returns when the next is due: tests
drive it with a fake clock; `start()` runs it on a thread for the real loop.

Keeping the lease is not enough to lead: the keep-alive asks `stuck()` (the runner's
health: a pass running past its deadline) and gives the lease up rather than renewing it
for a replica that cannot finish a pass, and campaigns again only once a pass ended. A
replica that may not write the leader key (a read-only etcd user; checked by campaigning,
and as a standby by a transaction that compares false, so nothing is written) says so
in `cannot_lead`, which makes it unready; a leader refused a write gives up its lease
(`give_up`) and waits one TTL before campaigning again. Every failed step is reported to
`on_error` (the errors metric).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from reconciler.adapters.store import StoreError
from reconciler.core.errors import NeedsHuman
from reconciler.service.observability import event
from reconciler.service.ports import Clock, Store

PROBE_EVERY = 30.0
"""Seconds between checks that this replica may write the leader key (a standby: could
it lead? the leader: may it still?)."""


class Leadership:
    def __init__(self, store: Store, holder: str, ttl: int, clock: Clock, *,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.holder = holder
        self.ttl = ttl
        self.clock = clock
        self.on_change = on_change
        self.lease: Any = None
        self.term = 0
        """Bumped on every election: a new term means the ledger must be read again."""
        self._expires = 0.0
        self._next = 0.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._poke = threading.Event()
        """Set by the watch on the leader key (and by stop): take the next step now."""
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self.last_error: str | None = None
        self.stuck: Callable[[], str | None] = lambda: None
        """Why this replica cannot finish a pass (the runner's health), or None."""
        self.on_error: Callable[[BaseException], None] | None = None
        """Told of every failed step (the errors metric)."""
        self.cannot_lead: str | None = None
        """Why this replica may not lead (etcd refused it the leader key), or None."""
        self._hold_until = 0.0
        self._next_probe = 0.0
        self.probe_every = PROBE_EVERY

    # --- what the other roles ask ---

    def remaining(self) -> float:
        """Seconds of lease this replica can still count on (0 when not the leader).

        Lock-free on purpose: it must answer at once while a refresh is in flight."""
        lease, expires = self.lease, self._expires
        if lease is None:
            return 0.0
        return max(0.0, expires - self.clock.monotonic())

    def is_leader(self) -> bool:
        return self.remaining() > 0

    # --- one step ---

    def tick(self) -> float:
        """Campaign (standby) or keep the lease alive (leader); seconds until the next step."""
        with self._lock:
            sent = self.clock.monotonic()
            stuck = self.stuck()
            if stuck is not None:
                # Renewing the lease of a replica whose passes do not end would keep every
                # standby out: give it up, and stand by until a pass ends.
                self._give_up(f"{stuck}: giving the lease to a standby")
                return self._schedule(sent, min(1.0, self.ttl / 6))
            if self.lease is None and sent < self._hold_until:
                return self._schedule(sent, min(1.0, self._hold_until - sent))
            try:
                if self.lease is not None:
                    left = self.store.refresh(self.lease)
                    if left > 0:
                        self._expires = sent + left
                        self.last_error = None
                        self._probe(sent)  # a leader that may no longer write must not lead
                        return self._schedule(sent, self.ttl / 3)
                    self._lose("the lease expired")
                if self.store.leader() is not None:
                    self._probe(sent)
                    return self._schedule(sent, self._standby_poll())
                lease = self.store.campaign(self.holder, self.ttl)
                self._next_probe = sent + self.probe_every
                self.cannot_lead = None
                if lease is None:
                    return self._schedule(sent, self._standby_poll())
                self.lease = lease
                self._expires = sent + self.ttl
                self.term += 1
                self.last_error = None
                event("became leader", holder=self.holder, term=self.term)
                self._changed(True)
                return self._schedule(sent, self.ttl / 3)
            except StoreError as exc:
                if self.on_error is not None:
                    self.on_error(exc)
                if isinstance(exc, NeedsHuman):
                    # Permission denied (a read-only user, a revoked grant): no retry
                    # will cure it, and a leader that cannot write keeps standbys out.
                    self.cannot_lead = f"etcd refuses this replica the leader key: {exc}"
                    if self.lease is not None:
                        self._give_up(f"etcd refused a write: {exc}")
                        self._hold_until = sent + self.ttl
                if self.last_error != str(exc):
                    event("leader lease not renewed, retrying", logging.WARNING,
                          holder=self.holder, error=str(exc))
                self.last_error = str(exc)
                if self.lease is not None and self.remaining() <= 0:
                    self._lose(f"the lease ran out while etcd was unreachable ({exc})")
                # Retry soon: the lease left is what we have to renew it in.
                return self._schedule(sent, min(1.0, self.ttl / 6))

    def _probe(self, now: float) -> None:
        """May this replica write the leader key (a standby: could it lead if the key were
        free; the leader: may it still write)? A transaction whose comparison is always
        false: etcd checks the permission of its put all the same, and writes nothing."""
        check = getattr(self.store, "put_if_revision", None)
        if check is None or now < self._next_probe:
            return
        self._next_probe = now + self.probe_every
        check(self.store.leader_key(), -1, b"")
        self.cannot_lead = None

    def _give_up(self, why: str) -> None:
        if self.lease is None:
            return
        lease = self.lease
        self._lose(why)
        # Revoked at once so a standby takes over now; if etcd refuses (a user whose write
        # permission was revoked may not revoke either), it lapses within its TTL, no
        # longer refreshed.
        with contextlib.suppress(StoreError):
            self.store.resign(lease)

    def give_up(self, why: str) -> None:
        """Etcd refused this leader a write: let a standby lead, and do not campaign
        again for one TTL."""
        with self._lock:
            self._give_up(why)
            self._hold_until = self.clock.monotonic() + self.ttl

    def due(self) -> bool:
        return self.clock.monotonic() >= self._next

    def ensure(self) -> None:
        """Without the thread (one-shot use, tests): take the step now if it is due."""
        if self._thread is None and self.due():
            self.tick()

    def _standby_poll(self) -> float:
        # A standby looks often (a read, no write) so failover takes about one TTL.
        return min(1.0, self.ttl / 4)

    def _schedule(self, sent: float, delay: float) -> float:
        self._next = sent + delay
        return delay

    def _lose(self, why: str) -> None:
        if self.lease is not None:
            level = logging.INFO if why == "shutting down" else logging.WARNING
            event("leadership released" if why == "shutting down" else "lost leadership",
                  level, holder=self.holder, why=why)
            self.lease = None
            self._expires = 0.0
            self._changed(False)

    def lost(self, why: str) -> None:
        """A fenced write found another holder: stop leading now, campaign again."""
        with self._lock:
            self._lose(why)
            self._next = 0.0

    def _changed(self, leading: bool) -> None:
        if self.on_change is not None:
            self.on_change(leading)

    # --- the thread ---

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leadership", daemon=True)
        self._thread.start()

    def _watch_leader_key(self) -> None:
        """A standby campaigns the moment the leader key goes (its lease lapsed or was
        revoked), not at its next poll: failover costs the lease's rest, nothing more."""
        if self._watch is not None and not self._watch.broken.is_set():
            return
        try:
            self._watch = self.store.watch([self.store.leader_key()], self._poke)
        except StoreError:
            self._watch = None  # polling still works; try again on the next step

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poke.clear()
            try:
                self._watch_leader_key()
                delay = self.tick()
            except Exception as exc:  # a bug must not end keep-alive silently
                event("leadership step failed", logging.ERROR, exc_info=True, error=repr(exc))
                delay = 1.0
            self.clock.wait(self._poke, delay)

    def stop(self) -> None:
        """Stop the keep-alive and give the lease back so a standby takes over at once.
        Safe to call twice, from two threads (a signal's and the loop's)."""
        with self._stop_lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._watch is not None:
            with contextlib.suppress(StoreError):
                self._watch()
            self._watch = None
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
            self._thread = None
        with self._lock:
            if self.lease is not None:
                # If etcd is down the lease lapses by itself within its TTL.
                with contextlib.suppress(StoreError):
                    self.store.resign(self.lease)
                self._lose("shutting down")
