"""All checks of a set of pipeline files: YAML, schema, then the graph (DESIGN section 3).

Input is (path, bytes) pairs, from a directory or from a git tree alike; output is a
CheckResult holding the Graph when there is no problem, and every problem otherwise.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from reconciler.core.graph import Graph, Pipeline
from reconciler.core.problems import Problem
from reconciler.core.spec import check_document
from reconciler.core.yamlload import MAX_FILE_BYTES, Document, load_document

# etcd refuses requests over 1.5 MiB by default (--max-request-bytes); the graph blob and
# the head go in one transaction, so keep the blob well below that.
MAX_GRAPH_BYTES = 1024 * 1024
PIPELINE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class SourceFile:
    """A pipeline file's display path (e.g. ``pipelines/a.yaml``) and raw bytes."""

    path: str
    data: bytes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path.replace("\\", "/")).stem


@dataclass
class CheckResult:
    files: int
    problems: list[Problem] = field(default_factory=list)
    graph: Graph | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Spec:
    pipeline: Pipeline
    doc: Document


def check_files(
    files: Iterable[SourceFile],
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_graph_bytes: int = MAX_GRAPH_BYTES,
) -> CheckResult:
    files = sorted(files, key=lambda f: f.path)
    problems: list[Problem] = []
    specs: list[_Spec] = []
    for f in files:
        loaded = load_document(f.path, f.data, max_bytes=max_file_bytes)
        if isinstance(loaded, Problem):
            problems.append(loaded)
            continue
        pipeline, found = check_document(loaded)
        problems.extend(found)
        dag_id = loaded.data.get("dag_id")
        if isinstance(dag_id, str) and dag_id != f.stem:
            line, col = loaded.position(("dag_id",))
            problems.append(Problem(f.path, line, col, f"dag_id {dag_id!r} does not match the "
                                    f"file name {f.stem!r}; rename one of them", "file-name"))
        if pipeline is not None:
            specs.append(_Spec(pipeline, loaded))
    # Stems are also checked among files that failed to load, so a.yaml + a.yml is caught.
    problems.extend(_duplicate_ids(files, specs))
    by_id: dict[str, _Spec] = {}
    for spec in specs:
        by_id.setdefault(spec.pipeline.dag_id, spec)
    problems.extend(_edge_problems(by_id, all_ids={f.stem for f in files}))
    if not any(p.code in ("unknown-upstream", "self-dependency") for p in problems):
        problems.extend(_cycle_problems(by_id))
    result = CheckResult(files=len(files), problems=sorted(set(problems)))
    if result.ok:
        graph = Graph(s.pipeline for s in specs)
        size = len(graph.compressed())
        if size > max_graph_bytes:
            biggest = max(files, key=lambda f: len(f.data))
            result.problems.append(Problem(
                biggest.path, 1, 1, f"the graph of {len(graph)} pipelines is {size} bytes "
                f"compressed, over the {max_graph_bytes} byte limit of one etcd value "
                f"(this is its largest file, {len(biggest.data)} bytes); shorten descriptions "
                "and conf, or split the graph into namespaces", "graph-too-large"))
        else:
            result.graph = graph
    return result


def _duplicate_ids(files: list[SourceFile], specs: list[_Spec]) -> list[Problem]:
    out: list[Problem] = []
    first_by_stem: dict[str, str] = {}
    for f in files:
        if f.stem in first_by_stem:
            out.append(Problem(f.path, 1, 1, f"pipeline {f.stem!r} is defined twice: also in "
                               f"{first_by_stem[f.stem]}; keep one file", "duplicate-id"))
        else:
            first_by_stem[f.stem] = f.path
    return out


def _edge_problems(by_id: dict[str, _Spec], all_ids: set[str]) -> list[Problem]:
    out: list[Problem] = []
    known = sorted(all_ids)
    for dag_id, spec in by_id.items():
        seen: dict[str, int] = {}
        for index, up in enumerate(spec.pipeline.depends_on):
            line, col = spec.doc.position(("depends_on", index))
            if up in seen:
                out.append(Problem(spec.doc.path, line, col, f"{up!r} is listed twice in "
                                   f"depends_on (first as item {seen[up] + 1})",
                                   "duplicate-upstream"))
                continue
            seen[up] = index
            if up == dag_id:
                out.append(Problem(spec.doc.path, line, col, f"{dag_id!r} depends on itself",
                                   "self-dependency"))
            elif up not in all_ids:
                close = difflib.get_close_matches(up, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, but no "
                                   f"pipeline file defines it{hint}", "unknown-upstream"))
    return out


def _cycle_problems(by_id: dict[str, _Spec]) -> list[Problem]:
    """One problem per strongly connected component (Tarjan's algorithm, iterative)."""
    graph = {d: [u for u in s.pipeline.depends_on if u in by_id] for d, s in by_id.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    out = []
    for component in components:
        path = _cycle_path(graph, set(component))
        first, second = path[0], path[1]
        spec = by_id[first]
        line, col = spec.doc.position(("depends_on", spec.pipeline.depends_on.index(second)))
        # depends_on points upstream, so reverse the path to read in run order.
        shown = " -> ".join(reversed(path))
        out.append(Problem(spec.doc.path, line, col, f"dependency cycle: {shown} (each runs "
                           "after the one before it); remove one of these depends_on entries",
                           "cycle"))
    return out


def _cycle_path(graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """A closed path through the component, starting and ending at its smallest id."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first, so the reported cycle is a shortest one
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    chain = []
                    while node != start:
                        chain.append(node)
                        node = parents[node]
                    return [start, *reversed(chain), start]
                if child in members and child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("a strongly connected component always has a cycle")
