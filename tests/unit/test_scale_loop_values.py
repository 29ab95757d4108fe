"""The cheap paths of issue 11 keep their behaviour: a stored fingerprint is read in its
stored order yet malformed ones are still refused (and quarantined by the observer), runs
and entries share their repeated strings, a relist that fails midway leaves the cache as
it was, the recorder's compact mirror tells changed records from unchanged exactly, and
the heap is settled (collected, frozen) after a relist."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.core.graph import Graph, Pipeline
from reconciler.core.plan import plan
from reconciler.core.state import (
    ActionKind,
    DagRun,
    Fingerprint,
    FingerprintItem,
    LedgerEntry,
    LedgerState,
    iso,
    run_id_for,
)
from reconciler.service.loop import building_heap, settle_heap
from reconciler.service.observer import Observer, RunCache
from reconciler.service.recorder import Recorder, compact, compact_of, observed_record

C = datetime(2026, 11, 1, tzinfo=UTC)


def entry(*items: tuple[str, str, str]) -> LedgerEntry:
    return LedgerEntry(run_id_for(C), ActionKind.TRIGGER, Fingerprint(items), "c0", C,
                       LedgerState.DONE)


# --- the ledger --------------------------------------------------------------------------


def test_a_stored_entry_reads_back_equal() -> None:
    e = entry(("b", "rb", iso(C)), ("a", "ra", ""), ("c", "rc", "eager:" + iso(C)))
    back = LedgerEntry.from_json(json.loads(json.dumps(e.to_json())))
    assert back == e
    assert type(back.fingerprint) is Fingerprint
    assert all(type(i) is FingerprintItem for i in back.fingerprint)
    assert [i.upstream for i in back.fingerprint] == ["a", "b", "c"]
    assert back.action is ActionKind.TRIGGER
    assert back.state is LedgerState.DONE


def test_entries_read_back_share_their_strings() -> None:
    one, two = (LedgerEntry.from_json(json.loads(json.dumps(
        entry((f"up{n}", run_id_for(C), iso(C)),).to_json()))) for n in (1, 2))
    assert one.run_id is two.run_id
    assert one.fingerprint[0].run_id is two.fingerprint[0].run_id
    assert one.commit is two.commit


def test_a_fingerprint_out_of_order_is_sorted_as_before() -> None:
    # not what this code writes; an older or hand-made one reads as it always did
    read = Fingerprint.from_json([["b", "r", "e"], ["a", "r", "e"]])
    assert read == Fingerprint([("a", "r", "e"), ("b", "r", "e")])


@pytest.mark.parametrize("fingerprint", [
    [["a", "r"]],                      # an item of two
    [["a", "r", "e", "x"]],            # an item of four
    [["a", 1, "e"]],                   # not a string
    [["a", "r", None]],
    ["are"],                           # a string, not an item
    "a,r,e",                           # not a list
    {"a": "r"},
    [None],
])
def test_a_malformed_fingerprint_is_refused(fingerprint: Any) -> None:
    data = entry(("a", "r", "e")).to_json()
    data["fingerprint"] = fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        LedgerEntry.from_json(data)


@pytest.mark.parametrize("change", [{"action": "explode"}, {"state": "maybe"},
                                    {"action": ["trigger"]}, {"at": ""}])
def test_a_malformed_entry_is_refused(change: dict[str, Any]) -> None:
    data = {**entry(("a", "r", "e")).to_json(), **change}
    with pytest.raises((ValueError, TypeError)):
        LedgerEntry.from_json(data)


class LedgerStore:
    def __init__(self, entries: dict[tuple[str, str], Any]) -> None:
        self.entries = entries

    def scan_ledger(self) -> Iterator[tuple[tuple[str, str], Any]]:
        return iter(self.entries.items())

    def ledger_key(self, cycle: str, dag_id: str) -> str:
        return f"/r/ns/ledger/{cycle}/{dag_id}"

    def scanned_key(self, kind: str, cycle: str, dag_id: str) -> str:
        return f"/r/ns/{kind}/{cycle}/{dag_id}"


def test_the_observer_quarantines_a_malformed_fingerprint_and_reads_the_rest() -> None:
    good = entry(("a", "ra", iso(C))).to_json()
    bad = {**good, "fingerprint": [["a", "ra"]]}
    worse = {**good, "fingerprint": [["a", 7, iso(C)]]}
    store = LedgerStore({(iso(C), "ok"): good, (iso(C), "bad"): bad,
                         (iso(C), "worse"): worse})
    observer = Observer(store, None, None, None)  # type: ignore[arg-type]
    ledger = observer.read_ledger()
    assert set(ledger) == {(C, "ok")}
    assert ledger[(C, "ok")] == LedgerEntry.from_json(good)
    assert set(observer.quarantined) == {f"/r/ns/ledger/{iso(C)}/bad",
                                         f"/r/ns/ledger/{iso(C)}/worse"}


def test_one_ledger_read_holds_each_item_and_cycle_once() -> None:
    item = ("up", "reconciler__x", iso(C))
    store = LedgerStore({(iso(C), "d1"): entry(item).to_json(),
                         (iso(C), "d2"): entry(item, ("other", "r", "")).to_json()})
    ledger = Observer(store, None, None, None).read_ledger()  # type: ignore[arg-type]
    one, two = ledger[(C, "d1")], ledger[(C, "d2")]
    assert one.fingerprint[0] is two.fingerprint[1]  # "other" < "up"
    (first, _), (second, _) = ledger
    assert first is second  # the cycle's datetime


# --- runs ------------------------------------------------------------------------------


def api_run(dag_id: str, run_id: str, **fields: Any) -> dict[str, Any]:
    return {"dag_id": dag_id, "dag_run_id": run_id, "logical_date": "2026-11-01T00:00:00Z",
            "state": "success", "queued_at": "2026-11-01T00:00:01Z",
            "start_date": "2026-11-01T00:00:02Z", "end_date": "2026-11-01T00:00:03.5Z",
            "run_type": "manual", "conf": {}, **fields}


def test_runs_share_their_cycle_and_strings_and_an_empty_conf() -> None:
    one = DagRun.from_api(json.loads(json.dumps(api_run("a", run_id_for(C)))))
    two = DagRun.from_api(json.loads(json.dumps(api_run("b", run_id_for(C)))))
    assert one.logical_date == C
    assert one.logical_date is two.logical_date
    assert one.run_id is two.run_id
    assert one.state is two.state
    assert one.conf == {}
    assert one.conf is two.conf
    with pytest.raises(TypeError):
        one.conf["x"] = 1  # type: ignore[index]  # shared: read-only
    three = DagRun.from_api(api_run("c", "r", conf={"k": [1]}))
    assert three.conf is one.conf  # a user's conf is not held: only the provenance
    four = DagRun.from_api(api_run("d", "r", conf={"k": "x" * 10**6, "reconciler": {"c": 1}}))
    assert four.conf == {"reconciler": {"c": 1}}
    assert one == DagRun("a", run_id_for(C), C, "success", C + timedelta(seconds=1),
                         C + timedelta(seconds=2), C + timedelta(seconds=3.5))


def test_a_naive_time_is_still_refused() -> None:
    with pytest.raises(ValueError, match="end_date must be timezone-aware"):
        DagRun("a", "r", C, "success", end_date=datetime(2026, 11, 1))


def test_a_relist_that_fails_midway_leaves_the_cache_as_it_was() -> None:
    cache = RunCache()
    cache.replace_all([api_run("a", "r1"), api_run("b", "r2")], {"a", "b"}, C, 1.0)
    before = dict(cache.runs)

    def listing() -> Iterator[dict[str, Any]]:
        yield api_run("a", "r3")
        raise ConnectionError("Airflow went away on page 2")

    with pytest.raises(ConnectionError):
        cache.replace_all(listing(), {"a", "b"}, C + timedelta(minutes=1), 2.0)
    assert cache.runs == before
    assert (cache.watermark, cache.listed_at) == (C, 1.0)
    cache.replace_all(iter([api_run("a", "r3")]), {"a", "b"}, C, 3.0)
    assert set(cache.runs) == {("a", "r3")}


# --- the recorder's mirror -------------------------------------------------------------------


def a_plan_of_every_kind() -> tuple[Any, dict[tuple[str, str], DagRun]]:
    graph = Graph([Pipeline("root"), Pipeline("ok", depends_on=("root",)),
                   Pipeline("bad", depends_on=("root",)),
                   Pipeline("blocked", depends_on=("bad", "ok")),
                   Pipeline("waits", depends_on=("ok", "running")),
                   Pipeline("running", depends_on=("root",)),
                   Pipeline("off", depends_on=("root",), enabled=False),
                   Pipeline("new", depends_on=("ok",))])
    t = C + timedelta(minutes=1)
    runs = [DagRun("root", "scheduled__x", C, "success", t, t, t + timedelta(seconds=5)),
            DagRun("ok", run_id_for(C), C, "success", t + timedelta(seconds=6),
                   t + timedelta(seconds=6), t + timedelta(seconds=9)),
            DagRun("bad", run_id_for(C), C, "failed", t + timedelta(seconds=6),
                   t + timedelta(seconds=6), t + timedelta(seconds=8)),
            DagRun("running", run_id_for(C), C, "running", t + timedelta(seconds=6),
                   t + timedelta(seconds=7))]
    result = plan(graph, runs, {}, C + timedelta(hours=1), window=timedelta(days=2),
                  commit="c0")
    return result, {(r.dag_id, r.run_id): r for r in runs}


def test_the_compact_form_of_a_status_is_that_of_its_stored_record() -> None:
    result, runs = a_plan_of_every_kind()
    assert len({s.state for s in result.statuses}) >= 5
    forms = set()
    for status in result.statuses:
        record = observed_record(status, runs)
        stored = json.loads(json.dumps(record))
        run = runs.get((status.dag_id, status.run_id)) if status.run_id else None
        assert compact(stored) == compact(record) == compact_of(status, iso(C), run)
        forms.add(compact(stored))
    assert len(forms) == len(result.statuses)


@pytest.mark.parametrize("change", [
    {"message": "another"}, {"state": "failed"}, {"waiting_for": ["x"]}, {"commit": "c1"},
    {"extra": 1}, {"run": {"state": "running", "start_date": None, "end_date": None}},
    {"run": "broken"},
])
def test_a_changed_or_odd_stored_record_does_not_match(change: dict[str, Any]) -> None:
    result, runs = a_plan_of_every_kind()
    status = next(s for s in result.statuses if s.dag_id == "ok")
    record = json.loads(json.dumps(observed_record(status, runs)))
    run = runs[(status.dag_id, status.run_id)]  # type: ignore[index]
    assert compact({**record, **change}) != compact_of(status, iso(C), run)
    assert compact("not a record") is None


class ObservedStore:
    def __init__(self) -> None:
        self.observed: dict[tuple[str, str], Any] = {}
        self.writes: list[str] = []

    def scan_observed(self) -> Iterator[tuple[tuple[str, str], Any]]:
        return ((k, json.loads(v)) for k, v in self.observed.items())

    def observed_key(self, cycle: str, dag_id: str) -> str:
        return f"{cycle}/{dag_id}"

    def put_fenced(self, holder: str, puts: list[tuple[str, bytes]]) -> bool:
        for key, value in puts:
            cycle, _, dag_id = key.rpartition("/")
            self.observed[(cycle, dag_id)] = value
            self.writes.append(dag_id)
        return True


def test_a_new_term_writes_only_what_etcd_does_not_hold_already() -> None:
    result, runs = a_plan_of_every_kind()
    store = ObservedStore()
    first = Recorder(store, "me")  # type: ignore[arg-type]
    assert first.record(result, runs) == len(result.statuses)
    store.writes.clear()
    # another replica's term: it loads the mirror from etcd and writes nothing
    second = Recorder(store, "other")  # type: ignore[arg-type]
    assert second.record(result, runs) == 0
    assert second.mirror is not None
    assert all(isinstance(v, tuple) for v in second.mirror.values())
    # one record changed behind its back (a stale or hand-edited value): rewritten
    key = (iso(C), "ok")
    store.observed[key] = json.dumps({**json.loads(store.observed[key]), "message": "x"})
    third = Recorder(store, "third")  # type: ignore[arg-type]
    assert third.record(result, runs) == 1
    assert store.writes == ["ok"]


def test_a_new_term_logs_only_the_states_that_changed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="reconciler")
    result, runs = a_plan_of_every_kind()
    store = ObservedStore()
    Recorder(store, "me").record(result, runs)  # type: ignore[arg-type]
    first = [r for r in caplog.records if r.getMessage() == "state"]
    assert {r.fields["dag_id"] for r in first} >= {"ok", "bad", "blocked"}  # type: ignore[attr-defined]
    caplog.clear()
    key = (iso(C), "ok")
    store.observed[key] = json.dumps({**json.loads(store.observed[key]), "state": "running"})
    Recorder(store, "other").record(result, runs)  # type: ignore[arg-type]
    again = [r.fields["dag_id"] for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "state"]
    assert again == ["ok"]  # the one that etcd held otherwise; not every done status again


# --- the heap --------------------------------------------------------------------------


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic GC frees it


def test_settling_the_heap_collects_then_freezes() -> None:
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    try:
        settle_heap()
        assert gone() is None
        frozen = gc.get_freeze_count()
        assert frozen > 0
        kept = [Node() for _ in range(100)]
        settle_heap()  # the next relist freezes what it built too
        assert gc.get_freeze_count() >= frozen + 100
        assert all(n.me is n for n in kept)
    finally:
        gc.unfreeze()


def test_a_relisting_pass_runs_with_the_gc_paused_and_ends_frozen() -> None:
    seen: list[bool] = []
    try:
        with building_heap(True):
            seen.append(gc.isenabled())
        assert seen == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        with pytest.raises(RuntimeError), building_heap(True):
            raise RuntimeError("Airflow went away")
        assert gc.isenabled()  # a failed pass gives the GC back, freezes nothing
        assert gc.get_freeze_count() == 0
        with building_heap(False):
            seen.append(gc.isenabled())
        assert seen == [False, True]
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
