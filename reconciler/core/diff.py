"""What a change does to the graph: pipelines and edges added, removed or changed, and the
downstream pipelines it newly affects. Pure; the CLI reads both graphs from git.

Cost is near-linear in the graph: each side's transitive upstream sets are computed once,
in topological order, as bitsets (one Python int per pipeline), instead of a walk per
pipeline (quadratic on a deep chain). The markdown for a PR comment can be capped
(`max_chars`); what is cut is said, and the full text is for the job summary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from reconciler.core.graph import DEFAULT_DEPLOYMENT, Graph
from reconciler.core.render import mermaid_id, mermaid_label, mermaid_nodes

# Above this many nodes the picture shows only the changed part and its neighbours.
MAX_PICTURE_NODES = 150
COMMENT_LIMIT = 65_536
"""GitHub's limit for a pull request comment, in characters."""
_BEHAVIOUR_FIELDS = ("enabled", "trigger_rule", "backfill", "conf")


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class PipelineChange:
    dag_id: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True)
class Moved:
    """A pipeline that now runs in another Airflow deployment (its name, so its ledger,
    stays)."""

    dag_id: str
    from_deployment: str
    to_deployment: str

    def reason(self) -> str:
        return f"moved from {self.from_deployment} to {self.to_deployment}"


@dataclass(frozen=True)
class DeploymentChange:
    name: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True)
class Affected:
    """A pipeline that exists on both sides and now runs after a different set of pipelines,
    or downstream of one whose behaviour changed."""

    dag_id: str
    gained_upstreams: tuple[str, ...] = ()
    lost_upstreams: tuple[str, ...] = ()
    changed_upstreams: tuple[str, ...] = ()

    def reason(self) -> str:
        parts = []
        if self.gained_upstreams:
            parts.append("now runs after " + ", ".join(self.gained_upstreams))
        if self.lost_upstreams:
            parts.append("no longer runs after " + ", ".join(self.lost_upstreams))
        if self.changed_upstreams:
            parts.append("upstream changed: " + ", ".join(self.changed_upstreams))
        return "; ".join(parts)


@dataclass
class GraphDiff:
    base: str | None = None
    """The commit compared with head: the merge base of `base_tip` and head."""
    head: str | None = None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[PipelineChange] = field(default_factory=list)
    edges_added: list[tuple[str, str]] = field(default_factory=list)
    edges_removed: list[tuple[str, str]] = field(default_factory=list)
    affected: list[Affected] = field(default_factory=list)
    base_tip: str | None = None
    """The commit given as --base (its merge base with head is `base`)."""
    moved: list[Moved] = field(default_factory=list)
    deployments_added: list[str] = field(default_factory=list)
    deployments_removed: list[str] = field(default_factory=list)
    deployments_changed: list[DeploymentChange] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.edges_added
                    or self.edges_removed or self.moved or self.deployments_added
                    or self.deployments_removed or self.deployments_changed)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": "GraphDiff", **asdict(self)}
        data["moved"] = [dict(asdict(m), reason=m.reason()) for m in self.moved]
        data["edges_added"] = [{"upstream": u, "downstream": d} for u, d in self.edges_added]
        data["edges_removed"] = [{"upstream": u, "downstream": d} for u, d in self.edges_removed]
        data["affected"] = [dict(asdict(a), reason=a.reason()) for a in self.affected]
        return data


def diff_graphs(base: Graph, head: Graph, *, base_rev: str | None = None,
                head_rev: str | None = None) -> GraphDiff:
    out = GraphDiff(base=base_rev, head=head_rev)
    head_order = {d: i for i, d in enumerate(head.topological_order())}
    base_order = {d: i for i, d in enumerate(base.topological_order())}
    out.added = sorted((d for d in head.pipelines if d not in base), key=head_order.__getitem__)
    out.removed = sorted((d for d in base.pipelines if d not in head), key=base_order.__getitem__)
    was_in, now_in = _where(base, head), _where(head, base)
    for dag_id in sorted((d for d in head.pipelines if d in base), key=head_order.__getitem__):
        old, new = base[dag_id].to_dict(), head[dag_id].to_dict()
        # The deployment is said as a move, never as a field change: a base without
        # declarations has no such key, and its implicit default is the head's default.
        old.pop("deployment", None)
        new.pop("deployment", None)
        changes = tuple(FieldChange(k, old[k], new[k]) for k in old if old[k] != new[k])
        if changes:
            out.changed.append(PipelineChange(dag_id, changes))
        if was_in(dag_id) != now_in(dag_id):
            out.moved.append(Moved(dag_id, was_in(dag_id), now_in(dag_id)))
    out.deployments_added = sorted(d for d in head.deployments if d not in base.deployments)
    out.deployments_removed = sorted(d for d in base.deployments if d not in head.deployments)
    for name in sorted(d for d in head.deployments if d in base.deployments):
        old_d, new_d = base.deployments[name].to_dict(), head.deployments[name].to_dict()
        fields = tuple(FieldChange(k, old_d[k], new_d[k]) for k in old_d if old_d[k] != new_d[k])
        if fields:
            out.deployments_changed.append(DeploymentChange(name, fields))
    base_edges, head_edges = set(base.edges()), set(head.edges())
    out.edges_added = [e for e in head.edges() if e not in base_edges]
    out.edges_removed = [e for e in base.edges() if e not in head_edges]

    behaviour_changed = {c.dag_id for c in out.changed
                         if any(f.field in _BEHAVIOUR_FIELDS for f in c.changes)}
    names = sorted(set(base.pipelines) | set(head.pipelines))
    bit = {name: 1 << i for i, name in enumerate(names)}
    before, after = _ancestor_bits(base, bit), _ancestor_bits(head, bit)
    changed_mask = sum(bit[d] for d in behaviour_changed)
    for dag_id in sorted((d for d in head.pipelines if d in base), key=head_order.__getitem__):
        was, now = before[dag_id], after[dag_id]
        if was != now or now & changed_mask:
            out.affected.append(Affected(dag_id, _names(now & ~was, names),
                                         _names(was & ~now, names),
                                         _names(now & changed_mask, names)))
    return out


def _where(graph: Graph, other: Graph) -> Any:
    """name -> the deployment it runs in on `graph`'s side. A side that declares nothing
    has one implicit deployment: the settings' Airflow, which the other side's declared
    default (if any) stands for, so declaring today's Airflow as the default moves
    nothing."""
    if graph.deployments:
        return graph.deployment_of
    implicit = (other.default_deployment if other.deployments else None) or DEFAULT_DEPLOYMENT
    return lambda name: graph.pipelines[name].deployment or implicit


def _ancestor_bits(graph: Graph, bit: dict[str, int]) -> dict[str, int]:
    """Each pipeline's transitive upstreams as a bitset, in one topological pass."""
    out: dict[str, int] = {}
    for dag_id in graph.topological_order():
        acc = 0
        for up in graph.upstreams(dag_id):
            acc |= bit[up] | out.get(up, 0)
        out[dag_id] = acc
    return out


def _names(bits: int, names: list[str]) -> tuple[str, ...]:
    """The names of the set bits, in order (the names are sorted, so is the result)."""
    out = []
    while bits:
        low = bits & -bits
        out.append(names[low.bit_length() - 1])
        bits ^= low
    return tuple(out)


def _fmt(value: Any) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def to_text(diff: GraphDiff) -> str:
    if diff.empty:
        return "no change to the pipeline graph\n"
    lines = []
    lines += [f"+ deployment {d}" for d in diff.deployments_added]
    lines += [f"- deployment {d}" for d in diff.deployments_removed]
    for dc in diff.deployments_changed:
        for f in dc.changes:
            lines.append(f"~ deployment {dc.name}: {f.field}: {_fmt(f.old)} -> {_fmt(f.new)}")
    lines += [f"+ pipeline {d}" for d in diff.added]
    lines += [f"- pipeline {d}" for d in diff.removed]
    lines += [f"~ pipeline {m.dag_id}: {m.reason()}" for m in diff.moved]
    for c in diff.changed:
        for f in c.changes:
            lines.append(f"~ pipeline {c.dag_id}: {f.field}: {_fmt(f.old)} -> {_fmt(f.new)}")
    lines += [f"+ edge {u} -> {d}" for u, d in diff.edges_added]
    lines += [f"- edge {u} -> {d}" for u, d in diff.edges_removed]
    lines += [f"! affected {a.dag_id}: {a.reason()}" for a in diff.affected]
    return "\n".join(lines) + "\n"


def to_json(diff: GraphDiff) -> str:
    """{"kind": "GraphDiff", ...}."""
    return json.dumps(diff.to_dict(), indent=2, ensure_ascii=False) + "\n"


def _md_cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(diff: GraphDiff, base: Graph, head: Graph, *, max_chars: int = 0) -> str:
    """The diff for $GITHUB_STEP_SUMMARY or a PR comment; with `max_chars` (e.g. under
    COMMENT_LIMIT) long lists and the picture are cut to fit, and the text says so."""
    def short(rev: str | None) -> str:
        return f"`{rev[:12]}`" if rev else "working tree"
    title = f"### Pipeline graph: {short(diff.base)} → {short(diff.head)}"
    if diff.base_tip and diff.base_tip != diff.base:
        title += f" (merge base with {short(diff.base_tip)})"
    head_lines = [title, ""]
    if diff.empty:
        head_lines.append("No change to the pipeline graph.")
        return "\n".join(head_lines) + "\n"
    head_lines.append(f"**{len(diff.added)}** added, **{len(diff.removed)}** removed, "
                      f"**{len(diff.changed)}** changed pipelines; **{len(diff.edges_added)}** "
                      f"edges added, **{len(diff.edges_removed)}** removed; "
                      f"**{len(diff.affected)}** downstream pipelines affected.")
    if diff.moved:
        head_lines[-1] += f" **{len(diff.moved)}** moved between deployments."
    head_lines.append("")
    sections: list[tuple[list[str], list[str]]] = []  # (heading lines, rows)
    if diff.deployments_added or diff.deployments_removed or diff.deployments_changed:
        rows = [f"| ➕ | `{d}` | added ({_md_cell(head.deployments[d].url)}, api "
                f"{head.deployments[d].api}, auth {head.deployments[d].auth_kind}) |"
                for d in diff.deployments_added]
        rows += [f"| ➖ | `{d}` | removed |" for d in diff.deployments_removed]
        for dc in diff.deployments_changed:
            what = "; ".join(f"{f.field}: {_md_cell(f.old)} → {_md_cell(f.new)}"
                             for f in dc.changes)
            rows.append(f"| ✏️ | `{dc.name}` | {what} |")
        sections.append((["| | deployment | change |", "|---|---|---|"], rows))
    if diff.added or diff.removed or diff.changed or diff.moved:
        rows = [f"| ➕ | `{d}` | added (owner {_md_cell(head[d].owner)}) |" for d in diff.added]
        rows += [f"| ➖ | `{d}` | removed |" for d in diff.removed]
        rows += [f"| 🚚 | `{m.dag_id}` | moved from `{m.from_deployment}` to "
                 f"`{m.to_deployment}` |" for m in diff.moved]
        for c in diff.changed:
            what = "; ".join(f"{f.field}: {_md_cell(f.old)} → {_md_cell(f.new)}"
                             for f in c.changes)
            rows.append(f"| ✏️ | `{c.dag_id}` | {what} |")
        sections.append((["| | pipeline | change |", "|---|---|---|"], rows))
    if diff.edges_added or diff.edges_removed:
        rows = [f"- ➕ `{u}` → `{d}`" for u, d in diff.edges_added]
        rows += [f"- ➖ `{u}` → `{d}`" for u, d in diff.edges_removed]
        sections.append((["**Dependencies**", ""], rows))
    if diff.affected:
        sections.append((["**Newly affected downstream pipelines**", ""],
                         [f"- `{a.dag_id}`: {a.reason()}" for a in diff.affected]))
    picture = ["```mermaid", _mermaid(diff, base, head).rstrip("\n"), "```", ""]

    def joined(parts: list[str]) -> str:
        return "\n".join(parts)

    full = list(head_lines)
    for heading, rows in sections:
        full += [*heading, *rows, ""]
    if not max_chars or len(joined([*full, *picture])) <= max_chars:
        return joined([*full, *picture])
    # Over the cap: keep the rows that fit, in order, and say how many were cut.
    note_room = 400
    budget = max_chars - note_room - len(joined(head_lines))
    out = list(head_lines)
    cut = 0
    for heading, rows in sections:
        budget -= len(joined(heading)) + 2
        kept = 0
        for row in rows:
            if len(row) + 1 > budget:
                break
            if not kept:
                out.extend(heading)
            out.append(row)
            budget -= len(row) + 1
            kept += 1
        if kept < len(rows):
            if not kept:
                out.extend(heading)
            out.append(f"- … and {len(rows) - kept} more not shown")
            cut += len(rows) - kept
        out.append("")
    picture_fits = len(joined(picture)) + 1 <= budget
    if picture_fits:
        out += picture
    omitted = [f"{cut} rows"] if cut else []
    if not picture_fits:
        omitted.append("the picture")
    out += [f"> [!NOTE]\n> Cut to fit a comment ({' and '.join(omitted)} not shown): the full "
            "diff is in the job summary of the run, or run `reconciler diff` locally.", ""]
    text = joined(out)
    assert len(text) <= max_chars, (len(text), max_chars)
    return text


def _mermaid(diff: GraphDiff, base: Graph, head: Graph) -> str:
    """The union of both graphs; added edges green and thick, removed ones red and dashed."""
    nodes = list(dict.fromkeys([*head.topological_order(), *base.topological_order()]))
    focus = ({*diff.added, *diff.removed, *(c.dag_id for c in diff.changed),
              *(a.dag_id for a in diff.affected), *(m.dag_id for m in diff.moved)}
             | {n for e in (*diff.edges_added, *diff.edges_removed) for n in e})
    if len(nodes) > MAX_PICTURE_NODES:
        neighbours = {u for u, d in (*head.edges(), *base.edges()) if d in focus}
        nodes = [n for n in nodes if n in focus or n in neighbours]
    shown = set(nodes)
    lines = ["flowchart LR"]
    # Boxes per deployment when either side declares them (a removed node in its old one).
    where = None
    if head.deployments or base.deployments:
        now_in, was_in = _where(head, base), _where(base, head)

        def where(d: str) -> str:
            return now_in(d) if d in head.pipelines else was_in(d)

    lines += mermaid_nodes(nodes, lambda d: f"{mermaid_id(d)}[{mermaid_label(d)}]", where)
    added_e, removed_e = set(diff.edges_added), set(diff.edges_removed)
    edges = [e for e in head.edges() if e[0] in shown and e[1] in shown]
    edges += [e for e in diff.edges_removed if e[0] in shown and e[1] in shown]
    styles = []
    for index, (u, d) in enumerate(edges):
        if (u, d) in removed_e:
            lines.append(f"    {mermaid_id(u)} -.-x {mermaid_id(d)}")
            styles.append(f"    linkStyle {index} stroke:#cf222e,stroke-width:2px")
        else:
            lines.append(f"    {mermaid_id(u)} --> {mermaid_id(d)}")
            if (u, d) in added_e:
                styles.append(f"    linkStyle {index} stroke:#1a7f37,stroke-width:3px")
    lines += styles
    classes = {
        "added": ("fill:#dafbe1,stroke:#1a7f37", diff.added),
        "removed": ("fill:#ffebe9,stroke:#cf222e,stroke-dasharray: 5 5", diff.removed),
        "changed": ("fill:#fff8c5,stroke:#9a6700", [c.dag_id for c in diff.changed]),
        "moved": ("fill:#ddf4ff,stroke:#0969da", [m.dag_id for m in diff.moved
                                                  if m.dag_id not in {c.dag_id
                                                                      for c in diff.changed}]),
        "affected": ("stroke:#9a6700,stroke-width:2px",
                     [a.dag_id for a in diff.affected
                      if a.dag_id not in {c.dag_id for c in diff.changed}]),
    }
    for name, (style, members) in classes.items():
        members = [m for m in members if m in shown]
        if members:
            lines.append(f"    classDef {name} {style}")
            lines.append(f"    class {','.join(mermaid_id(m) for m in members)} {name}")
    return "\n".join(lines) + "\n"
