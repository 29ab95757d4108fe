"""Leadership with a fake clock and an in-memory lease table: the lease is measured from
when a refresh was sent, kept while etcd is briefly away, and lost when it runs out."""

from __future__ import annotations

from typing import Any

from reconciler.adapters.store import StoreUnavailable
from reconciler.service.leadership import Leadership
from tests.fakes.clock import FakeClock


class LeaseTable:
    """The leader key with a lease, as etcd keeps it, on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.holder: str | None = None
        self.expires = 0.0
        self.down = False
        self.lease_id = 0

    def _expire(self) -> None:
        if self.holder is not None and self.clock.monotonic() >= self.expires:
            self.holder = None

    def leader(self) -> str | None:
        if self.down:
            raise StoreUnavailable("etcd down")
        self._expire()
        return self.holder

    def campaign(self, holder: str, ttl: int) -> Any:
        if self.down:
            raise StoreUnavailable("etcd down")
        self._expire()
        if self.holder is not None:
            return None
        self.lease_id += 1
        self.holder, self.expires, self.ttl = holder, self.clock.monotonic() + ttl, ttl
        return self.lease_id

    def refresh(self, lease: Any) -> float:
        if self.down:
            raise StoreUnavailable("etcd down")
        self._expire()
        if self.holder is None or lease != self.lease_id:
            return 0.0
        self.expires = self.clock.monotonic() + self.ttl
        return float(self.ttl)

    def resign(self, lease: Any) -> None:
        if lease == self.lease_id:
            self.holder = None


def test_one_holder_at_a_time_and_a_standby_takes_over_after_the_ttl() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    a = Leadership(table, "a", 6, clock)  # type: ignore[arg-type]
    b = Leadership(table, "b", 6, clock)  # type: ignore[arg-type]
    assert a.tick() == 2  # leader: refresh every TTL/3
    b.tick()
    assert a.is_leader()
    assert not b.is_leader()
    clock.advance(5)  # a stops refreshing (a crash): nothing happens before the TTL
    b.tick()
    assert not b.is_leader()
    clock.advance(1.01)
    b.tick()
    assert b.is_leader()
    assert b.term == 1
    assert not a.is_leader()  # a's own count ran out too


def test_the_lease_is_kept_through_a_short_etcd_outage_and_lost_after_it() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    a = Leadership(table, "a", 6, clock)  # type: ignore[arg-type]
    a.tick()
    table.down = True
    clock.advance(2)
    retry = a.tick()
    assert retry <= 1  # retried soon, while lease is left
    assert a.is_leader()
    assert 3.9 <= a.remaining() <= 4.0
    clock.advance(4.1)
    a.tick()
    assert not a.is_leader()
    assert a.lease is None
    table.down = False
    clock.advance(1)
    a.tick()
    assert a.is_leader()
    assert a.term == 2  # a new term: the ledger is read again


def test_remaining_counts_from_when_the_refresh_was_sent() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    a = Leadership(table, "a", 9, clock)  # type: ignore[arg-type]
    a.tick()
    real_refresh = table.refresh

    def slow_refresh(lease: Any) -> float:
        granted = real_refresh(lease)
        clock.advance(2)  # the answer took 2 s
        return granted

    table.refresh = slow_refresh  # type: ignore[method-assign]
    clock.advance(3)
    a.tick()
    assert a.remaining() <= 7.0  # 9 s from the send, 2 s of which are gone


def test_a_fenced_write_that_found_another_holder_ends_leadership_at_once() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    changes: list[bool] = []
    a = Leadership(table, "a", 6, clock, on_change=changes.append)  # type: ignore[arg-type]
    a.tick()
    a.lost("ledger write fenced")
    assert not a.is_leader()
    assert a.due()
    assert changes == [True, False]


def test_a_leader_whose_pass_is_stuck_gives_the_lease_to_a_standby() -> None:
    from reconciler.service.observability import Health

    clock = FakeClock()
    table = LeaseTable(clock)
    health = Health(pass_deadline=30, monotonic=clock.monotonic)
    health.start()
    a = Leadership(table, "a", 6, clock)  # type: ignore[arg-type]
    a.stuck = health.stuck
    b = Leadership(table, "b", 6, clock)  # type: ignore[arg-type]
    a.tick()
    health.pass_began()
    for _ in range(15):  # 30 s of a pass that does not end: the lease is kept meanwhile
        clock.advance(2)
        a.tick()
        assert a.is_leader()
    clock.advance(2)
    a.tick()  # 32 s: stuck
    assert not a.is_leader()
    assert table.holder is None  # resigned: the standby need not wait for the TTL
    assert "a pass has been running for 32 s" in (health.stuck() or "")
    assert not health.is_ready
    b.tick()
    assert b.is_leader()
    a.tick()  # still stuck: does not campaign (b holds it anyway)
    assert not a.is_leader()
    health.pass_ended()
    assert health.stuck() is None
    table.resign(table.lease_id)  # b goes away; a's passes end again: a may lead again
    a.tick()
    assert a.is_leader()


def test_a_leader_refused_a_write_holds_off_one_ttl_before_campaigning_again() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    a = Leadership(table, "a", 6, clock)  # type: ignore[arg-type]
    a.tick()
    a.give_up("etcd refused a write: permission denied")
    assert not a.is_leader()
    assert table.holder is None
    clock.advance(3)
    a.tick()
    assert not a.is_leader()  # within the hold-off a standby that can write goes first
    clock.advance(3.1)
    a.tick()
    assert a.is_leader()


def test_health_says_a_pass_is_stuck_on_both_probes() -> None:
    from reconciler.service.observability import Health

    clock = FakeClock()
    health = Health(stall_after=240, pass_deadline=180, monotonic=clock.monotonic)
    health.start()
    health.passed()
    assert health.is_ready
    health.pass_began()
    clock.advance(181)
    assert not health.is_ready
    assert health.describe().startswith("not ready: a pass has been running for 181 s")
    assert health.alive  # liveness only after stall_after: a restart is the last resort
    assert health.running_for() == 181
    clock.advance(60)
    assert not health.alive
    health.pass_ended()
    health.beat()
    assert health.is_ready
    assert health.alive
