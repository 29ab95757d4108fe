"""Reporters for check results: they only format a CheckResult (text, json, github)."""

from __future__ import annotations

import json

from reconciler.core.checks import CheckResult
from reconciler.core.words import counted


def _github_escape(text: str, *, prop: bool = False) -> str:
    # Workflow-command escaping, as in @actions/core's toCommandValue/toCommandProperty.
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def to_text(result: CheckResult) -> str:
    lines = [str(p) for p in result.problems]
    if result.ok:
        graph = result.graph
        assert graph is not None
        lines.append(f"ok: {counted(result.files, 'file')}, {counted(len(graph), 'pipeline')}, "
                     f"{counted(graph.edge_count(), 'dependency')}, "
                     f"{counted(len(graph.roots()), 'root')}")
        if graph.deployments:  # only when declared: a repository without them reads as today
            lines[-1] += (f", {counted(len(graph.deployments), 'deployment')} "
                          f"({', '.join(sorted(graph.deployments))})")
    else:
        files = len({p.path for p in result.problems})
        lines.append(f"{len(result.problems)} problem(s) in {files} file(s)")
    return "\n".join(lines) + "\n"


def to_json(result: CheckResult) -> str:
    """{"kind": "ValidationResult", "ok", "files", "pipelines", "deployments" (declared:
    [] when none), "problems"}."""
    data = {
        "kind": "ValidationResult",
        "ok": result.ok,
        "files": result.files,
        "pipelines": len(result.graph) if result.graph is not None else None,
        "deployments": sorted(result.graph.deployments) if result.graph is not None else None,
        "problems": [p.to_dict() for p in result.problems],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def to_github(result: CheckResult) -> str:
    """Annotations that GitHub shows on the pull request's changed lines."""
    lines = []
    for p in result.problems:
        lines.append(
            f"::error file={_github_escape(p.path, prop=True)},line={p.line},col={p.column},"
            f"title={_github_escape('reconciler validate: ' + p.code, prop=True)}::"
            f"{_github_escape(p.message)}"
        )
    lines.append(to_text(result).splitlines()[-1])
    return "\n".join(lines) + "\n"


FORMATS = {"text": to_text, "json": to_json, "github": to_github}
