"""The observer's listings of several deployments (service/observer.py): run at once on
threads of their own, merged by the main thread; in the loop a listing much slower than
the others' is left behind and merged on the pass it has ended; a listing that outlived
its graph is dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.adapters.airflow import AirflowUnavailable
from reconciler.core.settings import LoopSettings
from reconciler.core.state import DagRun
from reconciler.service.observer import Listed, Observer

NOW = datetime.now(UTC).replace(microsecond=0)


def run(dag_id: str, run_id: str = "r1") -> DagRun:
    return DagRun.from_api({"dag_id": dag_id, "dag_run_id": run_id, "state": "success",
                            "logical_date": NOW.isoformat()})


@pytest.fixture
def observer() -> Iterator[Observer]:
    made = Observer(None, None, LoopSettings(), None)  # type: ignore[arg-type]
    made.desired = object()  # type: ignore[assignment]  # the graph the listings are for
    yield made
    made.close()


def listed(observer: Observer, deployment: str, *runs: DagRun, kind: str = "relist",
           error: Exception | None = None, desired: object | None = None) -> Listed:
    return Listed(deployment, frozenset(r.dag_id for r in runs) or frozenset({"x"}), kind,
                  NOW, desired if desired is not None else observer.desired, list(runs),
                  error)  # type: ignore[arg-type]


def job(result: Listed, gate: threading.Event | None = None) -> Callable[[], Listed]:
    def call() -> Listed:
        if gate is not None:
            assert gate.wait(10)
        return result
    return call


def test_a_listing_much_slower_than_the_others_is_left_behind_then_merged_when_it_ends(
        observer: Observer) -> None:
    observer.leave_behind = True
    gate = threading.Event()
    slow = listed(observer, "slow", run("s"))
    ended = observer._gather({"fast": job(listed(observer, "fast", run("f"))),
                              "slow": job(slow, gate)})
    assert [x.deployment for x in ended] == ["fast"]
    assert observer.late == {"slow"}
    gate.set()
    for _ in range(100):  # the next passes: nothing new is asked, the slow one ends
        ended = observer._gather({})
        if ended:
            break
        threading.Event().wait(0.05)
    assert [x.deployment for x in ended] == ["slow"]
    assert observer.late == frozenset()


def test_a_one_shot_command_waits_for_every_listing(observer: Observer) -> None:
    gate = threading.Event()
    threading.Timer(0.3, gate.set).start()
    ended = observer._gather({"fast": job(listed(observer, "fast", run("f"))),
                              "slow": job(listed(observer, "slow", run("s")), gate)})
    assert sorted(x.deployment for x in ended) == ["fast", "slow"]
    assert observer.late == frozenset()


def test_the_retry_of_an_unreachable_deployment_is_not_waited_for(
        observer: Observer) -> None:
    observer.leave_behind = True
    observer.unreachable = {"down": "deployment down: refused"}
    gate = threading.Event()
    ended = observer._gather({"up": job(listed(observer, "up", run("u"))),
                              "down": job(listed(observer, "down", run("d")), gate)})
    assert [x.deployment for x in ended] == ["up"]
    assert observer.late == {"down"}
    gate.set()


def test_merging_replaces_a_relisted_deployment_and_records_its_watermark(
        observer: Observer) -> None:
    observer.cache.absorb_runs([run("a", "old"), run("b", "kept")])
    observer.unreachable = {"d1": "deployment d1: refused"}
    relisted = observer._merge([listed(observer, "d1", run("a", "new"))])
    assert set(observer.cache.runs) == {("a", "new"), ("b", "kept")}
    assert observer._watermarks["d1"] == NOW
    assert observer.unreachable == {}
    assert [x.deployment for x in relisted] == ["d1"]


def test_a_failed_listing_keeps_the_runs_as_last_seen_and_names_the_deployment(
        observer: Observer) -> None:
    observer.cache.absorb_runs([run("a", "seen")])
    observer._watermarks["d1"] = NOW - timedelta(minutes=1)
    failure = AirflowUnavailable("connection refused")
    observer._merge([listed(observer, "d1", error=failure)])
    assert set(observer.cache.runs) == {("a", "seen")}
    assert observer.unreachable["d1"].startswith("deployment d1: ")
    assert "d1" not in observer._watermarks  # a failed relist: relisted when it is back
    observer._watermarks["d1"] = NOW
    observer._merge([listed(observer, "d1", kind="since", error=failure)])
    assert observer._watermarks["d1"] == NOW  # a failed increment: listed from there


def test_a_listing_that_outlived_its_graph_is_dropped(observer: Observer) -> None:
    observer.cache.absorb_runs([run("a", "seen")])
    observer._watermarks["d1"] = NOW
    old_graph = object()
    relisted = observer._merge([listed(observer, "d1", run("a", "new"), desired=old_graph)])
    assert relisted == []
    assert set(observer.cache.runs) == {("a", "seen")}
    assert "d1" not in observer._watermarks  # listed afresh for the graph in force
