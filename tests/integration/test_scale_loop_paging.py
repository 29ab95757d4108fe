"""Paging at scale (issue 11): the fake caps `limit` at its `maximum_page_limit` without
saying so, as Airflow does; the client asks for `AirflowSettings.page_size` runs per
request (default 1000), advances by what each page held and stops on `total_entries`, so
a listing is complete whether the server caps the page or not; the observer absorbs a
relist page by page."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable
from reconciler.core.graph import Graph, Pipeline
from reconciler.core.settings import AirflowSettings, LoopSettings
from reconciler.service.observer import Desired, Observer, PagedRuns
from tests.fakes.fake_airflow import MAX_PAGE, FakeAirflow

CYCLE = datetime(2026, 11, 1, tzinfo=UTC)
LIST = "GET /api/v2/dags/~/dagRuns"
BATCH = "POST /api/v2/dags/~/dagRuns/list"


def client(url: str, page_size: int | None = None) -> AirflowClient:
    settings = AirflowSettings(url=url, username="admin", password="secret-pw", timeout=5.0)
    if page_size is not None:
        settings = AirflowSettings(url=url, username="admin", password="secret-pw",
                                   timeout=5.0, page_size=page_size)
    return AirflowClient(settings, backoff_initial=0.01, backoff_max=0.05)


def fill(fake: FakeAirflow, n: int, dag_ids: tuple[str, ...] = ("a", "b")) -> None:
    for i in range(n):
        fake.add_run(dag_ids[i % len(dag_ids)], f"r{i:05d}", CYCLE + timedelta(minutes=i),
                     state="success")


def raw_page(fake: FakeAirflow, query: str) -> dict:
    token = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{fake.url}/auth/token", data=json.dumps({"username": "admin",
                                                   "password": "secret-pw"}).encode(),
        headers={"Content-Type": "application/json"})).read())["access_token"]
    request = urllib.request.Request(f"{fake.url}/api/v2/dags/~/dagRuns?{query}",
                                     headers={"Authorization": f"Bearer {token}"})
    return dict(json.loads(urllib.request.urlopen(request).read()))


@pytest.fixture
def capped() -> Iterator[FakeAirflow]:
    """Airflow as installed: [api] maximum_page_limit = 100."""
    with FakeAirflow(["a", "b", "c"]) as f:
        yield f


@pytest.fixture
def raised() -> Iterator[FakeAirflow]:
    """AIRFLOW__API__MAXIMUM_PAGE_LIMIT=1000, as the README asks for."""
    with FakeAirflow(["a", "b", "c"], maximum_page_limit=1000) as f:
        yield f


def test_the_fake_caps_limit_silently_like_airflow(capped: FakeAirflow) -> None:
    fill(capped, 250)
    page = raw_page(capped, "limit=1000&offset=0&order_by=id")
    assert MAX_PAGE == 100
    assert len(page["dag_runs"]) == 100  # asked for 1000: served 100, and nothing says so
    assert page["total_entries"] == 250
    assert len(raw_page(capped, "limit=1000&offset=200&order_by=id")["dag_runs"]) == 50


def test_a_raised_maximum_page_limit_serves_the_limit_asked_for(raised: FakeAirflow) -> None:
    fill(raised, 1500)
    assert len(raw_page(raised, "limit=1000&offset=0&order_by=id")["dag_runs"]) == 1000
    assert len(raw_page(raised, "limit=2000&offset=0&order_by=id")["dag_runs"]) == 1000
    assert len(raw_page(raised, "limit=10&offset=0&order_by=id")["dag_runs"]) == 10


def test_the_default_page_size_is_1000() -> None:
    assert AirflowSettings().page_size == 1000
    with pytest.raises(ValueError, match="page-size"):
        AirflowSettings(page_size=0)


def test_a_capped_server_still_lists_every_run_by_offset(capped: FakeAirflow) -> None:
    fill(capped, 1050)
    api = client(capped.url)  # asks for 1000 per page, gets 100
    runs = api.list_runs(updated_at_gte=CYCLE - timedelta(days=1))
    assert [r["dag_run_id"] for r in runs] == [f"r{i:05d}" for i in range(1050)]
    assert capped.requests[LIST] == 11  # 10 full pages of 100, one of 50


def test_an_uncapped_server_answers_a_relist_in_few_requests(raised: FakeAirflow) -> None:
    fill(raised, 2500)
    api = client(raised.url)
    runs = api.list_runs(["a", "b"], updated_at_gte=CYCLE - timedelta(days=1))
    assert len(runs) == 2500
    assert len({r["dag_run_id"] for r in runs}) == 2500
    assert raised.requests[LIST] == 3  # 1000 + 1000 + 500


def test_a_smaller_page_size_is_honoured(raised: FakeAirflow) -> None:
    fill(raised, 250)
    runs = client(raised.url, page_size=60).list_runs(updated_at_gte=CYCLE)
    assert len(runs) == 250
    assert raised.requests[LIST] == 5  # 60 x 4 + 10


def test_the_batch_form_pages_by_the_setting_too(capped: FakeAirflow) -> None:
    fill(capped, 2100, ("a", "b", "c"))
    runs = client(capped.url).list_runs(["a", "b"])  # the batch POST is not capped
    assert len(runs) == 1400
    assert {r["dag_id"] for r in runs} == {"a", "b"}
    assert capped.requests[BATCH] == 2  # 1000 + 400
    assert capped.requests[LIST] == 0


def test_iter_runs_yields_the_same_runs_as_list_runs(capped: FakeAirflow) -> None:
    fill(capped, 330, ("a", "b", "c"))
    api = client(capped.url)
    since = CYCLE - timedelta(days=1)
    listed = api.list_runs(["a", "c"], updated_at_gte=since)
    streamed = api.iter_runs(["a", "c"], updated_at_gte=since)
    assert not isinstance(streamed, list)
    assert list(streamed) == listed
    assert {r["dag_id"] for r in listed} == {"a", "c"}
    assert len(listed) == 220
    assert isinstance(api, PagedRuns)  # the observer takes this path


def test_the_other_listings_page_through_one_helper(capped: FakeAirflow) -> None:
    api = client(capped.url)
    assert [d["dag_id"] for d in api.list_dags()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="page_size"):
        list(api.iter_runs(page_size=0))


class Clock:
    def now(self) -> datetime:
        return CYCLE + timedelta(days=5)

    def monotonic(self) -> float:
        return 0.0


def observer_of(fake: FakeAirflow, n: int) -> tuple[Observer, AirflowClient, datetime]:
    now = Clock().now()
    for i in range(n):
        fake.add_run("a" if i % 3 else "b", f"r{i:05d}", now - timedelta(hours=1, minutes=i),
                     state="success", start_date=now - timedelta(minutes=30),
                     end_date=now - timedelta(minutes=20))
    api = client(fake.url)
    observer = Observer(None, api, LoopSettings(), Clock())  # type: ignore[arg-type]  # no etcd
    observer.desired = Desired("c0", Graph([Pipeline("a", depends_on=("b",)), Pipeline("b")]),
                               {})
    return observer, api, now


def test_the_observer_relists_every_run_page_by_page(capped: FakeAirflow) -> None:
    """1,050 runs through a server that serves 100 a page: all in the cache, each page
    parsed into runs before the next is asked for (the API's dicts are never all held)."""
    observer, api, now = observer_of(capped, 1050)
    held_before_page: list[int] = []
    original = api._pages

    def watched(*args, **kwargs):  # type: ignore[no-untyped-def]
        for page in original(*args, **kwargs):
            held_before_page.append(len(observer.cache.runs))
            yield page

    api._pages = watched  # type: ignore[method-assign]
    observer.relist({"a", "b"}, now - timedelta(days=2), now, 0.0)
    assert len(observer.cache.runs) == 1050
    assert held_before_page == [100 * k for k in range(11)]


def test_a_relist_that_fails_midway_leaves_the_cache_as_it_was(capped: FakeAirflow) -> None:
    observer, _, now = observer_of(capped, 450)
    observer.relist({"a", "b"}, now - timedelta(days=2), now, 0.0)
    before = dict(observer.cache.runs)
    assert len(before) == 450
    capped.add_run("a", "late", now - timedelta(minutes=5), state="running",
                   start_date=now - timedelta(minutes=4))
    served = capped.requests[LIST]

    def fail_after_two_pages(request):  # type: ignore[no-untyped-def]
        if request.route == LIST and capped.requests[LIST] == served + 2:
            capped.fail_next(10, "503", route=LIST)

    capped.before_reply = fail_after_two_pages
    with pytest.raises(AirflowUnavailable):
        observer.relist({"a", "b"}, now - timedelta(days=2), now, 1.0)
    assert observer.cache.runs == before
    assert observer.cache.listed_at == 0.0  # the next pass relists again
    capped.before_reply = None
    capped.clear_faults()
    observer.relist({"a", "b"}, now - timedelta(days=2), now, 2.0)
    assert len(observer.cache.runs) == 451
