"""All checks of a set of pipeline files: YAML, schema, then the graph (DESIGN section 3).

Input is (path, bytes) pairs, from a directory or from a git tree alike (the readers in
adapters/sources.py hand over refused entries too); output is a CheckResult holding the
Graph when there is no problem, and every problem otherwise. Graph checks run over every
file that loaded, valid or not, so one run shows all problems of a file.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from reconciler.core.graph import Graph, Pipeline
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


@dataclass
class _Spec:
    """What the graph checks use of one file that loaded, valid or not."""

    dag_id: str
    doc: Document
    upstreams: tuple[tuple[int, str], ...]  # (index in depends_on, id)
    pipeline: Pipeline | None  # None when the file has a problem of its own

    def position(self, index: int) -> tuple[int, int]:
        return self.doc.position(("depends_on", index))


def check_files(
    files: Iterable[SourceFile],
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_graph_bytes: int = MAX_GRAPH_BYTES,
) -> CheckResult:
    # Loading builds millions of small objects (nodes, positions) and no reference cycle
    # that matters: the cyclic collector's full passes over them cost 3 s of 10 at 50,000
    # files. Reference counting still frees everything; collection resumes after.
    with gc_paused():
        return _check_files(files, max_file_bytes, max_graph_bytes)



def _check_files(files: Iterable[SourceFile], max_file_bytes: int, max_graph_bytes: int
                 ) -> CheckResult:
    problems: list[Problem] = []
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
        by_id.setdefault(spec.dag_id, spec)
    # A refused a.YAML or link b.yaml still names a pipeline: depends_on [b] is not unknown.
    known = {stem for f, stem, _ in seen if f.path.lower().endswith(PIPELINE_SUFFIXES)}
    problems.extend(_edge_problems(by_id, known))
    problems.extend(_cycle_problems(by_id))
    result = CheckResult(files=len(ordered), problems=sorted(set(problems)))
    if result.ok:
        graph = Graph(s.pipeline for s in specs if s.pipeline is not None)
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
    if checked.dag_id != stem:
        line, col = loaded.position(("dag_id",))
        problems.append(Problem(f.path, line, col, f"dag_id {checked.dag_id!r} does not "
                                f"match the file name {stem!r}; rename one of them",
                                "file-name"))
    return _Spec(checked.dag_id, loaded, checked.upstreams, checked.pipeline)


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


def _edge_problems(by_id: dict[str, _Spec], all_ids: set[str]) -> list[Problem]:
    out: list[Problem] = []
    suggest = Suggestions(all_ids)
    for dag_id, spec in by_id.items():
        seen: dict[str, int] = {}
        for index, up in spec.upstreams:
            if up not in seen and up != dag_id and up in all_ids:
                seen[up] = index
                continue  # the common case: no problem, no position needed
            line, col = spec.position(index)
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
                close = suggest(up, exclude=dag_id)
                hint = f"; did you mean {close!r}?" if close else ""
                out.append(Problem(spec.doc.path, line, col, f"depends_on names {up!r}, but no "
                                   f"pipeline file defines it{hint}", "unknown-upstream"))
    return out


def _cycle_problems(by_id: dict[str, _Spec]) -> list[Problem]:
    """One problem per strongly connected component (Tarjan's algorithm, iterative)."""
    graph = {d: [u for _, u in s.upstreams if u in by_id and u != d] for d, s in by_id.items()}
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
        line, col = spec.position(next(i for i, up in spec.upstreams if up == second))
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
