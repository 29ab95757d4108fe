"""The loop's roles against a real etcd and the fake Airflow API: the scenarios of DESIGN
section 1, quiet passes, crashes between intent and call, replicas and fencing, lost
answers, corrupt stored data, the window, pull mode. Dates are relative to now. Every test
with the fake runs against both API generations: v2 (Airflow 3) and v1 (Airflow 2, the
fake's v1 layer and the v1 client), and v1 of an Airflow before 2.6, whose run listing has
no `updated_at` filter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.errors import MIN_BACKOFF
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from reconciler.service.puller import Puller
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.helpers import example_repo, git

DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]
EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]
# The cycle: the start of the current hour, so runs and the window agree on any day.
CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return example_repo(tmp_path / "repo")


@pytest.fixture
def store(etcd_settings: EtcdSettings, repo: Path) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings)
    # Synced well before the cycles open, so the backfill: false rule lets them run.
    result = sync(repo, "HEAD", "pipelines", s, source="test",
                  now=datetime.now(UTC) - timedelta(days=60))
    assert result.ok, result
    yield s
    s.close()


@pytest.fixture(params=["v2", "v1", "v1-2.5"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    if request.param == "v2":
        made: FakeAirflow = FakeAirflow(DAGS)
    else:
        made = FakeAirflowV1(DAGS, version="2.5.3" if request.param == "v1-2.5" else "2.11.2")
    with made as f:
        yield f


def client(fake: FakeAirflow) -> AirflowClient:
    settings = AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                               timeout=2, retries=2)
    if isinstance(fake, FakeAirflowV1):
        return AirflowV1Client(settings, backoff_initial=0.01, backoff_max=0.05,
                               airflow_version=fake.version)
    return AirflowClient(settings, backoff_initial=0.01, backoff_max=0.05)


def reconciler(store: EtcdStore, fake: FakeAirflow, holder: str = "r1", *,
               api: Any = None, **loop: Any) -> Reconciler:
    settings = LoopSettings(**{"interval": 0.05, "lease_ttl": 6, **loop})
    return Reconciler(store, api or client(fake), settings, holder=holder)


def open_cycle(fake: FakeAirflow, cycle: datetime = CYCLE) -> None:
    fake.add_run("01_pipeline_init", f"scheduled__{cycle.isoformat()}", cycle,
                 run_type="scheduled")
    fake.finish_all()


def converge(r: Reconciler, fake: FakeAirflow, passes: int = 12) -> None:
    for _ in range(passes):
        report = r.run_pass()
        if not report.actions and fake.finish_all() == 0:
            return
        fake.finish_all()
    raise AssertionError("did not converge")


def runs_of(fake: FakeAirflow, dag_id: str) -> list[str]:
    return [r.run_id for r in fake.runs(dag_id)]


def assert_once_per_cycle(fake: FakeAirflow, cycles: list[datetime]) -> None:
    for dag_id in DAGS[1:]:
        assert sorted(runs_of(fake, dag_id)) == sorted(run_id_for(c) for c in cycles), dag_id


def test_normal_cycle_runs_every_downstream_once_in_order(store: EtcdStore,
                                                           fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    first = r.run_pass()
    assert sorted(a.dag_id for a in first.actions) == EXTRACTS
    assert r.run_pass().actions == []  # 02-05 still queued: 06 waits
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["07_pipeline"]
    fake.finish_all()
    assert r.run_pass().actions == []
    for dag_id in DAGS[1:]:
        (run,) = fake.runs(dag_id)
        assert run.run_id == run_id_for(CYCLE)
        assert run.logical_date == CYCLE
        provenance = run.conf["reconciler"]
        assert provenance["cycle"] == CYCLE.isoformat()
        assert len(provenance["commit"]) == 40
    assert fake.run("06_pipeline", run_id_for(CYCLE)).conf["target"] == "mart"


def test_a_quiet_pass_costs_one_airflow_request_and_no_etcd_write(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    quiet = r.run_pass()
    assert quiet.actions == []
    # before 2.6 (no updated_at filter): the active runs and the recently ended ones
    assert quiet.airflow_requests == (1 if getattr(fake, "updated_at_filter", True) else 2)
    assert quiet.etcd_writes == 0


def test_a_rerun_of_03_reruns_06_and_07_only(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    ends = {d: fake.run(d, run_id_for(CYCLE)).end_date for d in DAGS[1:]}
    fake.advance("03_pipeline", run_id_for(CYCLE), "queued")  # a user clears 03 in the UI
    assert r.run_pass().actions == []  # 03 is running again: 06 waits
    fake.advance("03_pipeline", run_id_for(CYCLE), "success")
    assert [(a.kind.value, a.dag_id) for a in r.run_pass().actions] == [("clear", "06_pipeline")]
    fake.finish_all()
    assert [(a.kind.value, a.dag_id) for a in r.run_pass().actions] == [("clear", "07_pipeline")]
    fake.finish_all()
    assert r.run_pass().actions == []
    for dag_id in ("02_pipeline", "04_pipeline", "05_pipeline"):
        assert fake.run(dag_id, run_id_for(CYCLE)).end_date == ends[dag_id]
    for dag_id in ("06_pipeline", "07_pipeline"):
        assert fake.run(dag_id, run_id_for(CYCLE)).end_date > ends[dag_id]
        assert len(fake.runs(dag_id)) == 1


def test_runs_missed_while_stopped_are_all_triggered_once(store: EtcdStore,
                                                           fake: FakeAirflow) -> None:
    cycles = [CYCLE - timedelta(hours=2), CYCLE - timedelta(hours=1), CYCLE]
    for cycle in cycles:
        open_cycle(fake, cycle)
    converge(reconciler(store, fake), fake)
    assert_once_per_cycle(fake, cycles)


def test_a_weekly_root_and_a_backfill_of_last_month_are_reconciled(
        store: EtcdStore, fake: FakeAirflow) -> None:
    weekly = CYCLE - timedelta(days=7)  # data-interval timetable: logical date = its start
    backfill = CYCLE - timedelta(days=30)
    for cycle in (weekly, backfill):
        open_cycle(fake, cycle)  # queued now, so inside the 2-day window
    converge(reconciler(store, fake), fake)
    assert_once_per_cycle(fake, [backfill, weekly])


def test_failed_upstream_blocks_and_status_says_why(store: EtcdStore,
                                                    fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    r.run_pass()
    fake.advance("04_pipeline", run_id_for(CYCLE), "running")
    fake.advance("04_pipeline", run_id_for(CYCLE), "failed")
    fake.finish_all()
    report = r.run_pass()
    assert report.actions == []
    assert report.plan is not None
    status = report.plan.status("06_pipeline", CYCLE)
    assert status is not None
    assert status.state.value == "blocked"
    assert "04_pipeline" in status.message
    assert store.read_observed()[(CYCLE.isoformat(), "06_pipeline")]["state"] == "blocked"
    assert fake.runs("06_pipeline") == []


class Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


def test_crash_between_intent_and_call_neither_duplicates_nor_loses(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    api = client(fake)
    real_trigger = api.trigger
    calls: list[str] = []

    def dying_trigger(dag_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(dag_id)
        if dag_id == "03_pipeline":
            raise Crash  # after the intent of this action, before its call
        return real_trigger(dag_id, *args, **kwargs)

    api.trigger = dying_trigger  # type: ignore[method-assign]
    r = reconciler(store, fake, api=api, concurrency=1)
    with pytest.raises(Crash):
        r.run_pass()
    assert store.read_ledger()[(CYCLE.isoformat(), "03_pipeline")]["state"] == "intent"
    assert fake.runs("03_pipeline") == []
    store.resign(r.leadership.lease)  # the lease would lapse after its TTL
    converge(reconciler(store, fake, holder="r1-restarted"), fake)
    assert_once_per_cycle(fake, [CYCLE])


def test_crash_after_the_call_before_the_result_adopts_on_409(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    api = client(fake)
    real_trigger = api.trigger

    def trigger_then_die(*args: Any, **kwargs: Any) -> Any:
        real_trigger(*args, **kwargs)
        raise Crash

    api.trigger = trigger_then_die  # type: ignore[method-assign]
    r = reconciler(store, fake, api=api, concurrency=1)
    with pytest.raises(Crash):
        r.run_pass()
    store.resign(r.leadership.lease)
    converge(reconciler(store, fake, holder="r2"), fake)
    assert_once_per_cycle(fake, [CYCLE])


def lose_clear_answers(api: AirflowClient, lost: list[str]) -> None:
    """The clear POST reaches Airflow and takes effect, but its answer never comes back."""
    session = requests.Session()
    session.trust_env = False
    real = session.request

    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        response = real(method, url, **kwargs)
        if method == "POST" and url.endswith("/clear"):
            lost.append(url)
            raise requests.ReadTimeout("the answer was lost")
        return response

    session.request = request  # type: ignore[method-assign]
    api._shared_session = session


def test_a_clear_whose_answer_is_lost_reruns_the_downstream_exactly_once(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    fake.advance("03_pipeline", run_id_for(CYCLE), "queued")
    fake.advance("03_pipeline", run_id_for(CYCLE), "success")
    lost: list[str] = []
    lose_clear_answers(r.api, lost)  # type: ignore[arg-type]
    before = fake.requests.copy()
    r.run_pass()
    r.run_pass()  # a pass on the stale cache must not clear again
    clears = sum(n - before.get(k, 0) for k, n in fake.requests.items()
                 if k.startswith("POST") and "clear" in k)
    assert lost, "the fault was not injected"
    assert clears == 1
    run06 = fake.run("06_pipeline", run_id_for(CYCLE))
    assert run06.state in ("queued", "running")
    fake.finish_all()
    r.api._shared_session = None  # type: ignore[attr-defined]
    converge(r, fake)
    assert_once_per_cycle(fake, [CYCLE])


def hold_first_clear(api: AirflowClient, held: list[tuple[str, str, dict[str, Any]]]
                     ) -> requests.Session:
    """The first clear POST gets no answer in time and is not applied yet (an API server
    still working on it): the test delivers it later from `held`, or never."""
    session = requests.Session()
    session.trust_env = False
    real = session.request

    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        if method == "POST" and url.endswith("/clear") and not held:
            held.append((method, url, kwargs))
            raise requests.ReadTimeout("no answer in time (the clear lands later)")
        return real(method, url, **kwargs)

    session.request = request  # type: ignore[method-assign]
    api._shared_session = session
    return session


def passes_past_retry_delay(r: Reconciler) -> None:
    """Passes every 0.2 s until a failed action's first retry is surely due: its delay is
    drawn (equal jitter) from [MIN_BACKOFF / 2, MIN_BACKOFF], so a fixed count of passes
    could all fall before it."""
    until = time.monotonic() + MIN_BACKOFF + 0.5
    while time.monotonic() < until:
        time.sleep(0.2)
        r.run_pass()


def clears_since(fake: FakeAirflow, before: dict[str, int]) -> int:
    return sum(n - before.get(k, 0) for k, n in fake.requests.items()
               if k.startswith("POST") and "clear" in k)


def test_a_clear_unanswered_in_time_that_lands_later_reruns_the_downstream_once(
        store: EtcdStore, fake: FakeAirflow) -> None:
    # Simulation seeds 257, 339, 350 ...: the clear's POST timed out, the client read the
    # run (not restarted yet) and sent it again; the first one landed later: two re-runs.
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    fake.advance("03_pipeline", run_id_for(CYCLE), "queued")
    fake.advance("03_pipeline", run_id_for(CYCLE), "success")
    held: list[tuple[str, str, dict[str, Any]]] = []
    session = hold_first_clear(r.api, held)  # type: ignore[arg-type]
    before = fake.requests.copy()
    r.run_pass()
    assert held, "the fault was not injected"
    assert clears_since(fake, before) == 0  # not sent again within the same call
    method, url, kwargs = held[0]
    requests.Session.request(session, method, url, **kwargs)  # it lands now
    passes_past_retry_delay(r)
    assert fake.clear_count("06_pipeline", run_id_for(CYCLE)) == 1
    fake.finish_all()
    converge(r, fake)
    assert fake.clear_count("06_pipeline", run_id_for(CYCLE)) == 1
    assert_once_per_cycle(fake, [CYCLE])


def test_a_clear_unanswered_that_never_lands_is_sent_once_by_a_later_pass(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    fake.advance("03_pipeline", run_id_for(CYCLE), "queued")
    fake.advance("03_pipeline", run_id_for(CYCLE), "success")
    held: list[tuple[str, str, dict[str, Any]]] = []
    hold_first_clear(r.api, held)  # type: ignore[arg-type]
    r.run_pass()
    assert held, "the fault was not injected"
    assert fake.clear_count("06_pipeline", run_id_for(CYCLE)) == 0  # dropped for good
    passes_past_retry_delay(r)
    assert fake.clear_count("06_pipeline", run_id_for(CYCLE)) == 1
    fake.finish_all()
    converge(r, fake)
    assert fake.clear_count("06_pipeline", run_id_for(CYCLE)) == 1
    assert_once_per_cycle(fake, [CYCLE])


def test_only_the_leader_acts_and_a_standby_takes_over(store: EtcdStore,
                                                       fake: FakeAirflow) -> None:
    open_cycle(fake)
    a, b = reconciler(store, fake, "a"), reconciler(store, fake, "b")
    assert a.run_pass().leader
    fake.finish_all()
    requests_before = sum(fake.requests.values())
    standby = b.run_pass()
    assert not standby.leader
    assert standby.actions == []
    assert sum(fake.requests.values()) == requests_before  # a standby costs Airflow nothing
    a.leadership.stop()  # resigns: the lease goes, b takes over on its next campaign
    b.leadership.tick()  # what b's leadership thread does within a second
    took_over = b.run_pass()
    assert took_over.leader
    assert [x.dag_id for x in took_over.actions] == ["06_pipeline"]
    for dag_id in EXTRACTS:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)]


def test_a_deposed_leader_cannot_write_the_ledger(store: EtcdStore, fake: FakeAirflow) -> None:
    from reconciler.core.errors import LostLeadership

    open_cycle(fake)
    a = reconciler(store, fake, "a")
    a.run_pass()
    store.resign(a.leadership.lease)  # a's lease is gone but `a` does not know yet
    b = reconciler(store, fake, "b")
    assert b.run_pass().leader
    fake.finish_all()
    a.leadership._next = a.clock.monotonic() + 60  # a believes it still leads
    with pytest.raises(LostLeadership):
        a.run_pass()
    assert fake.runs("06_pipeline") == []


def test_the_lease_is_kept_alive_while_an_airflow_call_takes_longer_than_its_ttl(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    api = client(fake)
    real_trigger = api.trigger

    def slow_trigger(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3.5)  # longer than the lease TTL below
        return real_trigger(*args, **kwargs)

    api.trigger = slow_trigger  # type: ignore[method-assign]
    r = reconciler(store, fake, api=api, lease_ttl=3, call_deadline=2.0)
    r.executor.pacer.limit = 4  # all four calls in one pass (the pacer starts at 1)
    r.leadership.start()
    try:
        deadline = time.monotonic() + 5
        while not r.leadership.is_leader():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rival = reconciler(store, fake, "rival", lease_ttl=3)
        r.run_pass()
        assert r.leadership.is_leader()
        assert not rival.run_pass().leader
        assert store.leader() == r.holder
    finally:
        r.leadership.stop()
    assert_once_per_cycle_of(fake, EXTRACTS)


def assert_once_per_cycle_of(fake: FakeAirflow, dag_ids: list[str]) -> None:
    for dag_id in dag_ids:
        assert runs_of(fake, dag_id) == [run_id_for(CYCLE)], dag_id


def test_a_fan_out_goes_out_concurrently(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    api = client(fake)
    real_trigger = api.trigger
    in_flight, peak, lock = [0], [0], threading.Lock()

    def counting_trigger(*args: Any, **kwargs: Any) -> Any:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.3)
        try:
            return real_trigger(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    api.trigger = counting_trigger  # type: ignore[method-assign]
    r = reconciler(store, fake, api=api)
    r.executor.pacer.limit = 8  # as after prompt answers (the pacer starts at 1)
    report = r.run_pass()
    assert sorted(a.dag_id for a in report.actions) == EXTRACTS
    assert peak[0] == 4


def test_an_action_does_not_start_without_enough_lease_left(store: EtcdStore,
                                                            fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    r.leadership.tick()
    r.leadership._expires = r.clock.monotonic() + 0.5  # almost gone
    r.leadership._next = r.clock.monotonic() + 60
    report = r.run_pass()
    assert report.actions == []
    assert {o.result for o in report.outcomes} == {"deferred"}
    assert fake.runs("02_pipeline") == []
    assert store.read_ledger() == {}


def test_airflow_5xx_is_retried_and_nothing_is_lost(store: EtcdStore, fake: FakeAirflow) -> None:
    from reconciler.adapters.airflow import AirflowUnavailable

    open_cycle(fake)
    r = reconciler(store, fake)
    fake.fail_next(5, "500")
    with pytest.raises(AirflowUnavailable):
        r.run_pass()
    fake.faults.clear()
    converge(r, fake)
    assert_once_per_cycle(fake, [CYCLE])


def test_a_corrupt_ledger_entry_is_quarantined_and_the_rest_goes_on(
        store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    store.put(store.ledger_key(CYCLE.isoformat(), "02_pipeline"), b"{not json")
    store.put(store.ledger_key(CYCLE.isoformat(), "03_pipeline"), b'{"run_id": 1}')
    r = reconciler(store, fake)
    r.ledger.entries()
    assert set(r.observer.quarantined) == {
        store.ledger_key(CYCLE.isoformat(), "02_pipeline"),
        store.ledger_key(CYCLE.isoformat(), "03_pipeline")}
    converge(r, fake)
    assert_once_per_cycle(fake, [CYCLE])
    assert r.observer.quarantined == {}  # rewritten by the actions
    # the bad values were replaced by good ones on the way
    ledger = store.read_ledger()
    assert ledger[(CYCLE.isoformat(), "02_pipeline")]["state"] == "done"


def test_a_corrupt_head_keeps_the_last_good_graph(store: EtcdStore, fake: FakeAirflow) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    r.run_pass()
    commit = r.observer.desired.commit  # type: ignore[union-attr]
    store.put(store.head_key(), b'{"commit": "abc"}')  # no synced_at
    r.observer.head_dirty.set()
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    assert r.observer.desired.commit == commit  # type: ignore[union-attr]
    assert store.head_key() in r.observer.quarantined


def test_closed_cycles_are_forgotten_by_a_fenced_delete(store: EtcdStore,
                                                        fake: FakeAirflow) -> None:
    old = CYCLE - timedelta(days=5)
    key = store.ledger_key(old.isoformat(), "02_pipeline")
    store.put(key, b'{"run_id": "x", "action": "trigger", "at": "2020-01-01T00:00:00+00:00"}')
    open_cycle(fake)
    r = reconciler(store, fake)
    r.run_pass()
    assert store.get(key).value is None
    from reconciler.adapters.store import NotLeader

    with pytest.raises(NotLeader):
        store.delete_cycle("someone-else", CYCLE.isoformat())
    assert store.read_ledger(CYCLE.isoformat())


def test_a_quiet_pass_reuses_the_plan_and_a_change_replans(
        store: EtcdStore, fake: FakeAirflow, monkeypatch: pytest.MonkeyPatch) -> None:
    import reconciler.service.loop as loop_module

    calls = []
    real_plan = loop_module.plan

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(loop_module, "plan", counting_plan)
    open_cycle(fake)
    r = reconciler(store, fake)
    converge(r, fake)
    calls.clear()
    r.run_pass()
    r.run_pass()
    assert calls == []  # nothing changed: the last plan stands
    open_cycle(fake, CYCLE + timedelta(minutes=1))  # a new root run arrives
    assert sorted(a.dag_id for a in r.run_pass().actions) == EXTRACTS
    assert calls


# --- pull mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True], ids=["local-path", "clone-url"])
def test_pull_mode_syncs_new_commits_of_the_branch_itself(etcd_settings: EtcdSettings,
                                                          tmp_path: Path, fake: FakeAirflow,
                                                          as_url: bool) -> None:
    origin = example_repo(tmp_path / "origin")
    with EtcdStore(etcd_settings) as s:
        r = reconciler(s, fake, "puller")
        source = f"file://{origin}" if as_url else str(origin)
        puller = Puller(source, "main", "pipelines", s, r.clock, interval=30,
                        workdir=str(tmp_path / "clone"), is_leader=r.leadership.is_leader)
        r.run_pass()
        puller.tick()
        r.run_pass()
        assert r.observer.desired is not None
        assert r.observer.desired.commit == git(origin, "rev-parse", "HEAD")
        (origin / "pipelines" / "08_pipeline.yaml").write_text(
            "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
        git(origin, "add", ".")
        git(origin, "commit", "-qm", "add 08")
        puller.tick()
        r.observer.head_dirty.set()  # what the etcd watch does in the runner
        r.run_pass()
        assert r.observer.desired.commit == git(origin, "rev-parse", "HEAD")
        assert "08_pipeline" in r.observer.desired.graph


def test_only_the_leader_pulls_and_an_unreachable_remote_never_stops_reconciling(
        store: EtcdStore, fake: FakeAirflow, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    open_cycle(fake)
    r = reconciler(store, fake)
    url = "http://user:s3cret-token@127.0.0.1:9/nothing.git"  # nothing listens on port 9
    puller = Puller(url, "main", "pipelines", store, r.clock, interval=30,
                    workdir=str(tmp_path / "clone"), is_leader=r.leadership.is_leader)
    standby_calls = []
    puller_standby = Puller(url, "main", "pipelines", store, r.clock, interval=30,
                            workdir=str(tmp_path / "clone2"), is_leader=lambda: False)
    puller_standby._fetch = lambda: standby_calls.append(1)  # type: ignore[assignment,method-assign,return-value]
    puller_standby.tick()
    assert standby_calls == []
    r.run_pass()
    caplog.set_level("INFO", logger="reconciler")
    first = puller.tick()
    second = puller.tick()
    assert puller.failures == 2
    assert first > 0
    assert second > 0
    failures_logged = [m for m in caplog.messages if m.startswith("pull failed")]
    assert len(failures_logged) == 1  # once per state change, not per attempt
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    text = " ".join(str(getattr(rec, "fields", "")) for rec in caplog.records)
    assert "s3cret-token" not in text
    assert "s3cret-token" not in (puller.last_error or "")
