"""Leadership against a real etcd with authentication: a replica whose user may not write
the leader key (read-only, or its grant revoked while it leads) is not ready, counts the
error, and never keeps the lease from a replica that can lead. On both API generations
(the readiness of a leader counts its contact with Airflow)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.service.loop import Reconciler
from reconciler.service.observability import Health
from reconciler.service.runner import Runner
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.fixtures.etcd import EtcdFactory, EtcdServer
from tests.fixtures.replicas import poll_until
from tests.helpers import EXAMPLE_DAGS, example_repo

TTL = 3


@pytest.fixture
def secured(etcd_factory: EtcdFactory, tmp_path: Path) -> tuple[EtcdServer, EtcdSettings]:
    """etcd with auth on; users `writer` (read-write on the namespace) and `reader` (read
    only); the example graph synced by the writer."""
    server = etcd_factory(password="root-pw")
    settings = server.settings()
    server.add_user("writer", "writer-pw", readwrite_prefix=settings.root)
    server.etcdctl("user", "add", "reader:reader-pw")
    server.etcdctl("role", "add", "reader")
    server.etcdctl("role", "grant-permission", "reader", "--prefix=true", "read", settings.root)
    server.etcdctl("user", "grant-role", "reader", "reader")
    writer = replace(settings, user="writer", password="writer-pw")
    with EtcdStore(writer) as store:
        assert sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", store,
                    source="test", now=datetime.now(UTC) - timedelta(days=1)).ok
    return server, settings


@pytest.fixture(params=["v2", "v1"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    with (FakeAirflowV1 if request.param == "v1" else FakeAirflow)(EXAMPLE_DAGS) as f:
        yield f


def replica(settings: EtcdSettings, user: str, fake: FakeAirflow, holder: str
            ) -> tuple[Reconciler, Runner]:
    store = EtcdStore(replace(settings, user=user, password=f"{user}-pw"))
    cls = AirflowV1Client if isinstance(fake, FakeAirflowV1) else AirflowClient
    api = cls(AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                              timeout=2, retries=1))
    r = Reconciler(store, api, LoopSettings(interval=0.05, lease_ttl=TTL), holder=holder)
    health = Health()
    health.start()
    return r, Runner(r, health)


def errors(r: Reconciler, dependency: str, kind: str) -> float:
    value = r.metrics.registry.get_sample_value(
        "reconciler_errors_total", {"dependency": dependency, "kind": kind})
    return value or 0.0


def test_a_read_only_replica_with_no_leader_is_not_ready_and_counts_the_error(
        secured: tuple[EtcdServer, EtcdSettings], fake: FakeAirflow) -> None:
    _, settings = secured
    r, runner = replica(settings, "reader", fake, "ro")
    try:
        r.leadership.tick()  # campaign: etcd says permission denied
        runner.turn()
        assert not r.leadership.is_leader()
        assert not runner.health.is_ready
        assert "etcd refuses this replica the leader key" in runner.health.describe()
        assert "permission denied" in runner.health.describe()
        assert errors(r, "etcd", "human") >= 1
    finally:
        r.store.close()


def test_a_read_only_standby_beside_a_leader_is_not_ready(
        secured: tuple[EtcdServer, EtcdSettings], fake: FakeAirflow) -> None:
    _, settings = secured
    leader, leader_runner = replica(settings, "writer", fake, "rw")
    standby, runner = replica(settings, "reader", fake, "ro")
    try:
        leader.leadership.tick()
        assert leader.leadership.is_leader()
        standby.leadership.tick()  # a leader exists: no campaign, the write check instead
        runner.turn()
        assert not standby.leadership.is_leader()
        assert "etcd refuses this replica the leader key" in runner.health.describe()
        assert errors(standby, "etcd", "human") >= 1
        # Nothing was written by the check: the leader key is the writer's still.
        assert leader.store.leader() == "rw"
        leader_runner.turn()
        assert leader_runner.health.is_ready, leader_runner.health.describe()
    finally:
        leader.leadership.stop()
        leader.store.close()
        standby.store.close()


def test_a_leader_whose_write_permission_is_revoked_gives_up_the_lease(
        secured: tuple[EtcdServer, EtcdSettings], fake: FakeAirflow) -> None:
    server, settings = secured
    first, first_runner = replica(settings, "writer", fake, "first")
    server.etcdctl("user", "add", "second:second-pw")
    server.etcdctl("user", "grant-role", "second", "writer")
    second, _ = replica(settings, "second", fake, "second")
    try:
        # Probe the write permission at every keep-alive (the default waits PROBE_EVERY):
        # set before the campaign, which schedules the first probe.
        first.leadership.probe_every = 0.0
        first.leadership.tick()
        assert first.leadership.is_leader()
        # The writer role may now only read (the `second` user gets a role of its own).
        server.etcdctl("role", "add", "writer2")
        server.etcdctl("role", "grant-permission", "writer2", "--prefix=true", "readwrite",
                       settings.root)
        server.etcdctl("user", "grant-role", "second", "writer2")
        server.etcdctl("user", "revoke-role", "second", "writer")
        server.etcdctl("role", "revoke-permission", "writer", "--prefix=true", settings.root)
        server.etcdctl("role", "grant-permission", "writer", "--prefix=true", "read",
                       settings.root)
        first.leadership.tick()  # keep-alive, then the write check: refused
        assert not first.leadership.is_leader()
        first_runner.turn()
        assert not first_runner.health.is_ready
        assert "etcd refuses this replica the leader key" in first_runner.health.describe()
        assert errors(first, "etcd", "human") >= 1
        # The lease is gone (revoked, or lapsed unrefreshed): a replica that can write leads.
        started = time.monotonic()
        poll_until(lambda: second.leadership.tick() is not None
                   and second.leadership.is_leader(), TTL * 3, what="the second replica leads")
        assert time.monotonic() - started < TTL * 3
        assert second.store.leader() == "second"
        # The first does not take it back: it may not write, and says so.
        first.leadership.tick()
        assert not first.leadership.is_leader()
    finally:
        second.leadership.stop()
        first.store.close()
        second.store.close()
