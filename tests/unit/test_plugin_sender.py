"""The listener plugin's sender (reconciler/plugin/reconciler_events.py) without Airflow:
the bounded queue never blocks a hook, drops are counted and logged at most once a
minute, only DAGs of the synced graph are written, configuration comes from the
reconciler's own variables, and the drop-in file is the packaged one, byte for byte.

A fake gateway stands in for etcd's JSON gateway here (the real one is in
tests/integration/test_plugin_gateway.py and tests/e2e/test_plugin.py); it can be
blocked, to be an etcd that never answers."""

from __future__ import annotations

import ast
import gzip
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.plugin import reconciler_events as ev
from tests.fakes.clock import FakeClock

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "reconciler" / "plugin" / "reconciler_events.py"
DROP_IN = REPO / "examples" / "plugins" / "reconciler_events.py"
ROOT = "/reconciler/default/"


class FakeGateway:
    """etcd's JSON gateway as a dict; `block` makes every call hang until released."""

    def __init__(self, dag_ids: list[str] | None = None) -> None:
        self.kv: dict[str, bytes] = {}
        self.leases: list[int] = []
        self.calls: list[str] = []
        self.block = threading.Event()
        self.block.set()  # set = not blocked
        self.in_call = threading.Event()
        self.fail: Exception | None = None
        if dag_ids is not None:
            self.sync(dag_ids)

    def sync(self, dag_ids: list[str], commit: str = "abc123") -> None:
        graph = {"format": 1, "pipelines": {d: {"dag_id": d} for d in dag_ids}}
        self.kv[f"{ROOT}desired/head"] = json.dumps({"commit": commit}).encode()
        self.kv[f"{ROOT}desired/graphs/{commit}"] = gzip.compress(json.dumps(graph).encode())

    def _enter(self, what: str) -> None:
        self.calls.append(what)
        self.in_call.set()
        self.block.wait()
        if self.fail is not None:
            raise self.fail

    def get(self, key: str) -> bytes | None:
        self._enter(f"get {key}")
        return self.kv.get(key)

    def grant(self, ttl: int) -> str:
        self._enter(f"grant {ttl}")
        self.leases.append(ttl)
        return str(len(self.leases))

    def put(self, key: str, value: bytes, lease: str | None = None) -> None:
        self._enter(f"put {key}")
        self.kv[key] = value


def config(**overrides: Any) -> ev.Config:
    values: dict[str, Any] = {"endpoints": ("http://127.0.0.1:1",), "root": ROOT,
                              "queue_size": 4, "graph_refresh": 30.0, "ttl": 600}
    values.update(overrides)
    return ev.Config(**values)


def event(dag_id: str = "02_pipeline", run_id: str = "r1", kind: str = "run") -> dict[str, Any]:
    return {"kind": kind, "dag_id": dag_id, "run_id": run_id, "state": "success"}


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway(["01_pipeline_init", "02_pipeline"])


def make_sender(gateway: FakeGateway, clock: FakeClock | None = None, **overrides: Any
                ) -> ev.Sender:
    clock = clock or FakeClock()
    return ev.Sender(config(**overrides), gateway, clock=clock.monotonic)  # type: ignore[arg-type]


def test_an_event_of_a_graph_dag_is_written_with_a_lease_and_json(gateway: FakeGateway) -> None:
    sender = make_sender(gateway)
    assert sender.submit(event())
    assert sender.flush(5)
    value = json.loads(gateway.kv[f"{ROOT}events/02_pipeline/r1"])
    assert value == event()
    assert gateway.leases == [600]
    assert (sender.sent, sender.skipped, sender.dropped) == (1, 0, 0)
    sender.stop()


def test_dags_outside_the_graph_are_never_written(gateway: FakeGateway) -> None:
    sender = make_sender(gateway)
    sender.submit(event("not_in_graph"))
    sender.submit(event("02_pipeline", "bad/run"))  # a '/' would be another key level
    assert sender.flush(5)
    assert not [k for k in gateway.kv if "/events/" in k]
    assert sender.skipped == 2
    assert not [c for c in gateway.calls if c.startswith(("put", "grant"))]
    sender.stop()


def test_no_synced_graph_means_no_events() -> None:
    gateway = FakeGateway()
    sender = make_sender(gateway)
    sender.submit(event())
    assert sender.flush(5)
    assert sender.skipped == 1
    assert not [k for k in gateway.kv if "/events/" in k]
    sender.stop()


def test_the_graph_ids_are_cached_and_read_again_after_the_refresh_interval(
        gateway: FakeGateway) -> None:
    clock = FakeClock()
    sender = make_sender(gateway, clock, graph_refresh=30.0)
    for n in range(3):
        sender.handle(event(run_id=f"r{n}"))
    assert [c for c in gateway.calls if c.startswith("get")] == [
        f"get {ROOT}desired/head", f"get {ROOT}desired/graphs/abc123"]
    gateway.sync(["03_pipeline"], commit="def456")
    assert sender.handle(event("02_pipeline", "r9"))  # cached: still the old graph
    clock.advance(31)
    assert not sender.handle(event("02_pipeline", "r10"))
    assert sender.handle(event("03_pipeline", "r10"))
    assert f"get {ROOT}desired/graphs/def456" in gateway.calls


def test_one_lease_serves_many_events_until_half_its_ttl(gateway: FakeGateway) -> None:
    clock = FakeClock()
    sender = make_sender(gateway, clock, ttl=60, graph_refresh=1000.0)
    for n in range(5):
        sender.handle(event(run_id=f"r{n}"))
    assert gateway.leases == [60]
    clock.advance(31)
    sender.handle(event(run_id="late"))
    assert gateway.leases == [60, 60]


def test_a_blocked_etcd_never_blocks_the_hook_and_drops_are_counted(
        gateway: FakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway.block.clear()  # etcd hangs
    sender = make_sender(gateway, queue_size=4)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    sender.submit(event(run_id="first"))
    assert gateway.in_call.wait(5)  # the thread is stuck in its first call
    started = time.monotonic()
    accepted = [sender.submit(event(run_id=f"r{n}")) for n in range(20)]
    took = time.monotonic() - started
    assert took < 0.5, f"20 submits took {took:.2f} s with etcd hanging"
    assert accepted == [True] * 4 + [False] * 16  # 4 queued, the rest dropped
    assert sender.dropped == 16
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1  # once, not 16 times
    assert "16" not in warnings[0].getMessage()  # logged at the first drop: "1 dropped"
    assert not sender.flush(0.05)  # a bounded wait, not forever
    gateway.block.set()
    assert sender.flush(5)
    assert sender.sent == 5
    sender.stop()


def test_the_drop_warning_comes_at_most_once_a_minute(gateway: FakeGateway,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    gateway.block.clear()
    sender = make_sender(gateway, clock, queue_size=1)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    sender.submit(event(run_id="in-flight"))
    assert gateway.in_call.wait(5)
    sender.submit(event(run_id="queued"))
    for _ in range(10):
        sender.submit(event())
    clock.advance(59)
    sender.submit(event())
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    clock.advance(2)
    sender.submit(event())
    messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(messages) == 2
    assert "12 dropped" in messages[1]
    assert sender.dropped == 12
    gateway.block.set()
    sender.stop()


def test_a_failing_etcd_is_counted_and_logged_once_per_change(
        gateway: FakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    sender = make_sender(gateway)
    sender.handle(event(run_id="warm"))  # graph cached
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    gateway.fail = ev.GatewayError("etcd unreachable (http://127.0.0.1:1: refused)")
    for n in range(5):
        assert not sender.handle(event(run_id=f"r{n}"))
    assert sender.failed == 5
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    gateway.fail = None
    caplog.set_level(logging.INFO, logger="reconciler.plugin")
    assert sender.handle(event(run_id="back"))
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_the_sender_thread_survives_a_bad_event(gateway: FakeGateway) -> None:
    sender = make_sender(gateway)
    sender.submit({"no": "dag_id"})
    sender.submit(event())
    assert sender.flush(5)
    assert sender.failed == 1
    assert sender.sent == 1
    sender.stop()


def test_configuration_from_the_reconcilers_variables() -> None:
    assert ev.Config.from_env({}) is None  # not configured: the plugin does nothing
    c = ev.Config.from_env({
        "RECONCILER_ETCD_ENDPOINTS": "etcd-1:2379, etcd-2:2379,https://etcd-3:2379",
        "RECONCILER_ETCD_PREFIX": "/team/", "RECONCILER_NAMESPACE": "dwh",
        "RECONCILER_ETCD_USER": "airflow", "RECONCILER_ETCD_PASSWORD": "s3cret",
        "RECONCILER_EVENTS_TTL": "60", "RECONCILER_EVENTS_TASKS": "false"})
    assert c is not None
    assert c.endpoints == ("http://etcd-1:2379", "http://etcd-2:2379", "https://etcd-3:2379")
    assert c.root == "/team/dwh/"
    assert (c.user, c.password, c.ttl, c.tasks) == ("airflow", "s3cret", 60, False)
    assert "s3cret" not in repr(c)
    tls = ev.Config.from_env({"RECONCILER_ETCD_ENDPOINTS": "etcd:2379",
                              "RECONCILER_ETCD_CA": "/ca.pem"})
    assert tls is not None
    assert tls.endpoints == ("https://etcd:2379",)
    assert tls.tls
    legacy = ev.Config.from_env({"RECONCILER_EVENTS_ETCD_URL": "http://127.0.0.1:2379",
                                 "RECONCILER_EVENTS_PREFIX": "/e2e/plugin"})
    assert legacy is not None
    assert (legacy.endpoints, legacy.root) == (("http://127.0.0.1:2379",), "/e2e/plugin/")


def test_events_say_run_or_task_level() -> None:
    class Run:
        dag_id, run_id = "02_pipeline", "manual__1"

    class TaskInstance:
        dag_id, run_id, task_id, map_index, try_number = "02_pipeline", "manual__1", "load", -1, 2

    run = ev.run_event(Run(), "failed")
    assert {k: run[k] for k in ("kind", "dag_id", "run_id", "state")} == {
        "kind": "run", "dag_id": "02_pipeline", "run_id": "manual__1", "state": "failed"}
    task = ev.task_event(TaskInstance(), "skipped")
    assert (task["kind"], task["task_id"], task["try_number"], task["state"]) == (
        "task", "load", 2, "skipped")
    assert task["at"].endswith("+00:00")


def test_the_listener_never_raises_into_airflow(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> ev.Sender:
        raise RuntimeError("boom")

    monkeypatch.setattr(ev, "sender", broken)
    ev.listener.on_dag_run_success(object(), "msg")  # no attribute, no sender: no raise
    ev.listener.on_task_instance_failed(None, object(), RuntimeError("task"))


def test_the_drop_in_is_the_packaged_plugin_byte_for_byte() -> None:
    assert DROP_IN.read_bytes() == PLUGIN.read_bytes(), (
        "examples/plugins/reconciler_events.py differs from reconciler/plugin/"
        "reconciler_events.py: copy the packaged one over the drop-in")


def test_the_plugin_imports_only_the_standard_library_and_airflow() -> None:
    tree = ast.parse(PLUGIN.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names - set(sys.stdlib_module_names) == {"airflow"}


def test_a_graph_split_across_parts_is_joined_and_checked() -> None:
    import hashlib

    gateway = FakeGateway()
    graph = {"format": 1, "pipelines": {f"dag_{n}": {} for n in range(50)}}
    blob = gzip.compress(json.dumps(graph).encode())
    parts = [blob[i:i + 100] for i in range(0, len(blob), 100)]
    manifest = {"parts": len(parts), "bytes": len(blob),
                "digest": "sha256:" + hashlib.sha256(blob).hexdigest()}
    gateway.kv[f"{ROOT}desired/head"] = json.dumps({"commit": "c0ffee"}).encode()
    gateway.kv[f"{ROOT}desired/graphs/c0ffee"] = ev.PARTS_MAGIC + json.dumps(manifest).encode()
    for n, part in enumerate(parts):
        gateway.kv[f"{ROOT}desired/graphs/c0ffee/{n:06d}"] = part
    assert ev.graph_dag_ids(gateway, ROOT) == {f"dag_{n}" for n in range(50)}  # type: ignore[arg-type]
    gateway.kv[f"{ROOT}desired/graphs/c0ffee/000001"] = parts[0]  # a mixed part
    with pytest.raises(ValueError, match="digest"):
        ev.graph_dag_ids(gateway, ROOT)  # type: ignore[arg-type]
    del gateway.kv[f"{ROOT}desired/graphs/c0ffee/000001"]
    with pytest.raises(ValueError, match="missing"):
        ev.graph_dag_ids(gateway, ROOT)  # type: ignore[arg-type]


# --- the sender never dies and never lies (issue 15, finding 3) ---------------------------


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def _deflate_garbage() -> bytes:
    good = gzip.compress(json.dumps({"pipelines": {"02_pipeline": {}}}).encode())
    return good[:10] + b"\xff" * 20 + good[-8:]  # a gzip header, then no deflate stream


UNREADABLE_BLOBS = {
    "truncated-gzip": gzip.compress(json.dumps(
        {"format": 1, "pipelines": {"02_pipeline": {}}}).encode())[:-12],
    "gzip-of-a-list": gzip.compress(b"[]"),
    "gzip-of-non-graph-json": gzip.compress(b'{"pipelines": "02_pipeline"}'),
    "gzip-of-an-object-without-pipelines": gzip.compress(b'{"format": 1}'),
    "bad-deflate": _deflate_garbage(),
    "not-gzip": b'{"pipelines": {"02_pipeline": {}}}',
    "empty": b"",
}


def break_blob(gateway: FakeGateway, blob: bytes, commit: str = "abc123") -> None:
    gateway.kv[f"{ROOT}desired/head"] = json.dumps({"commit": commit}).encode()
    gateway.kv[f"{ROOT}desired/graphs/{commit}"] = blob


@pytest.mark.parametrize("blob", list(UNREADABLE_BLOBS.values()), ids=list(UNREADABLE_BLOBS))
def test_graph_dag_ids_names_an_unreadable_blob(blob: bytes) -> None:
    gateway = FakeGateway()
    break_blob(gateway, blob)
    with pytest.raises(ev.GraphUnreadable, match="abc123"):
        ev.graph_dag_ids(gateway, ROOT)  # type: ignore[arg-type]


@pytest.mark.parametrize("head", [b"garbage", b"[]", b'{"commit": 7}', b"{}"])
def test_graph_dag_ids_names_an_unreadable_head(head: bytes) -> None:
    gateway = FakeGateway()
    gateway.kv[f"{ROOT}desired/head"] = head
    with pytest.raises(ev.GraphUnreadable, match="desired/head"):
        ev.graph_dag_ids(gateway, ROOT)  # type: ignore[arg-type]


@pytest.mark.parametrize("blob", list(UNREADABLE_BLOBS.values()), ids=list(UNREADABLE_BLOBS))
def test_a_new_sender_with_an_unreadable_blob_stays_alive_says_so_and_sends_once_repaired(
        blob: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A task process (no graph cached yet) meets an unreadable blob: its event is retried,
    the thread lives, submit() turns False once it failed for down_after, flush does not
    wait, and events flow again once the blob is repaired."""
    gateway = FakeGateway()
    break_blob(gateway, blob)
    clock = FakeClock()
    sender = make_sender(gateway, clock, down_after=10.0, retry_max=0.02, flush_timeout=30.0)
    caplog.set_level(logging.INFO, logger="reconciler.plugin")
    assert sender.submit(event(run_id="early"))
    assert wait_until(lambda: len(gateway.calls) >= 6)  # retried, with backoff
    assert sender.alive
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per change, not per retry
    assert "abc123" in warnings[0]
    assert "\n" not in warnings[0]
    clock.advance(11)  # failing for longer than down_after: the sender says so
    assert not sender.submit(event(run_id="refused"))
    started = time.monotonic()
    assert not sender.flush() or sender.failed == 1
    assert time.monotonic() - started < 2.0  # not the 30 s flush timeout
    assert wait_until(lambda: sender.failed == 1)  # "early" given up
    gateway.sync(["01_pipeline_init", "02_pipeline"])  # repaired
    assert wait_until(lambda: not sender.down)  # a probe read it
    assert sender.submit(event(run_id="after"))
    assert sender.flush(5)
    assert f"{ROOT}events/02_pipeline/after" in gateway.kv
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert sender.alive
    sender.stop()


@pytest.mark.parametrize("blob", list(UNREADABLE_BLOBS.values()), ids=list(UNREADABLE_BLOBS))
def test_a_blob_that_turns_unreadable_keeps_the_last_graph_and_the_thread(
        blob: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """The scheduler's sender has the graph cached; the blob breaks; its periodic refresh
    (on an idle thread) used to end the thread for good."""
    gateway = FakeGateway(["01_pipeline_init", "02_pipeline"])
    clock = FakeClock()
    sender = make_sender(gateway, clock, graph_refresh=30.0)
    assert sender.submit(event(run_id="before"))
    assert sender.flush(5)
    break_blob(gateway, blob, commit="def456")
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    clock.advance(31)
    reads = len(gateway.calls)
    assert wait_until(lambda: f"get {ROOT}desired/graphs/def456" in gateway.calls[reads:])
    time.sleep(0.05)
    assert sender.alive
    assert sender.submit(event(run_id="during"))
    assert sender.flush(5)
    assert f"{ROOT}events/02_pipeline/during" in gateway.kv  # the last graph read is used
    assert [r for r in caplog.records if "def456" in r.getMessage()]
    gateway.sync(["03_pipeline"], commit="fed789")
    clock.advance(31)
    assert wait_until(lambda: f"get {ROOT}desired/graphs/fed789" in gateway.calls)
    assert sender.submit(event("03_pipeline", "repaired"))
    assert sender.flush(5)
    assert f"{ROOT}events/03_pipeline/repaired" in gateway.kv
    sender.stop()


def test_an_unexpected_error_is_logged_once_retried_and_the_event_still_sent(
        gateway: FakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    sender = make_sender(gateway, retry_max=0.02)
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    gateway.fail = AttributeError("'list' object has no attribute 'get'")  # a bug
    assert sender.submit(event(run_id="r1"))
    assert wait_until(lambda: len(gateway.calls) >= 4)
    assert sender.alive
    gateway.fail = None
    assert sender.flush(5)
    assert f"{ROOT}events/02_pipeline/r1" in gateway.kv  # retried, not lost
    logged = [r.getMessage() for r in caplog.records]
    assert len([m for m in logged if "AttributeError" in m]) == 1
    sender.stop()


def test_a_thread_that_ended_is_started_again_by_the_next_event(
        gateway: FakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway.block.clear()
    sender = make_sender(gateway, flush_timeout=30.0)
    assert sender.submit(event(run_id="r1"))
    assert gateway.in_call.wait(5)
    assert sender.submit(event(run_id="r2"))
    first = sender.thread
    assert first is not None
    sender.stopping.set()  # the thread ends (as if something killed it) with r2 queued
    gateway.block.set()
    first.join(5)
    assert not sender.alive
    sender.stopping.clear()
    started = time.monotonic()
    assert not sender.flush()  # nothing can move: no wait for the 30 s timeout
    assert time.monotonic() - started < 1.0
    caplog.set_level(logging.WARNING, logger="reconciler.plugin")
    assert sender.submit(event(run_id="r3"))
    assert sender.flush(5)
    assert {f"{ROOT}events/02_pipeline/{r}" for r in ("r1", "r2", "r3")} <= set(gateway.kv)
    assert sender.restarts == 1
    assert any("started again" in r.getMessage() for r in caplog.records)
    sender.stop()


def test_flush_does_not_wait_when_nothing_can_move(gateway: FakeGateway) -> None:
    sender = make_sender(gateway, flush_timeout=30.0)
    sender.queue.put_nowait(event())  # queued, but no thread runs
    started = time.monotonic()
    assert not sender.flush()
    assert time.monotonic() - started < 1.0


def test_a_stopped_sender_refuses_events(gateway: FakeGateway) -> None:
    sender = make_sender(gateway)
    sender.stop()
    assert not sender.submit(event())
    assert sender.dropped == 1


def test_the_exit_flush_runs_once_per_process(gateway: FakeGateway) -> None:
    gateway.block.clear()  # etcd hangs
    sender = make_sender(gateway, flush_timeout=0.3)
    sender.submit(event(run_id="stuck"))
    assert gateway.in_call.wait(5)
    sender.submit(event(run_id="queued"))
    started = time.monotonic()
    sender._flush_at_exit()
    sender._flush_at_exit()  # registered twice (a fork inherits the parent's): one wait
    took = time.monotonic() - started
    assert 0.25 < took < 0.55
    gateway.block.set()
    sender.stop()


def test_configuration_of_the_failure_bounds() -> None:
    c = ev.Config.from_env({"RECONCILER_ETCD_ENDPOINTS": "e:2379",
                            "RECONCILER_EVENTS_DOWN_AFTER": "3",
                            "RECONCILER_EVENTS_RETRY_MAX": "0.5"})
    assert c is not None
    assert (c.down_after, c.retry_max) == (3.0, 0.5)
