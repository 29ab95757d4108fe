"""Render a graph as Mermaid, Graphviz dot or JSON: roots first, stable order."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from reconciler.core.graph import Graph

_SAFE = re.compile(r"[^A-Za-z0-9_]")


def mermaid_id(dag_id: str) -> str:
    """Mermaid node ids may not contain '.' or '-'; keep them readable and unique."""
    return "n_" + _SAFE.sub(lambda m: f"_{ord(m.group()):x}_", dag_id)


def mermaid_label(dag_id: str) -> str:
    return '"' + dag_id.replace('"', "#quot;") + '"'


def mermaid_nodes(nodes: list[str], line: Callable[[str], str],
                  deployment_of: Callable[[str], str] | None) -> list[str]:
    """Node lines (each `line(name)`, indented), grouped in one subgraph per deployment
    when `deployment_of` is given (deployments declared), so that edges between Airflows
    show as edges leaving a box. The subgraph ids ("d_" + ...) never meet a node's ("n_")."""
    if deployment_of is None:
        return [f"    {line(n)}" for n in nodes]
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(deployment_of(n), []).append(n)
    out = []
    for name in sorted(groups):
        out.append(f"    subgraph d{mermaid_id(name)[1:]}[{mermaid_label(name)}]")
        out += [f"        {line(n)}" for n in groups[name]]
        out.append("    end")
    return out


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]

    def node(dag_id: str) -> str:
        label = mermaid_label(dag_id)
        return f"{mermaid_id(dag_id)}" + (f"([{label}])" if graph[dag_id].is_root
                                          else f"[{label}]")

    lines += mermaid_nodes(graph.topological_order(), node,
                           graph.deployment_of if graph.deployments else None)
    for up, down in graph.edges():
        lines.append(f"    {mermaid_id(up)} --> {mermaid_id(down)}")
    disabled = [d for d in graph.topological_order() if not graph[d].enabled]
    if disabled:
        lines.append("    classDef disabled stroke-dasharray: 5 5,color:#888")
        lines.append(f"    class {','.join(mermaid_id(d) for d in disabled)} disabled")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    lines = ["digraph pipelines {", "    rankdir=LR;", "    node [shape=box];"]
    for dag_id in graph.topological_order():
        p = graph[dag_id]
        attrs = []
        if p.is_root:
            attrs.append("shape=oval")
        if not p.enabled:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"    {_dot_quote(dag_id)}{suffix};")
    for up, down in graph.edges():
        lines.append(f"    {_dot_quote(up)} -> {_dot_quote(down)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(graph: Graph, commit: str | None = None) -> str:
    """{"kind": "Graph", ...}: roots, layers, pipelines and edges in a stable order."""
    order = graph.topological_order()
    data = {
        "kind": "Graph",
        "commit": commit,
        "digest": graph.digest(),
        "roots": graph.roots(),
        "layers": graph.layers(),
        # A pipeline named other than its dag_id (the same dag_id in two deployments)
        # says its name; the deployments are there only when declared.
        "pipelines": [graph[d].to_dict() | ({"name": d} if d != graph[d].dag_id else {})
                      for d in order],
        "edges": [{"upstream": u, "downstream": d} for u, d in graph.edges()],
    }
    if graph.deployments:
        data["deployments"] = [graph.deployments[n].to_dict() for n in sorted(graph.deployments)]
    if commit is None:
        del data["commit"]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


FORMATS = {"mermaid": to_mermaid, "dot": to_dot}
