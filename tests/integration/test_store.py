"""reconciler.adapters.store against real etcd servers: layout, guarded and fenced writes, leases,
watches, failover, deadlines, user/password auth and TLS."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import pytest

from reconciler.adapters.store import (
    EtcdStore,
    HeadRecord,
    StoreAccessDenied,
    StoreConflict,
    StoreError,
    StoreRequestTooLarge,
    StoreUnavailable,
    Unreadable,
)
from reconciler.core.settings import EtcdSettings
from tests.fixtures.etcd import EtcdFactory, EtcdServer, free_port
from tests.helpers import namespace_writes

T0 = datetime(2026, 1, 1, tzinfo=UTC)
C1, C2 = "1" * 40, "2" * 40


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[EtcdStore]:
    with EtcdStore(etcd_settings) as s:
        yield s


def head(commit: str, seq: int = 1, previous: str | None = None) -> HeadRecord:
    return HeadRecord(commit=commit, graph_digest=f"sha256:{commit[:4]}", synced_at=T0,
                      source="test", previous=previous, seq=seq)


def poll_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_sync_writes_exactly_the_documented_keys(store: EtcdStore) -> None:
    store.write_sync(head(C1), 0, b"graph-blob", {"a": T0})
    keys = sorted(k for k, _ in store.get_prefix(store.root, keys_only=True))
    root = store.root
    assert root == f"/reconciler-test/{store.settings.namespace}/"
    assert keys == [f"{root}desired/graphs/{C1}", f"{root}desired/head",
                    f"{root}desired/history/0000000001", f"{root}desired/since/{C1}"]
    got, revision = store.read_head()
    assert got == head(C1)
    assert revision == store.get(store.head_key()).mod_revision
    assert store.read_graph_blob(C1) == b"graph-blob"
    assert store.read_since(C1) == {"a": T0}
    assert store.read_history() == [head(C1)]


def test_namespaces_do_not_see_each_other(etcd_settings: EtcdSettings) -> None:
    other = replace(etcd_settings, namespace=etcd_settings.namespace + "-b")
    with EtcdStore(etcd_settings) as one, EtcdStore(other) as two:
        one.write_sync(head(C1), 0, b"x", {})
        assert two.read_head() == (None, 0)
        assert two.read_history() == []
        two.write_sync(head(C2), 0, b"y", {})
        assert one.read_head()[0] == head(C1)


def test_write_sync_is_guarded_by_the_head_revision(store: EtcdStore) -> None:
    store.write_sync(head(C1), 0, b"x", {})
    _, revision = store.read_head()
    before = namespace_writes(store)
    # Written as if the head were still absent, or at an older revision: refused, no write.
    for stale in (0, revision - 1):
        with pytest.raises(StoreConflict, match="changed since it was read"):
            store.write_sync(head(C2, 2, C1), stale, b"y", {})
    assert namespace_writes(store) == before
    assert store.read_graph_blob(C2) is None
    store.write_sync(head(C2, 2, C1), revision, None, {})
    assert [h.commit for h in store.read_history()] == [C2, C1]
    assert store.read_graph_blob(C2) is None  # None = keep (or do not write) the blob


def test_oversized_writes_are_refused_before_sending(store: EtcdStore) -> None:
    before = namespace_writes(store)
    with pytest.raises(StoreRequestTooLarge, match="request limit"):
        store.write_sync(head(C1), 0, b"x" * (1536 * 1024), {})
    with pytest.raises(StoreRequestTooLarge, match="operations"):
        store.put_fenced("me", [(store.key("ledger", "c", f"d{i}"), b"{}") for i in range(128)])
    assert namespace_writes(store) == before


def test_ledger_and_observed_by_cycle_and_dag_id(store: EtcdStore) -> None:
    cycle1, cycle2 = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    store.put(store.leader_key(), b"me")
    store.put_ledger("me", cycle1, "a", {"run_id": "r1", "state": "triggered"})
    store.put_ledger("me", cycle2, "b", {"run_id": "r2"})
    store.put_observed(cycle1, "a", {"state": "success"})
    assert store.get_ledger(cycle1, "a") == {"run_id": "r1", "state": "triggered"}
    assert store.get_ledger(cycle1, "zz") is None
    assert store.get_observed(cycle1, "a") == {"state": "success"}
    assert store.read_ledger() == {(cycle1, "a"): {"run_id": "r1", "state": "triggered"},
                                   (cycle2, "b"): {"run_id": "r2"}}
    assert store.read_ledger(cycle2) == {(cycle2, "b"): {"run_id": "r2"}}
    assert store.read_observed() == {(cycle1, "a"): {"state": "success"}}
    with pytest.raises(StoreConflict, match="not the leader"):
        store.delete_cycle("not-me", cycle1)  # fenced: only the leader forgets a cycle
    assert len(store.read_ledger()) == 2
    store.delete_cycle("me", cycle1)
    assert list(store.read_ledger()) == [(cycle2, "b")]
    assert store.read_observed() == {}


def test_a_scan_reads_chunk_by_chunk_in_key_order_from_one_revision(store: EtcdStore) -> None:
    cycle = "2026-01-01T00:00:00+00:00"
    for n in range(12):
        store.put_observed(cycle, f"p{n:02d}", {"n": n})
    store.put(store.key("observed", cycle, "zz-unreadable"), b"{not json")
    prefix = store.key("observed") + "/"
    chunks = store.scan_prefix(prefix, chunk=5)
    first = next(chunks)
    # Written after the scan began: a scan is one view, as a single range read would be.
    store.put_observed(cycle, "p05b", {"n": "late"})
    store.put_observed(cycle, "p00", {"n": "rewritten"})
    rest = list(chunks)
    assert [len(c) for c in [first, *rest]] == [5, 5, 3]
    keys = [k for c in [first, *rest] for k, _ in c]
    assert keys == sorted(keys)
    assert len(set(keys)) == 13
    assert not any(k.endswith("/p05b") for k in keys)
    assert dict(first)[store.observed_key(cycle, "p00")] == b'{"n":0}'
    # scan_observed decodes one value at a time; what is not JSON is named, not raised
    scanned = dict(store.scan_observed())
    assert scanned[(cycle, "p00")] == {"n": "rewritten"}
    assert len(scanned) == 14
    unreadable = scanned[(cycle, "zz-unreadable")]
    assert isinstance(unreadable, Unreadable)
    assert unreadable.key.endswith("/zz-unreadable")


def test_a_scan_whose_revision_was_compacted_midway_fails_whole(store: EtcdStore) -> None:
    """No mix of two views: the pass fails (StoreError) and the next one scans afresh."""
    cycle = "2026-01-01T00:00:00+00:00"
    for n in range(8):
        store.put_observed(cycle, f"p{n}", {"n": n})
    chunks = store.scan_prefix(store.key("observed") + "/", chunk=5)
    assert len(next(chunks)) == 5
    store.put_observed(cycle, "p0", {"n": "rewritten"})
    store.client.compact(store.revision(), physical=True)
    with pytest.raises(StoreError, match="compacted"):
        next(chunks)
    assert len(dict(store.scan_observed())) == 8  # a fresh scan reads the new revision


class ServerAnswer(grpc.RpcError):
    """What a member answers when it took a request the cluster could not finish."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.UNKNOWN, "context deadline exceeded"),  # seen as the leader died
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
    (grpc.StatusCode.UNKNOWN, "etcdserver: request timed out"),
])
def test_a_cluster_that_cannot_finish_a_request_is_unavailable_not_an_error(
        store: EtcdStore, code: grpc.StatusCode, details: str) -> None:
    calls = []

    def answer(_client: object) -> None:
        calls.append(1)
        raise ServerAnswer(code, details)

    with pytest.raises(StoreUnavailable, match="did not complete get x"):
        store._call("get x", answer)
    assert calls == [1]  # not sent again: a write may have been applied


def test_a_key_segment_cannot_contain_a_slash(store: EtcdStore) -> None:
    with pytest.raises(ValueError, match="segment"):
        store.ledger_key("2026", "a/b")


def test_fenced_writes_need_the_leader_key(store: EtcdStore) -> None:
    cycle = "2026-01-01T00:00:00+00:00"
    with pytest.raises(StoreConflict, match="not the leader"):
        store.put_ledger("me", cycle, "a", {"x": 1})  # nobody leads
    lease = store.campaign("me", ttl=10)
    assert lease is not None
    store.put_ledger("me", cycle, "a", {"x": 1})
    assert not store.put_fenced("someone-else", [(store.ledger_key(cycle, "a"), b"{}")])
    assert store.get_ledger(cycle, "a") == {"x": 1}
    store.resign(lease)
    with pytest.raises(StoreConflict):
        store.put_ledger("me", cycle, "a", {"x": 2})  # deposed: fenced off


def test_leader_campaign_refresh_resign_and_expiry(etcd_settings: EtcdSettings) -> None:
    with EtcdStore(etcd_settings) as one, EtcdStore(etcd_settings) as two:
        lease = one.campaign("one", ttl=2)
        assert lease is not None
        assert two.campaign("two", ttl=2) is None
        assert one.leader() == "one"
        assert one.refresh(lease)
        one.resign(lease)
        assert one.leader() is None
        assert not one.refresh(lease)
        lease2 = two.campaign("two", ttl=1)
        assert lease2 is not None
        assert two.leader() == "two"
        # Not refreshed: the key goes with the lease, and another replica can take over.
        poll_until(lambda: one.leader() is None)
        assert one.campaign("one", ttl=5) is not None


def test_watch_wakes_on_head_and_events(store: EtcdStore) -> None:
    head_changed, event_seen = threading.Event(), threading.Event()
    cancel_head = store.watch([store.head_key()], head_changed)
    cancel_events = store.watch([store.events_prefix()], event_seen)
    try:
        store.put(store.key("ledger", "c", "a"), b"{}")  # unrelated: wakes nobody
        store.put(store.event_key("a", "run1"), b"{}")
        assert event_seen.wait(5)
        assert not head_changed.is_set()
        store.write_sync(head(C1), 0, b"x", {})
        assert head_changed.wait(5)
    finally:
        cancel_head()
        cancel_events()
    assert not cancel_head.broken.is_set()
    event_seen.clear()
    store.put(store.event_key("a", "run2"), b"{}")
    assert not event_seen.wait(0.5)  # cancelled


@pytest.mark.real_clock  # a silent endpoint: only an etcd request timeout gets past it
def test_failover_to_the_next_endpoint(etcd_server: EtcdServer, etcd_settings: EtcdSettings,
                                       silent_endpoint: str) -> None:
    with EtcdStore(etcd_settings) as store:
        store.write_sync(head(C1), 0, b"x", {})
    for first in (f"127.0.0.1:{free_port()}", silent_endpoint):
        settings = replace(etcd_settings, endpoints=(first, etcd_server.endpoint), timeout=1.0)
        start = time.monotonic()
        with EtcdStore(settings) as store:
            assert store.read_head()[0] == head(C1)
            store.put(store.key("probe"), b"1")  # later calls stay on the live endpoint
        # At most one timeout on the endpoint that does not answer.
        assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("kind", ["refused",
                                  pytest.param("silent", marks=pytest.mark.real_clock)])
def test_unreachable_etcd_raises_store_unavailable_within_the_timeout(
        kind: str, silent_endpoint: str, etcd_settings: EtcdSettings) -> None:
    endpoint = silent_endpoint if kind == "silent" else f"127.0.0.1:{free_port()}"
    settings = replace(etcd_settings, endpoints=(endpoint,), timeout=1.5)
    start = time.monotonic()
    with EtcdStore(settings) as store, pytest.raises(StoreUnavailable, match="unreachable"):
        store.read_head()
    assert time.monotonic() - start < 1.5 + 1.0


def test_user_password_auth(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(password="root-Secret-1")
    settings = server.settings()
    with EtcdStore(settings) as store:
        store.write_sync(head(C1), 0, b"x", {})
        assert store.read_head()[0] == head(C1)
    with EtcdStore(replace(settings, user=None, password=None)) as anonymous, \
            pytest.raises(StoreAccessDenied, match="requires authentication"):
        anonymous.read_head()
    with EtcdStore(replace(settings, password="wrong-Secret-2")) as wrong, \
            pytest.raises(StoreAccessDenied, match="refused the credentials") as err:
        wrong.read_head()
    assert "Secret" not in str(err.value)
    with pytest.raises(StoreAccessDenied, match="without a password"):
        EtcdStore(replace(settings, password=None)).read_head()


def test_a_user_limited_to_its_namespace(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(password="root-pw")
    settings = server.settings()
    server.add_user("team", "team-pw", readwrite_prefix=settings.root)
    mine = replace(settings, user="team", password="team-pw")
    with EtcdStore(mine) as store:
        store.write_sync(head(C1), 0, b"x", {})
        assert store.read_head()[0] == head(C1)
    other = replace(mine, namespace="someone-else")
    with EtcdStore(other) as store, pytest.raises(StoreAccessDenied, match="team"):
        store.read_head()


def test_tls_with_client_certificates(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(tls=True)
    settings = server.settings()
    with EtcdStore(settings) as store:
        store.write_sync(head(C1), 0, b"x", {})
        assert store.read_head()[0] == head(C1)
    # Without the client certificate the server refuses the handshake; without our CA we
    # refuse the server's certificate (each says what to set: test_etcd_tls.py);
    # plaintext gets nowhere either.
    for bad, error in ((replace(settings, cert=None, key=None), StoreAccessDenied),
                       (replace(settings, ca=None), StoreAccessDenied),
                       (replace(settings, ca=None, cert=None, key=None), StoreUnavailable)):
        with EtcdStore(replace(bad, timeout=2.0)) as store, pytest.raises(error):
            store.read_head()


def test_tls_and_auth_together(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(tls=True, password="pw-both")
    with EtcdStore(server.settings()) as store:
        store.write_sync(head(C1), 0, b"x", {})
        assert store.read_head()[0] == head(C1)
    with EtcdStore(server.settings(password="nope")) as store, \
            pytest.raises(StoreAccessDenied):
        store.read_head()
