"""The Airflow client against a hostile API (tests/fixtures/hostile.py): every call ends
by its deadline however the answer trickles in, every answer has a size bound, every
listing a bound on its pages and its time, and a listing that does not advance stops. The
v2 client and the v1 client (Airflow 2) alike."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from reconciler.adapters.airflow import (
    AirflowAnswerTooLarge,
    AirflowClient,
    AirflowRunawayListing,
    AirflowUnavailable,
)
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.core.errors import NeedsHuman
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import DagRun
from tests.fixtures.hostile import (
    HostileAirflow,
    endless_pages,
    fat_runs,
    huge,
    repeat_page,
    slowly,
    trickle_body,
    trickle_headers,
)

ROOT = "01_pipeline_init"
MiB = 2**20


@pytest.fixture(params=["v2", "v1"])
def hostile(request: pytest.FixtureRequest) -> Iterator[HostileAirflow]:
    """The hostile stub, met by the v2 client or by the v1 client (basic auth, /api/v1)."""
    with HostileAirflow() as stub:
        stub.generation = request.param
        yield stub


def client(stub: HostileAirflow, *, deadline: float = 2.0, **settings: Any) -> AirflowClient:
    options: dict[str, Any] = {"timeout": 10, "retries": 3, **settings}
    cls = AirflowV1Client if stub.generation == "v1" else AirflowClient
    return cls(AirflowSettings(url=stub.url, username="admin", password="pw", **options),
               deadline=deadline, backoff_initial=0.01)


def ends(call: Callable[[], Any], within: float = 15.0) -> BaseException | Any:
    """Run `call` on a thread; what it raised (or returned), failing if it is still running
    after `within` seconds (the old client hung there for good)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"the call was still running after {within} s"
    return out[0]


@pytest.mark.parametrize("behaviour", [trickle_body(0.5), trickle_headers(0.5)],
                         ids=["body-trickled", "headers-trickled"])
def test_a_trickled_answer_ends_at_the_calls_deadline(hostile: HostileAirflow,
                                                     behaviour: Any) -> None:
    hostile.behave(behaviour)
    api = client(hostile, deadline=2.0)
    error = ends(lambda: api.list_runs([ROOT]))
    assert isinstance(error, AirflowUnavailable), error
    assert "no whole answer within 2 s" in str(error)
    assert error.no_answer  # the executor reads the run before it acts again
    # The deadline is the whole call's: retries did not each get another 2 s.
    assert hostile.count(b"/dagRuns") == 1


def test_a_trickled_answer_to_one_call_leaves_the_next_call_working(
        hostile: HostileAirflow) -> None:
    hostile.behave(trickle_body(0.3))
    api = client(hostile, deadline=1.0)
    assert isinstance(ends(lambda: api.get_run(ROOT, "r")), AirflowUnavailable)
    hostile.behave(repeat_page(total=2))
    assert [r["dag_run_id"] for r in api.list_runs([ROOT])] == ["scheduled__0",
                                                                "scheduled__1"]


def test_a_page_repeated_for_every_offset_stops_the_listing_at_once(
        hostile: HostileAirflow) -> None:
    # total_entries plausible (a few pages) but the server ignores the offset: the old
    # client asked for page after page forever (902 requests in 40 s in the probe).
    hostile.behave(repeat_page(total=1000))
    api = client(hostile)
    error = ends(lambda: api.list_runs([ROOT]))
    assert isinstance(error, AirflowRunawayListing), error
    assert isinstance(error, NeedsHuman)
    assert "does not advance" in str(error)
    assert "offset 2" in str(error)
    assert hostile.count(b"/dagRuns") == 2


def test_a_total_that_needs_more_pages_than_allowed_is_refused_on_the_first_page(
        hostile: HostileAirflow) -> None:
    hostile.behave(endless_pages(total=10**9))
    api = client(hostile)
    error = ends(lambda: api.list_runs([ROOT]))
    assert isinstance(error, AirflowRunawayListing), error
    assert "claims 1,000,000,000 entries" in str(error)
    assert "RECONCILER_AIRFLOW_MAX_PAGES" in str(error)
    assert hostile.count(b"/dagRuns") == 1


def test_a_listing_that_advances_but_never_ends_in_time_is_cut_at_the_listing_timeout(
        hostile: HostileAirflow) -> None:
    hostile.behave(slowly(0.1, endless_pages(total=2000)))  # 1,000 pages of 2
    api = client(hostile, listing_timeout=1.0)
    error = ends(lambda: api.list_runs([ROOT]))
    assert isinstance(error, AirflowRunawayListing), error
    assert "took more than 1 s" in str(error)
    assert hostile.count(b"/dagRuns") < 20


@pytest.mark.parametrize("length", [True, False], ids=["announced", "chunked"])
def test_an_answer_over_the_size_bound_is_refused(hostile: HostileAirflow,
                                                  length: bool) -> None:
    hostile.behave(huge(8 * MiB, length=length))
    api = client(hostile, max_answer_bytes=1 * MiB)
    error = ends(lambda: api.get_run(ROOT, "r"))
    assert isinstance(error, AirflowAnswerTooLarge), error
    assert "larger than 1,048,576 bytes" in str(error)
    assert "RECONCILER_AIRFLOW_MAX_ANSWER_BYTES" in str(error)


def test_a_page_over_the_size_bound_is_asked_again_in_smaller_pages(
        hostile: HostileAirflow) -> None:
    # Three runs with a conf of 300 KB each: a page of 100 is 900 KB... of 3: refused at
    # 512 KiB; the listing asks again with smaller pages and gets every run.
    hostile.behave(fat_runs(3, 300_000))
    api = client(hostile, max_answer_bytes=512 * 1024, page_size=100)
    runs = api.list_runs([ROOT])
    assert [r["dag_run_id"] for r in runs] == [f"scheduled__{n}" for n in range(3)]
    # What the loop keeps of such a run: not its conf.
    assert DagRun.from_api(runs[0]).conf == {}


def test_a_single_item_over_the_size_bound_fails_the_listing(hostile: HostileAirflow) -> None:
    hostile.behave(fat_runs(3, 2 * MiB))
    api = client(hostile, max_answer_bytes=1 * MiB, page_size=100)
    error = ends(lambda: api.list_runs([ROOT]))
    assert isinstance(error, AirflowAnswerTooLarge), error
    # 100 -> 25 -> 6 -> 1: a few requests, each refused on its Content-Length
    assert hostile.count(b"/dagRuns") == 4
