"""The eager path against a real etcd and the fake Airflow: a task-level event in etcd
(as the listener plugin writes it) makes the loop ask for the run's task instances, and
a downstream starts once every task of its upstream is done, before Airflow closes the
run; the same run closing later re-runs nothing. On both API generations (v2, and the fake's
v1 layer with the v1 client)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.observability import Health
from reconciler.service.runner import Runner
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1, api_of
from tests.helpers import EXAMPLE_DAGS

CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
RUN = run_id_for(CYCLE)


class TaskFake(FakeAirflow):
    """The fake Airflow, whose task instances (`tis`) a test sets; `on_arrival` hears of
    each request as it arrives (before the fake's lock, unlike `before_reply`)."""

    on_arrival: Callable[[str], None] | None = None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        if self.on_arrival is not None:
            self.on_arrival(h.path)
        return super()._handle(h, method)


class TaskFakeV1(TaskFake, FakeAirflowV1):
    """The same, as Airflow 2 answers (v1 paths, basic auth)."""


def ti(task_id: str, state: str | None, map_index: int = -1) -> dict[str, Any]:
    end = datetime.now(UTC).isoformat() if state in ("success", "skipped", "failed") else None
    return {"task_id": task_id, "map_index": map_index, "state": state, "end_date": end}


@pytest.fixture
def store(example_store: EtcdStore) -> EtcdStore:
    """The example graph synced (tests/fixtures/etcd.py)."""
    return example_store


@pytest.fixture(params=["v2", "v1"])
def fake(request: pytest.FixtureRequest) -> Iterator[TaskFake]:
    with (TaskFakeV1 if request.param == "v1" else TaskFake)(EXAMPLE_DAGS) as f:
        f.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                  run_type="scheduled")
        f.finish_all()
        yield f


def reconciler(store: EtcdStore, fake: FakeAirflow, **loop: Any) -> Reconciler:
    cls = AirflowV1Client if isinstance(fake, FakeAirflowV1) else AirflowClient
    api = cls(AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                              timeout=2, retries=2), backoff_initial=0.01)
    return Reconciler(store, api, LoopSettings(**{"interval": 0.05, "lease_ttl": 6, **loop}),
                      holder="r1")


def up_to_05_running(r: Reconciler, fake: FakeAirflow) -> None:
    r.run_pass()  # 02-05 triggered
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline"):
        fake.advance(dag_id, RUN, "running")
        fake.advance(dag_id, RUN, "success")
    fake.advance("05_pipeline", RUN, "running")
    r.run_pass()


def task_event(store: EtcdStore, dag_id: str, run_id: str, task_id: str) -> None:
    store.put(store.event_key(dag_id, run_id), json.dumps(
        {"kind": "task", "dag_id": dag_id, "run_id": run_id, "task_id": task_id,
         "state": "success"}).encode())


def watched(r: Reconciler) -> Runner:
    runner = Runner(r, Health())
    runner._ensure_watch()
    return runner


def wait_until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_task_event_with_every_task_done_triggers_the_downstream_before_the_run_ends(
        store: EtcdStore, fake: TaskFake) -> None:
    r = reconciler(store, fake)
    runner = watched(r)
    try:
        up_to_05_running(r, fake)
        fake.tis[("05_pipeline", RUN)] = [ti("extract", "success"),
                                         ti("mapped", "success", 0), ti("mapped", "success", 1),
                                         ti("branch_not_taken", "skipped"),
                                         ti("teardown", "success")]
        task_event(store, "05_pipeline", RUN, "teardown")
        wait_until(lambda: r.observer._task_events)  # the watch saw it
        report = r.run_pass()
        assert [a.dag_id for a in report.actions] == ["06_pipeline"]
        assert "eager" in report.actions[0].reason
        assert fake.run("05_pipeline", RUN).state == "running"  # Airflow has not closed it
        assert store.read_ledger()[(CYCLE.isoformat(), "06_pipeline")]["decided"] == "eager"
        observed = store.read_observed()[(CYCLE.isoformat(), "06_pipeline")]
        assert "eager path" in observed["message"]
        fake.advance("05_pipeline", RUN, "success")  # the scheduler closes the same run
        report = r.run_pass()
        assert [(a.kind.value, a.dag_id) for a in report.actions] == [("adopt", "06_pipeline")]
        assert r.run_pass().actions == []
        assert len(fake.runs("06_pipeline")) == 1
        assert fake.requests[f"POST {api_of(fake)}/dags/{{dag_id}}/dagRuns/{{run_id}}/clear"] == 0
    finally:
        runner._drop_watch()


@pytest.mark.parametrize("pending", ["up_for_retry", "running", "queued", None, "failed"])
def test_a_task_not_done_keeps_the_downstream_waiting(store: EtcdStore, fake: TaskFake,
                                                      pending: str | None) -> None:
    r = reconciler(store, fake)
    up_to_05_running(r, fake)
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success"), ti("load", pending)]
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    assert r.run_pass().actions == []
    assert fake.runs("06_pipeline") == []


def test_no_eager_waits_for_the_run_to_end(store: EtcdStore, fake: TaskFake) -> None:
    r = reconciler(store, fake, eager=False)
    up_to_05_running(r, fake)
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success")]
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    before = sum(fake.requests.values())
    assert r.run_pass().actions == []
    assert sum(fake.requests.values()) - before == 1  # no task-instance request either
    fake.advance("05_pipeline", RUN, "success")
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    assert store.read_ledger()[(CYCLE.isoformat(), "06_pipeline")]["decided"] == "run-end"


def test_a_run_cleared_after_the_check_is_not_eager_any_more(store: EtcdStore,
                                                             fake: TaskFake) -> None:
    r = reconciler(store, fake)
    up_to_05_running(r, fake)
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success")]
    fake.advance("05_pipeline", RUN, "queued")  # cleared in between: start reset
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    assert r.run_pass().actions == []
    assert fake.runs("06_pipeline") == []


def test_an_eager_trigger_whose_answer_is_lost_is_adopted_not_run_twice(
        store: EtcdStore, fake: TaskFake) -> None:
    """The trigger of 06 takes effect, its answer outlives the action's deadline, and the
    scheduler closes 05 (the eager upstream) after 06 has started: 06 is our run, on the
    same execution of 05, so it is adopted; a clear would run it a second time."""
    r = reconciler(store, fake, call_deadline=1.0)
    runner = watched(r)
    try:
        up_to_05_running(r, fake)
        fake.tis[("05_pipeline", RUN)] = [ti("extract", "success"), ti("load", "success")]
        task_event(store, "05_pipeline", RUN, "load")
        wait_until(lambda: r.observer._task_events)
        trigger = f"POST {api_of(fake)}/dags/{{dag_id}}/dagRuns"

        def lose_the_answer(request: Any) -> None:
            if request.route == trigger and request.dag_id == "06_pipeline":
                fake.before_reply = None
                fake.advance("06_pipeline", RUN, "running")
                fake.advance("05_pipeline", RUN, "success")  # later than 06's start
                time.sleep(2.5)  # past the action's deadline: the answer is lost

        fake.before_reply = lose_the_answer
        report = r.run_pass()
        assert [o.result for o in report.outcomes if o.action.dag_id == "06_pipeline"] == [
            "failed"]
        assert fake.run("06_pipeline", RUN).start_date < fake.run("05_pipeline", RUN).end_date
        report = r.run_pass()
        assert [(a.kind.value, a.dag_id) for a in report.actions] == [("adopt", "06_pipeline")]
        fake.advance("06_pipeline", RUN, "success")
        assert [(a.kind.value, a.dag_id) for a in r.run_pass().actions] == [
            ("trigger", "07_pipeline")]
        assert fake.requests[f"POST {api_of(fake)}/dags/{{dag_id}}/dagRuns/{{run_id}}/clear"] == 0
        assert len(fake.runs("06_pipeline")) == 1
    finally:
        fake.before_reply = None
        runner._drop_watch()


@pytest.mark.parametrize("cap", [100, 1000])
def test_every_page_of_a_wide_mapped_task_is_read_before_the_eager_trigger(
        store: EtcdStore, fake: TaskFake, cap: int) -> None:
    """250 map indexes: the one not done is on the third page when Airflow caps a page at
    its default 100; one request when `maximum_page_limit` is raised to the page size."""
    fake.maximum_page_limit = cap
    r = reconciler(store, fake)
    up_to_05_running(r, fake)
    mapped = [ti("mapped", "success", i) for i in range(250)]
    mapped[-1] = ti("mapped", "running", 249)
    fake.tis[("05_pipeline", RUN)] = mapped
    path = f"GET {api_of(fake)}/dags/{{dag_id}}/dagRuns/{{run_id}}/taskInstances"
    before = fake.requests[path]
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    assert r.run_pass().actions == []  # the last index is still running
    assert fake.requests[path] - before == (3 if cap == 100 else 1)
    mapped[-1] = ti("mapped", "success", 249)
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]


def test_the_task_instance_read_goes_out_beside_the_listing_not_after_it(
        store: EtcdStore, fake: TaskFake) -> None:
    """The event path waits for one round trip, not two: the listing's answer is held
    until the task-instance read has arrived, which it does only if both are in flight."""
    r = reconciler(store, fake)
    up_to_05_running(r, fake)
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success")]
    read_arrived = threading.Event()
    listing_saw_read: list[bool] = []

    api = api_of(fake)
    listings = {f"GET {api}/dags/~/dagRuns", f"POST {api}/dags/~/dagRuns/list"}

    def note_the_read(path: str) -> None:
        if "/taskInstances" in path:
            read_arrived.set()

    def hold_the_listing(request: Any) -> None:
        if request.route in listings:
            listing_saw_read.append(read_arrived.wait(3))

    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    fake.on_arrival, fake.before_reply = note_the_read, hold_the_listing
    try:
        report = r.run_pass()
    finally:
        fake.on_arrival = fake.before_reply = None
    assert listing_saw_read
    assert all(listing_saw_read), listing_saw_read
    assert [a.dag_id for a in report.actions] == ["06_pipeline"]
    assert "eager" in report.actions[0].reason


FANOUT = ("02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline")


def fan_out_running_with_every_task_done(r: Reconciler, fake: FakeAirflow,
                                         store: EtcdStore) -> None:
    """02-05 triggered and running, every task of each done, one task event each."""
    r.run_pass()
    for dag_id in FANOUT:
        fake.advance(dag_id, RUN, "running")
    r.run_pass()
    for dag_id in FANOUT:
        fake.tis[(dag_id, RUN)] = [ti("extract", "success"), ti("load", "success")]
        r.observer.on_event(store.event_key(dag_id, RUN), json.dumps({"kind": "task"}).encode())
    # what the batch may add and the client must drop: another DAG's run of the same id
    fake.tis[("07_pipeline", RUN)] = [ti("extract", "running")]


def test_the_task_events_of_several_runs_are_read_in_one_batch(
        store: EtcdStore, fake: TaskFake) -> None:
    r = reconciler(store, fake)
    fan_out_running_with_every_task_done(r, fake, store)
    api = api_of(fake)
    batch = f"POST {api}/dags/~/dagRuns/~/taskInstances/list"
    one = f"GET {api}/dags/{{dag_id}}/dagRuns/{{run_id}}/taskInstances"
    before = fake.requests[one]
    report = r.run_pass()
    assert [a.dag_id for a in report.actions] == ["06_pipeline"]
    assert "eager" in report.actions[0].reason
    assert fake.requests[batch] == 1  # four runs, one request
    assert fake.requests[one] == before


@pytest.mark.parametrize("told", [True, False])
def test_an_airflow_2_without_the_batch_paging_is_read_run_by_run(
        store: EtcdStore, told: bool) -> None:
    """2.9's batch form has no page_offset/page_limit: a client told the version never
    sends the batch; one not told learns it from the 400, once, and reads run by run."""
    with TaskFakeV1(EXAMPLE_DAGS, version="2.9.3") as fake:
        fake.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                     run_type="scheduled")
        fake.finish_all()
        api = AirflowV1Client(AirflowSettings(url=fake.url, username="admin",
                                              password="secret-pw", timeout=2, retries=2),
                              backoff_initial=0.01,
                              airflow_version="2.9.3" if told else None)
        r = Reconciler(store, api, LoopSettings(interval=0.05, lease_ttl=6), holder="r1")
        fan_out_running_with_every_task_done(r, fake, store)
        report = r.run_pass()
        assert [a.dag_id for a in report.actions] == ["06_pipeline"]
        batch = "POST /api/v1/dags/~/dagRuns/~/taskInstances/list"
        assert fake.requests[batch] == (0 if told else 1)
        assert fake.requests["GET /api/v1/dags/{dag_id}/dagRuns/{run_id}/taskInstances"] == 4
        assert api.batch_task_instances is False


def test_an_event_of_a_run_the_listing_first_shows_running_is_read_in_the_same_pass(
        store: EtcdStore, fake: TaskFake) -> None:
    """A short upstream: queued at the last look, then started and every task done before
    the next pass. Its event is not dropped for being asked before the listing: the read
    follows once the listing shows the run running."""
    r = reconciler(store, fake)
    r.run_pass()  # 02-05 triggered, queued as far as the loop knows
    for dag_id in ("02_pipeline", "03_pipeline", "04_pipeline"):
        fake.advance(dag_id, RUN, "running")
        fake.advance(dag_id, RUN, "success")
    fake.advance("05_pipeline", RUN, "running")  # not seen running by the loop yet
    fake.tis[("05_pipeline", RUN)] = [ti("extract", "success"), ti("load", "success")]
    r.observer.on_event(store.event_key("05_pipeline", RUN),
                        json.dumps({"kind": "task"}).encode())
    report = r.run_pass()
    assert [a.dag_id for a in report.actions] == ["06_pipeline"]
    assert "eager" in report.actions[0].reason
