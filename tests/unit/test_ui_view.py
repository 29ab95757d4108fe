"""What the UI's pages show, from the values etcd holds (reconciler/plugin/ui/view.py), and
what the wheel ships for them: the vendored graph library (pinned, licence kept) and pages
that load nothing from the network."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from reconciler.plugin.ui import view
from reconciler.plugin.ui.view import HIDDEN, Links

STATIC = Path(view.__file__).parent / "static"
CYTOSCAPE_SHA256 = "71fa9ebec21a7ca2c40cff6aacc30d1f6464e363662ad4b2c197e1adc770cd94"

EXAMPLE = {
    "01_pipeline_init": [],
    "02_pipeline": ["01_pipeline_init"], "03_pipeline": ["01_pipeline_init"],
    "04_pipeline": ["01_pipeline_init"], "05_pipeline": ["01_pipeline_init"],
    "06_pipeline": ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"],
    "07_pipeline": ["06_pipeline"],
}
CYCLE = "2026-01-01T00:00:00+00:00"
HEAD = {"commit": "a" * 40, "synced_at": "2026-01-01T00:00:00+00:00", "source": "ci@runner",
        "previous": None, "forced": False, "seq": 1}


def pipelines(owner: str = "team-dwh") -> dict[str, dict[str, Any]]:
    return {d: {"dag_id": d, "owner": owner, "depends_on": ups, "enabled": True}
            for d, ups in EXAMPLE.items()}


def record(dag_id: str, state: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"dag_id": dag_id, "cycle": CYCLE, "state": state, "reason": reason,
            "message": message, "run_id": extra.pop("run_id", None),
            "waiting_for": extra.pop("waiting_for", []),
            "blocked_by": extra.pop("blocked_by", []), "commit": "a" * 40, **extra}


def test_layers_are_the_longest_path_from_a_root_and_rows_are_centred() -> None:
    places = view.layout(EXAMPLE)
    assert {d: p[0] for d, p in places.items()} == {
        "01_pipeline_init": 0, "02_pipeline": 1, "03_pipeline": 1, "04_pipeline": 1,
        "05_pipeline": 1, "06_pipeline": 2, "07_pipeline": 3}
    assert sorted(places[d][1] for d in ("02_pipeline", "03_pipeline", "04_pipeline",
                                         "05_pipeline")) == [-1.5, -0.5, 0.5, 1.5]
    # a shortcut edge does not pull a node up: 07 also depends on the root directly
    assert view.layout({**EXAMPLE, "07_pipeline": ["06_pipeline", "01_pipeline_init"]}
                       )["07_pipeline"][0] == 3


def test_a_layer_is_ordered_by_its_upstreams_rows() -> None:
    graph = {"a": [], "b": [], "x": ["b"], "y": ["a"]}
    places = view.layout(graph)
    assert places["a"][1] < places["b"][1]
    assert places["y"][1] < places["x"][1]  # y hangs under a, x under b: no crossing


def test_the_graph_view_colours_each_pipeline_by_its_record_in_the_cycle() -> None:
    records = {
        "01_pipeline_init": record("01_pipeline_init", "done", "Done", "run succeeded",
                                   run_id="scheduled__x"),
        "06_pipeline": record("06_pipeline", "waiting", "WaitingFor",
                              "waiting for 03_pipeline (running)",
                              waiting_for=["03_pipeline"]),
    }
    out = view.graph_view(HEAD, pipelines(), records, cycle=CYCLE, cycles=[CYCLE],
                          suspended={"07_pipeline": {"by": "ops", "at": "t", "reason": "x"}},
                          beat=None, readable=set(EXAMPLE), links=Links(commit="u/{commit}"))
    nodes = {n["id"]: n for n in out["nodes"]}
    assert set(nodes) == set(EXAMPLE)
    assert (nodes["01_pipeline_init"]["state"], nodes["01_pipeline_init"]["run_id"]) == \
        ("done", "scheduled__x")
    assert nodes["06_pipeline"]["message"] == "waiting for 03_pipeline (running)"
    assert nodes["02_pipeline"]["state"] is None  # no record in this cycle
    assert nodes["07_pipeline"]["suspended"] is True
    assert ["06_pipeline", "07_pipeline"] in out["edges"]
    assert len(out["edges"]) == 9
    assert out["header"]["commit_url"] == "u/" + "a" * 40
    assert out["header"]["synced_by"] == "ci@runner"
    assert out["owners"] == ["team-dwh"]
    assert out["deployments"] == ["default"]


def test_a_dag_the_user_may_not_read_is_never_shown_nor_named() -> None:
    records = {"06_pipeline": record(
        "06_pipeline", "blocked", "BlockedBy", "blocked by failed 03_pipeline, 03_pipeline_x",
        blocked_by=["03_pipeline"])}
    readable = set(EXAMPLE) - {"03_pipeline"}
    out = view.graph_view(HEAD, pipelines(), records, cycle=CYCLE, cycles=[CYCLE],
                          suspended={"03_pipeline": {"by": "ops"}, "*": {"by": "ops"}},
                          beat=None, readable=readable, links=Links())
    nodes = {n["id"]: n for n in out["nodes"]}
    assert "03_pipeline" not in nodes
    assert all("03_pipeline" not in e for e in out["edges"])
    # masked as a whole id only: another id that merely starts with it stays
    assert nodes["06_pipeline"]["message"] == f"blocked by failed {HIDDEN}, 03_pipeline_x"
    assert set(out["header"]["suspended"]) == {"*"}


def test_the_dag_view_holds_its_neighbourhood_its_cycles_and_the_eager_path() -> None:
    history = [
        ("2026-01-02T00:00:00+00:00",
         record("06_pipeline", "running", "Running", "run running", run_id="reconciler__2"),
         {"action": "trigger", "decided": "eager"}),
        (CYCLE, record("06_pipeline", "done", "Done", "run succeeded", run_id="reconciler__1"),
         {"action": "trigger", "decided": "run-end"}),
        ("2025-12-31T00:00:00+00:00", None, None),
    ]
    current = {"02_pipeline": record("02_pipeline", "done", "Done", "run succeeded")}
    out = view.dag_view("06_pipeline", HEAD, pipelines(), history, current,
                        suspended={}, readable=set(EXAMPLE) - {"04_pipeline"},
                        links=Links(file="f/{commit}/{path}", pipelines_path="dags/pipes/"))
    p = out["pipeline"]
    assert p["upstreams"] == ["02_pipeline", "03_pipeline", HIDDEN, "05_pipeline"]
    assert p["downstreams"] == ["07_pipeline"]
    assert p["ancestors"] == ["01_pipeline_init", "02_pipeline", "03_pipeline", "05_pipeline"]
    assert p["hidden_neighbours"] == 1
    assert p["file"] == "dags/pipes/06_pipeline.yaml"
    assert p["file_url"] == f"f/{'a' * 40}/dags/pipes/06_pipeline.yaml"
    assert [(c["state"], c["eager"]) for c in out["cycles"]] == \
        [("running", True), ("done", False), (None, False)]
    nodes = {n["id"]: n for n in out["nodes"]}
    assert set(nodes) == set(EXAMPLE) - {"04_pipeline"}
    assert nodes["02_pipeline"]["state"] == "done"
    assert out["cycle"] == "2026-01-02T00:00:00+00:00"


def test_a_record_that_is_not_one_shows_as_no_status() -> None:
    assert view.status_of("garbage", set()) is None
    assert view.status_of({"state": 3}, set()) is None
    out = view.graph_view(HEAD, pipelines(), {"02_pipeline": ["not", "a", "record"]},
                          cycle=CYCLE, cycles=[CYCLE], suspended={}, beat=None,
                          readable=set(EXAMPLE), links=Links())
    assert {n["id"]: n["state"] for n in out["nodes"]}["02_pipeline"] is None


def test_links_are_absent_without_a_template_and_escaped_with_one() -> None:
    assert Links().commit_url("abc") is None
    assert Links().file_url("abc", "x") is None
    assert Links(commit="https://h/c/{commit}").commit_url("a/b") == "https://h/c/a%2Fb"


def test_the_graph_library_is_vendored_pinned_and_licensed() -> None:
    vendored = STATIC / "vendor" / "cytoscape"
    assert hashlib.sha256((vendored / "cytoscape.min.js").read_bytes()).hexdigest() == \
        CYTOSCAPE_SHA256
    assert "Permission is hereby granted" in (vendored / "LICENSE").read_text()
    assert "3.35.0" in (vendored / "VENDORED.md").read_text()


def test_the_pages_load_nothing_from_the_network() -> None:
    for name in ("page.html", "ui.js", "ui.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), name
        assert "@import" not in text
        assert "fetch(\"http" not in text


def test_the_plugin_module_imports_outside_airflow_and_defines_no_plugin_there() -> None:
    from reconciler.plugin.ui import plugin

    assert plugin.AirflowPlugin is None
    assert not hasattr(plugin, "ReconcilerUIPlugin")
    views = {v["destination"]: v for v in plugin.EXTERNAL_VIEWS}
    assert views["nav"]["href"] == "/reconciler/"
    assert views["nav"]["nav_top_level"] is True
    assert views["dag"]["href"] == "/reconciler/dags/{DAG_ID}"
    assert {v["url_route"] for v in views.values()} == {"reconciler-dependencies",
                                                        "reconciler"}
