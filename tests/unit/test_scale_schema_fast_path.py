"""The compiled schema predicate that lets valid files skip jsonschema (core/spec.py).

It may only ever vouch for a document jsonschema accepts: checked on generated documents
near the schema's edges, on every example file, and on hand-picked corner cases. It must
also vouch for ordinary valid files, or the fast path would never be taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core import spec
from reconciler.core.yamlload import Document, load_document

DATA = Path(__file__).resolve().parents[1] / "data"

fast = spec._certainly_valid()


def jsonschema_accepts(data: Any) -> bool:
    return not list(spec._validator().iter_errors(data))


ids = st.one_of(st.sampled_from(["a", "p_1", "x.y-z", "", "a\n", "a b", "reconciler",
                                 "é", "a" * 250, "a" * 251]), st.text(max_size=6))
values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(allow_nan=False),
                   ids, st.lists(ids, max_size=4))
conf = st.one_of(values, st.dictionaries(st.sampled_from(["a", "reconciler", "b"]), values,
                                         max_size=3))
documents = st.fixed_dictionaries({}, optional={
    "dag_id": st.one_of(ids, values), "owner": st.one_of(ids, values),
    "description": st.one_of(st.text(max_size=5), st.just("d" * 2001), values),
    "depends_on": st.one_of(st.lists(ids, max_size=4), values),
    "trigger_rule": st.one_of(st.sampled_from(["all_success", "all_done", "one_failed"]),
                              values),
    "enabled": values, "backfill": values, "conf": conf,
    "unknown": values, "dependson": values,
})


@settings(max_examples=2000, deadline=None)
@given(documents)
def test_it_never_vouches_for_what_jsonschema_refuses(data: dict[str, Any]) -> None:
    if fast is not None and fast(data):
        assert jsonschema_accepts(data), data


@given(st.lists(st.sampled_from(["a", "b", "c_1"]), unique=True, max_size=3),
       st.sampled_from(["all_success", "all_done"]), st.booleans(), st.booleans())
def test_it_vouches_for_ordinary_valid_files(ups: list[str], rule: str, enabled: bool,
                                              backfill: bool) -> None:
    data = {"dag_id": "d", "owner": "team", "description": "x", "depends_on": ups,
            "trigger_rule": rule, "enabled": enabled, "backfill": backfill,
            "conf": {"target": "mart", "n": 1}}
    assert fast is not None
    assert fast(data)
    assert jsonschema_accepts(data)


def test_corner_cases_go_to_jsonschema() -> None:
    assert fast is not None
    base = {"dag_id": "a", "owner": "t"}
    for bad in ({**base, "dag_id": "a\n"}, {**base, "depends_on": ["b", "b"]},
                {**base, "enabled": 1}, {**base, "trigger_rule": None},
                {**base, "conf": {"reconciler": 1}}, {**base, "conf": []},
                {"dag_id": "a"}, {**base, "owner": ""}, {**base, "depends_on": "b"},
                {**base, "depends_on": [1]}, {**base, "extra": 1}, ["not", "a", "mapping"]):
        assert not fast(bad), bad
        assert not jsonschema_accepts(bad), bad


def test_every_example_file_agrees() -> None:
    seen = vouched = 0
    for path in sorted(DATA.rglob("*.y*ml")):
        loaded = load_document(str(path), path.read_bytes())
        if not isinstance(loaded, Document):
            continue
        seen += 1
        if fast is not None and fast(loaded.data):
            vouched += 1
            assert jsonschema_accepts(loaded.data), path
    assert seen
    assert vouched


def test_an_unknown_keyword_turns_the_fast_path_off() -> None:
    assert spec._compile({"type": "object", "minProperties": 1}) is None
    assert spec._compile({"properties": {"a": {"type": "integer"}}}) is None
    assert spec._compile({"type": "string", "title": "annotations are fine"}) is not None
