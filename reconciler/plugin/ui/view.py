"""What the UI's two pages show, built from the values etcd holds: pure, standard library.

`graph_view` is the Dependencies page (every pipeline the user may read, drawn in layers,
coloured by its state in one cycle, with the synced head and the suspend marks above it);
`dag_view` is one pipeline's tab (its transitive upstreams and downstreams, and per recent
cycle its state, reason and message, the run, whether it was triggered on the eager path).

The states, reasons and messages are the observed mirror's records (`observed/<cycle>/
<dag_id>`, written by the leader's recorder), so they are word for word what `reconciler
status` prints from the mirror. A DAG the user may not read is left out: never a node,
and its id is masked in the messages and lists of the pipelines that wait for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

HIDDEN = "(a pipeline you may not read)"
"""What stands for a DAG id the user may not read, in messages and lists."""


@dataclass(frozen=True)
class Links:
    """URL templates from the API server's environment (empty: no link)."""

    commit: str = ""
    """e.g. https://github.com/org/pipelines/commit/{commit}"""
    file: str = ""
    """e.g. https://github.com/org/pipelines/blob/{commit}/{path}"""
    pipelines_path: str = "pipelines"
    """The folder of the pipeline files in the repository (sync's --path)."""

    def commit_url(self, commit: str | None) -> str | None:
        if not self.commit or not commit:
            return None
        return self.commit.replace("{commit}", quote(commit, safe=""))

    def file_path(self, dag_id: str) -> str:
        folder = self.pipelines_path.strip("/")
        return f"{folder}/{dag_id}.yaml" if folder else f"{dag_id}.yaml"

    def file_url(self, commit: str | None, dag_id: str) -> str | None:
        if not self.file or not commit:
            return None
        return (self.file.replace("{commit}", quote(commit, safe=""))
                .replace("{path}", quote(self.file_path(dag_id), safe="/")))


def upstreams_of(pipelines: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """{dag_id: its upstreams in the graph} (an upstream not in the graph is dropped)."""
    out: dict[str, list[str]] = {}
    for dag_id, p in pipelines.items():
        ups = p.get("depends_on") if isinstance(p, Mapping) else None
        out[dag_id] = sorted(str(u) for u in ups if str(u) in pipelines) \
            if isinstance(ups, list) else []
    return out


def downstreams_of(upstreams: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {d: [] for d in upstreams}
    for dag_id, ups in upstreams.items():
        for u in ups:
            out[u].append(dag_id)
    return out


def closure(start: str, edges: Mapping[str, Sequence[str]]) -> set[str]:
    """Every node reachable from `start` along `edges` (not `start` itself)."""
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return seen


def layout(upstreams: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, float]]:
    """{dag_id: (layer, row)}: a layered drawing computed once on the server, so the
    browser only places the nodes (a force or dagre layout of 5,000 nodes costs seconds).

    The layer is the longest path from a root; within a layer, nodes are sorted by the
    mean row of their upstreams (one barycentre sweep: few crossings on real graphs), then
    by id; rows are centred on 0. Upstreams outside `upstreams` are ignored."""
    downs = downstreams_of({d: [u for u in ups if u in upstreams]
                            for d, ups in upstreams.items()})
    indegree = {d: sum(1 for u in ups if u in upstreams) for d, ups in upstreams.items()}
    layer = {d: 0 for d, n in indegree.items() if n == 0}
    ready = sorted(layer)
    while ready:  # Kahn's order; the graph is acyclic (sync checks it)
        node = ready.pop()
        for down in downs[node]:
            layer[down] = max(layer.get(down, 0), layer[node] + 1)
            indegree[down] -= 1
            if indegree[down] == 0:
                ready.append(down)
    for d in upstreams:  # a cycle in bad stored data: still drawn, in layer 0
        layer.setdefault(d, 0)
    layers: dict[int, list[str]] = {}
    for d, n in layer.items():
        layers.setdefault(n, []).append(d)
    rows: dict[str, float] = {}
    out: dict[str, tuple[int, float]] = {}
    for n in sorted(layers):
        def barycentre(d: str) -> tuple[float, str]:
            placed = [rows[u] for u in upstreams[d] if u in rows]
            return (sum(placed) / len(placed) if placed else 0.0, d)

        members = sorted(layers[n], key=barycentre)
        middle = (len(members) - 1) / 2
        for i, d in enumerate(members):
            rows[d] = i - middle
            out[d] = (n, i - middle)
    return out


def _mask(text: str, hidden: Iterable[str]) -> str:
    for dag_id in sorted(hidden, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(dag_id)}(?![\w.-])", HIDDEN, text)
    return text


def status_of(record: Any, readable: set[str] | frozenset[str]) -> dict[str, Any] | None:
    """One observed record as the pages show it (None when it is not one), with the DAG
    ids the user may not read masked."""
    if not isinstance(record, Mapping) or not isinstance(record.get("state"), str):
        return None
    waiting = [str(d) for d in record.get("waiting_for") or []]
    blocked = [str(d) for d in record.get("blocked_by") or []]
    hidden = {d for d in waiting + blocked if d not in readable}
    run = record.get("run") if isinstance(record.get("run"), Mapping) else None
    return {
        "state": record["state"],
        "reason": str(record.get("reason") or ""),
        "message": _mask(str(record.get("message") or ""), hidden),
        "run_id": record.get("run_id") if isinstance(record.get("run_id"), str) else None,
        "run": dict(run) if run else None,
        "waiting_for": [d if d in readable else HIDDEN for d in waiting],
        "blocked_by": [d if d in readable else HIDDEN for d in blocked],
        "commit": str(record.get("commit") or ""),
    }


def header_of(head: Mapping[str, Any] | None, suspended: Mapping[str, Any],
              beat: Mapping[str, Any] | None, readable: set[str] | frozenset[str],
              links: Links) -> dict[str, Any]:
    """The synced head (commit, when, by whom, its link), the suspend marks the user may
    see (the namespace's, and those of readable DAGs), and the leader's last pass."""
    commit = str(head.get("commit") or "") if head else ""
    marks = {target: {k: str(v) for k, v in mark.items() if k in ("by", "at", "reason")}
             if isinstance(mark, Mapping) else {"reason": "unreadable"}
             for target, mark in suspended.items() if target == "*" or target in readable}
    return {
        "commit": commit or None,
        "commit_url": links.commit_url(commit),
        "synced_at": head.get("synced_at") if head else None,
        "synced_by": head.get("source") if head else None,
        "forced": bool(head.get("forced")) if head else False,
        "previous": head.get("previous") if head else None,
        "suspended": marks,
        "last_pass": beat.get("last_pass") if beat else None,
        "leader": beat.get("holder") if beat else None,
    }


def _node(dag_id: str, pipeline: Mapping[str, Any], place: tuple[int, float],
          status: dict[str, Any] | None, suspended: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": dag_id,
        "owner": str(pipeline.get("owner") or ""),
        "deployment": str(pipeline.get("deployment") or "default"),
        "enabled": pipeline.get("enabled", True) is not False,
        "suspended": dag_id in suspended or "*" in suspended,
        "layer": place[0],
        "row": place[1],
        "state": status["state"] if status else None,
        "reason": status["reason"] if status else None,
        "message": status["message"] if status else None,
        "run_id": status["run_id"] if status else None,
    }


def graph_view(head: Mapping[str, Any] | None, pipelines: Mapping[str, Mapping[str, Any]],
               records: Mapping[str, Any], *, cycle: str | None, cycles: Sequence[str],
               suspended: Mapping[str, Any], beat: Mapping[str, Any] | None,
               readable: set[str] | frozenset[str], links: Links) -> dict[str, Any]:
    """The Dependencies page: `records` are the observed records of `cycle` by DAG id."""
    visible = {d: p for d, p in pipelines.items() if d in readable}
    ups = upstreams_of(visible)
    places = layout(ups)
    nodes = [_node(d, visible[d], places[d], status_of(records.get(d), readable), suspended)
             for d in sorted(visible)]
    return {
        "header": header_of(head, suspended, beat, readable, links),
        "cycle": cycle,
        "cycles": list(cycles),
        "nodes": nodes,
        "edges": [[u, d] for d in sorted(ups) for u in ups[d]],
        "owners": sorted({n["owner"] for n in nodes}),
        "deployments": sorted({n["deployment"] for n in nodes}),
    }


def dag_view(dag_id: str, head: Mapping[str, Any] | None,
             pipelines: Mapping[str, Mapping[str, Any]],
             history: Sequence[tuple[str, Any, Any]], current: Mapping[str, Any], *,
             suspended: Mapping[str, Any], readable: set[str] | frozenset[str],
             links: Links) -> dict[str, Any]:
    """One pipeline's tab. `history`: (cycle, observed record, ledger entry) of recent
    cycles, newest first; `current`: the observed records of the newest cycle by DAG id.
    The drawing holds the readable part of its transitive upstreams and downstreams,
    coloured by their state in the newest cycle; the caller checked that `dag_id` is
    readable and in the graph."""
    all_ups = upstreams_of(pipelines)
    ancestors = closure(dag_id, all_ups)
    descendants = closure(dag_id, downstreams_of(all_ups))
    around = {d for d in ancestors | descendants | {dag_id} if d in readable}
    ups = {d: [u for u in all_ups[d] if u in around] for d in around}
    places = layout(ups)
    pipeline = pipelines[dag_id]
    commit = str(head.get("commit") or "") if head else None
    rows = []
    for cycle, record, entry in history:
        status = status_of(record, readable)
        decided = entry.get("decided") if isinstance(entry, Mapping) else None
        rows.append({"cycle": cycle, **(status or {"state": None, "reason": None,
                                                   "message": None, "run_id": None,
                                                   "run": None}),
                     "action": entry.get("action") if isinstance(entry, Mapping) else None,
                     "eager": decided == "eager"})
    return {
        "header": header_of(head, suspended, None, readable, links),
        "pipeline": {
            "id": dag_id,
            "owner": str(pipeline.get("owner") or ""),
            "description": str(pipeline.get("description") or ""),
            "deployment": str(pipeline.get("deployment") or "default"),
            "trigger_rule": str(pipeline.get("trigger_rule") or "all_success"),
            "enabled": pipeline.get("enabled", True) is not False,
            "suspended": suspended.get(dag_id) or suspended.get("*"),
            "file": links.file_path(dag_id),
            "file_url": links.file_url(commit, dag_id),
            "upstreams": [u if u in readable else HIDDEN for u in all_ups[dag_id]],
            "downstreams": [d if d in readable else HIDDEN
                            for d in downstreams_of(all_ups)[dag_id]],
            "ancestors": sorted(d for d in ancestors if d in readable),
            "descendants": sorted(d for d in descendants if d in readable),
            "hidden_neighbours": len((ancestors | descendants) - around),
        },
        "cycles": rows,
        "cycle": history[0][0] if history else None,
        "nodes": [_node(d, pipelines[d], places[d], status_of(current.get(d), readable),
                        suspended)
                  for d in sorted(around)],
        "edges": [[u, d] for d in sorted(ups) for u in ups[d]],
    }
