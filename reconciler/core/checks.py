"""All checks of a set of pipeline files: YAML, schema, then the graph (DESIGN section 3).

Input is (path, bytes) pairs, from a directory or from a git tree alike (the readers in
adapters/sources.py hand over refused entries too); output is a CheckResult holding the
Graph when there is no problem, and every problem otherwise. Graph checks run over every
file that loaded, valid or not, so one run shows all problems of a file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from reconciler.core.deployments import DEPLOYMENTS_DIR, DeploymentCheck, check_deployment_files
from reconciler.core.graph import DEFAULT_DEPLOYMENT, Graph, Pipeline
from reconciler.core.heap import gc_paused
from reconciler.core.problems import Problem
from reconciler.core.spec import check_document
from reconciler.core.yamlload import MAX_FILE_BYTES, Document, load_document, too_large

# A graph over one etcd value (1.5 MiB per request by default) is split across part keys
# by the store (adapters/store/desired.py), so this is no longer one value's size: only a sane
# ceiling against accidents (about 3.5 million pipelines of bench_sync's kind), well below
# what one head transaction can name (127 parts of 1 MiB). --max-graph-bytes lowers it.
MAX_GRAPH_BYTES = 64 * 1024 * 1024
PIPELINE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class SourceFile:
    """A pipeline file's display path (e.g. ``pipelines/a.yaml``) and raw bytes.

    A reader that refuses an entry (a symbolic link, a FIFO, ``a.YAML``) still hands it
    over, with `problem` set and no data, so that it is reported beside every other
    problem of the run. `size` is the file's real size when the reader did not read it
    whole (over the limit): messages give the real size, not the bytes read.
    """

    path: str
    data: bytes
    size: int | None = None
    problem: Problem | None = None

    @classmethod
    def refused(cls, path: str, message: str, code: str) -> SourceFile:
        return cls(path, b"", 0, Problem(path, 1, 1, message, code))

    @property
    def stem(self) -> str:
        return _stem(self.path)

    @property
    def real_size(self) -> int:
        return len(self.data) if self.size is None else self.size


@dataclass
class CheckResult:
    files: int
    problems: list[Problem] = field(default_factory=list)
    graph: Graph | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


_DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")


@dataclass
class _Spec:
    """What the graph checks use of one file that loaded, valid or not."""

    dag_id: str
    doc: Document
    upstreams: tuple[tuple[int, str], ...]  # (index in depends_on, id)
    pipeline: Pipeline | None  # None when the file has a problem of its own
    key: str = ""
    """Its name in the graph: the file name when it names a deployment (so the same dag_id
    may be in two), else the dag_id (today's rule makes them equal)."""
    deployment: str | None = None
    """What `deployment:` says (None: absent, or refused by the schema)."""

    def position(self, index: int) -> tuple[int, int]:
        return self.doc.position(("depends_on", index))


def check_files(
    files: Iterable[SourceFile],
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_graph_bytes: int = MAX_GRAPH_BYTES,
    deployments: Iterable[SourceFile] = (),
) -> CheckResult:
    """`deployments`: the files of the airflow-deployments folder beside the pipelines
    (none: nothing declared, every pipeline in the implicit default deployment)."""
    # Loading builds millions of small objects (nodes, positions) and no reference cycle
    # that matters: the cyclic collector's full passes over them cost 3 s of 10 at 50,000
    # files. Reference counting still frees everything; collection resumes after.
    with gc_paused():
        declared = check_deployment_files(deployments, max_file_bytes=max_file_bytes)
        return _check_files(files, max_file_bytes, max_graph_bytes, declared)


def _check_files(files: Iterable[SourceFile], max_file_bytes: int, max_graph_bytes: int,
                 declared: DeploymentCheck) -> CheckResult:
    problems: list[Problem] = list(declared.problems)
    # Each file is checked as it comes (a reader may still be reading the next ones, see
    # adapters/sources.py's open_tree), then everything that depends on the order is done
    # in path order, as if the files had been sorted first.
    seen: list[tuple[SourceFile, str, _Spec | None]] = []
    for f in files:
        stem = _stem(f.path)
        seen.append((f, stem, _check_one(f, stem, problems, max_file_bytes)))
    seen.sort(key=lambda item: item[0].path)
    ordered = [f for f, _, _ in seen]
    specs = [spec for _, _, spec in seen if spec is not None]
    readable = [(f, stem) for f, stem, _ in seen if f.problem is None]
    # Stems are also checked among files that failed to load, so a.yaml + a.yml is caught.
    problems.extend(_duplicate_ids(readable))
    by_id: dict[str, _Spec] = {}
    for spec in specs:
        by_id.setdefault(spec.key, spec)
    # A refused a.YAML or link b.yaml still names a pipeline: depends_on [b] is not unknown.
    known = {stem for f, stem, _ in seen if f.path.lower().endswith(PIPELINE_SUFFIXES)}
    where, deployment_problems = _deployment_problems(by_id, declared)
    problems.extend(deployment_problems)
    resolved, edge_problems = _edge_problems(by_id, known, declared, where)
    problems.extend(edge_problems)
    problems.extend(_cycle_problems(by_id, resolved, where))
    result = CheckResult(files=len(ordered), problems=sorted(set(problems)))
    if result.ok:
        pipelines = [s.pipeline for s in specs if s.pipeline is not None]
        if declared.names or any(s.key != s.dag_id or s.deployment for s in specs) \
                or any(t != up for s in specs for (_, up), (_, t)
                       in zip(s.upstreams, resolved.get(s.key, ()), strict=False)):
            # Names, resolved upstreams and deployments; a repository that uses none of
            # them keeps its Pipelines as they were (and its graph's bytes).
            pipelines = [replace(p, name=s.key if s.key != p.dag_id else None,
                                 deployment=where[s.key] if declared.names else None,
                                 depends_on=tuple(t for _, t in resolved[s.key]))
                         for s in specs if (p := s.pipeline) is not None]
        graph = Graph(pipelines, declared.declared.values())
        size = _compressed_size(graph, ordered, max_graph_bytes)
        if size > max_graph_bytes:
            biggest = max(ordered, key=lambda f: f.real_size)
            result.problems.append(Problem(
                biggest.path, 1, 1, f"the graph of {len(graph)} pipelines is {size} bytes "
                f"compressed, over the {max_graph_bytes} byte limit of one etcd value "
                f"(this is its largest file, {biggest.real_size} bytes); shorten descriptions "
                "and conf, or split the graph into namespaces", "graph-too-large"))
        else:
            result.graph = graph
    return result


def _compressed_size(graph: Graph, files: list[SourceFile], limit: int) -> int:
    """The graph's compressed size, or a bound of it that is under `limit` (then the graph
    is not serialised just to learn that it fits). Each canonical pipeline is at most six
    times its file (JSON's worst escape, \\u0000, is six bytes for a two-byte YAML one)
    plus its defaulted keys; gzip adds at most a few bytes per block to its input."""
    source = sum(len(f.data) for f in files)
    bound = 6 * source + 256 * len(graph) + 64
    if bound + bound // 1000 + 64 <= limit:
        return bound
    raw = len(graph.canonical_json())
    return raw if raw + raw // 1000 + 64 <= limit else len(graph.compressed())


def _check_one(f: SourceFile, stem: str, problems: list[Problem], max_file_bytes: int
               ) -> _Spec | None:
    """Load and schema-check one file (its problems go to `problems`); what the graph
    checks use of it, or None when it did not load."""
    if f.problem is not None:
        problems.append(f.problem)
        return None
    if f.real_size > max_file_bytes:
        problems.append(too_large(f.path, f.real_size, max_file_bytes))
        return None
    loaded = load_document(f.path, f.data, max_bytes=max_file_bytes)
    if isinstance(loaded, Problem):
        problems.append(loaded)
        return None
    problems.extend(loaded.problems)
    checked = check_document(loaded)
    problems.extend(checked.problems)
    if checked.dag_id is None:
        return None
    deployment = loaded.data.get("deployment")
    if not (isinstance(deployment, str) and _DEPLOYMENT_NAME.fullmatch(deployment)
            and not loaded.is_refused(("deployment",))):
        deployment = None  # absent, or the schema reports it
    # A file that names its deployment may be named other than its dag_id: that is how
    # one dag_id lives in two deployments. Without one, today's rule: name = dag_id.
    if checked.dag_id != stem and "deployment" not in loaded.data:
        line, col = loaded.position(("dag_id",))
        problems.append(Problem(f.path, line, col, f"dag_id {checked.dag_id!r} does not "
                                f"match the file name {stem!r}; rename one of them",
                                "file-name"))
    key = stem if "deployment" in loaded.data else checked.dag_id
    return _Spec(checked.dag_id, loaded, checked.upstreams, checked.pipeline, key, deployment)


def _stem(path: str) -> str:
    """PurePosixPath(path with / for \\).stem, without building a path object: called
    four times per file (200,000 path objects cost 1.5 s at 50,000 files)."""
    name = path.replace("\\", "/").rstrip("/").rpartition("/")[2]
    if name == "." or not name:
        return PurePosixPath(path.replace("\\", "/")).stem  # rare: let pathlib decide
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _duplicate_ids(files: list[tuple[SourceFile, str]]) -> list[Problem]:
    """(file, stem) pairs: the second and later file of each stem."""
    out: list[Problem] = []
    first_by_stem: dict[str, str] = {}
    for f, stem in files:
        if stem in first_by_stem:
            out.append(Problem(f.path, 1, 1, f"pipeline {stem!r} is defined twice: also in "
                               f"{first_by_stem[stem]}; keep one file", "duplicate-id"))
        else:
            first_by_stem[stem] = f.path
    return out


class Suggestions:
    """ "Did you mean" at near-linear cost, for thousands of unknown names.

    Comparing each unknown name with every known one (difflib) costs len(unknown) x
    len(known) ratio computations: 3,000 x 3,000 took over 20 s. Instead the known names
    are indexed by their one-character deletions (lower-cased): a typo of one or two edits
    (a wrong, missing, extra or swapped character, or another case) shares a key with its
    original, found in O(length). Only those candidates (at most MAX_CANDIDATES) are
    ranked with difflib. A plain difflib scan over all names is kept for small sets, and
    for the first FALLBACK_SCANS names only, so the worst case stays bounded.
    """

    MAX_CANDIDATES = 50
    FALLBACK_SCANS = 20
    SMALL = 500

    def __init__(self, known: Iterable[str]) -> None:
        self.known = sorted(set(known))
        self._index: dict[str, list[str]] | None = None
        self.scans = 0

    @property
    def index(self) -> dict[str, list[str]]:
        if self._index is None:  # built on the first unknown name: valid graphs never pay
            self._index = {}
            for name in self.known:
                for key in self._keys(name):
                    self._index.setdefault(key, []).append(name)
        return self._index

    @staticmethod
    def _keys(name: str) -> set[str]:
        low = name.lower()
        return {low, *(low[:i] + low[i + 1:] for i in range(len(low)))}

    def __call__(self, word: str, exclude: str | None = None) -> str | None:
        """The known name closest to `word` (never `exclude`: a pipeline's own id)."""
        candidates: set[str] = set()
        for key in self._keys(word):
            candidates.update(self.index.get(key, ())[:self.MAX_CANDIDATES])
            if len(candidates) >= self.MAX_CANDIDATES:
                break
        candidates.discard(exclude or "")
        pool: list[str] = sorted(candidates)
        if not pool and len(self.known) <= self.SMALL and self.scans < self.FALLBACK_SCANS:
            self.scans += 1
            pool = [name for name in self.known if name != exclude]
        close = difflib.get_close_matches(word, pool, n=1)
        return close[0] if close else None


def _known(declared: DeploymentCheck) -> set[str]:
    """The deployments a pipeline may name: the declared ones, or, when none is, the
    implicit one (`default`, the settings' Airflow)."""
    return declared.names or {DEFAULT_DEPLOYMENT}


def _deployment_problems(by_id: dict[str, _Spec], declared: DeploymentCheck
                         ) -> tuple[dict[str, str], list[Problem]]:
    """Each pipeline's deployment (by name), and the refusals: an unknown deployment, none
    named where there is no default, the same (deployment, dag_id) twice."""
    out: list[Problem] = []
    where: dict[str, str] = {}
    default = declared.default if declared.names else DEFAULT_DEPLOYMENT
    suggest: Suggestions | None = None
    first: dict[tuple[str, str], _Spec] = {}
    for key, spec in by_id.items():
        name = spec.deployment
        if name is not None:
            if name not in _known(declared):
                suggest = suggest or Suggestions(declared.names)
                close = suggest(name)
                hint = (f"; did you mean {close!r}?" if close
                        else f"; declared: {', '.join(sorted(declared.names))}"
                        if declared.names else f"; declare it in {DEPLOYMENTS_DIR}/{name}.yaml "
                        "beside the pipeline folder")
                line, col = spec.doc.position(("deployment",))
                out.append(Problem(spec.doc.path, line, col, f"deployment {name!r} is not "
                                   f"declared{hint}", "unknown-deployment"))
        elif "deployment" not in spec.doc.data:
            name = default
            if name is None and not declared.broken:
                line, col = spec.doc.key_position(("dag_id",))
                out.append(Problem(spec.doc.path, line, col, "no `deployment:`, and none of "
                                   f"the declared deployments ({', '.join(sorted(declared.names))})"
                                   " is the default: name one, or mark one `default: true`",
                                   "no-deployment"))
        where[key] = name or DEFAULT_DEPLOYMENT
        pair = (where[key], spec.dag_id)
        if pair in first:
            line, col = spec.doc.position(("dag_id",))
            out.append(Problem(spec.doc.path, line, col, f"dag_id {spec.dag_id!r} is already a "
                               f"pipeline of deployment {pair[0]!r} ({first[pair].doc.path}): "
                               "one DAG id once per deployment", "duplicate-dag"))
        else:
            first[pair] = spec
    return where, out


def _edge_problems(by_id: dict[str, _Spec], all_ids: set[str], declared: DeploymentCheck,
                   where: dict[str, str]
                   ) -> tuple[dict[str, list[tuple[int, str]]], list[Problem]]:
    """Each pipeline's upstreams resolved to names ((index in depends_on, name) of each
    entry that resolved), and the refusals. An entry is a name or a dag_id, or
    `<deployment>/<dag_id>`; an unqualified one that could mean two pipelines is
    ambiguous (no "own deployment first": a move must never re-bind an upstream)."""
    out: list[Problem] = []
    resolved: dict[str, list[tuple[int, str]]] = {}
    suggest = Suggestions(all_ids)
    # dag_id -> the names of the pipelines with that dag_id under another name (only files
    # that name a deployment can have one): empty in a repository without deployments.
    aliases: dict[str, list[str]] = {}
    by_pair: dict[tuple[str, str], str] = {}
    for key, spec in by_id.items():
        if key != spec.dag_id:
            aliases.setdefault(spec.dag_id, []).append(key)
        by_pair.setdefault((where[key], spec.dag_id), key)

    def shown(key: str) -> str:
        return f"{where[key]}/{by_id[key].dag_id}"

    for dag_id, spec in by_id.items():
        seen: dict[str, tuple[int, str]] = {}  # name (or unknown entry) -> (index, entry)
        targets: list[tuple[int, str]] = resolved.setdefault(dag_id, [])
        for index, up in spec.upstreams:
            if up not in seen and up != dag_id and up in all_ids and up not in aliases:
                seen[up] = (index, up)
                targets.append((index, up))
                continue  # the common case: no problem, no position needed
            line, col = spec.position(index)
            target: str | None
            if "/" in up:
                deployment, _, wanted = up.partition("/")
                if deployment not in _known(declared):
                    out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, but "
                                       f"deployment {deployment!r} is not declared",
                                       "unknown-deployment"))
                    continue
                target = by_pair.get((deployment, wanted))
                if target is None:
                    if not declared.broken:
                        out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, "
                                           f"but no pipeline of deployment {deployment!r} has "
                                           f"dag_id {wanted!r}", "unknown-upstream"))
                    continue
            else:
                candidates = sorted({*([up] if up in all_ids else []), *aliases.get(up, ())})
                if len(candidates) > 1:
                    which = ", ".join(f"{shown(c)} ({by_id[c].doc.path})" if c in by_id else c
                                      for c in candidates)
                    qualified = " or ".join(shown(c) for c in candidates if c in by_id)
                    out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, "
                                       f"which is ambiguous: {which}; write {qualified}",
                                       "ambiguous-upstream"))
                    continue
                target = candidates[0] if candidates else None
            mark = up if target is None else target
            if mark in seen:
                first, entry = seen[mark]
                what = (f"{up!r} is listed twice in depends_on" if entry == up
                        else f"{up!r} names the same pipeline as {entry!r} in depends_on")
                out.append(Problem(spec.doc.path, line, col, f"{what} (first as item "
                                   f"{first + 1})", "duplicate-upstream"))
                continue
            seen[mark] = (index, up)
            if target == dag_id:
                out.append(Problem(spec.doc.path, line, col, f"{dag_id!r} depends on itself",
                                   "self-dependency"))
            elif target is None:
                close = suggest(up, exclude=dag_id)
                hint = f"; did you mean {close!r}?" if close else ""
                out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, but no "
                                   f"pipeline file defines it{hint}", "unknown-upstream"))
            else:
                targets.append((index, target))
    return resolved, out


def _cycle_problems(by_id: dict[str, _Spec], resolved: dict[str, list[tuple[int, str]]],
                    where: dict[str, str]) -> list[Problem]:
    """One problem per strongly connected component (Tarjan's algorithm, iterative)."""
    graph = {d: [u for _, u in resolved.get(d, ()) if u in by_id and u != d] for d in by_id}
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
        line, col = spec.position(next(i for i, up in resolved[first] if up == second))
        # depends_on points upstream, so reverse the path to read in run order.
        if len({where[d] for d in component}) > 1:
            shown = " -> ".join(f"{where[d]}/{by_id[d].dag_id}" for d in reversed(path))
            kind = "dependency cycle across deployments"
        else:
            shown, kind = " -> ".join(reversed(path)), "dependency cycle"
        out.append(Problem(spec.doc.path, line, col, f"{kind}: {shown} (each runs "
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
