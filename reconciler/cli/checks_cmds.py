"""`validate`, `graph` and `diff`: the commands CI runs on a pull request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from reconciler.adapters.sources import SourceError, read_commit, read_directory
from reconciler.cli.app import EXIT_FAILED, fail, handle_errors, main
from reconciler.cli.options import etcd_options
from reconciler.core import diff as graph_diff
from reconciler.core import render, report
from reconciler.core.checks import MAX_GRAPH_BYTES, CheckResult, check_files
from reconciler.core.graph import Graph
from reconciler.core.settings import EtcdSettings
from reconciler.core.yamlload import MAX_FILE_BYTES

_limits = [
    click.option("--max-file-bytes", type=click.IntRange(min=1), default=MAX_FILE_BYTES,
                 show_default=True, help="Refuse pipeline files larger than this."),
    click.option("--max-graph-bytes", type=click.IntRange(min=1), default=MAX_GRAPH_BYTES,
                 show_default=True,
                 help="Refuse a graph whose compressed form is larger (one etcd value)."),
]


def _with_limits(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_limits):
        func = option(func)
    return func


def _check_directory(directory: str, max_file_bytes: int, max_graph_bytes: int) -> CheckResult:
    try:
        files = read_directory(directory, max_file_bytes=max_file_bytes)
    except SourceError as exc:
        fail(str(exc))
    return check_files(files, max_file_bytes=max_file_bytes, max_graph_bytes=max_graph_bytes)


def _check_commit(repo: str, rev: str, path: str, max_file_bytes: int = MAX_FILE_BYTES,
                  max_graph_bytes: int = MAX_GRAPH_BYTES) -> tuple[str, CheckResult]:
    try:
        sha, files = read_commit(repo, rev, path, max_file_bytes=max_file_bytes)
    except SourceError as exc:
        fail(str(exc))
    return sha, check_files(files, max_file_bytes=max_file_bytes, max_graph_bytes=max_graph_bytes)


def _graph_or_exit(result: CheckResult, where: str) -> Graph:
    if not result.ok or result.graph is None:
        click.echo(report.to_text(result), nl=False)
        fail(f"the pipeline files at {where} are invalid; fix them first", EXIT_FAILED)
    return result.graph


@main.command()
@click.argument("directory", default="pipelines", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(sorted(report.FORMATS)), default="text",
              show_default=True, help="github: annotations on the pull request's lines.")
@_with_limits
@handle_errors
def validate(directory: str, fmt: str, max_file_bytes: int, max_graph_bytes: int) -> None:
    """Check the pipeline files in DIRECTORY (default: pipelines): YAML, schema and graph.

    Every problem is printed as path:line:column: message; exit 1 if there is any.
    """
    result = _check_directory(directory, max_file_bytes, max_graph_bytes)
    click.echo(report.FORMATS[fmt](result), nl=False)
    if not result.ok:
        raise SystemExit(EXIT_FAILED)


@main.command()
@click.argument("directory", default="pipelines", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot", "json"]),
              default="mermaid", show_default=True)
@click.option("--rev", default=None, help="Read the graph from this git commit instead of "
              "the directory.")
@click.option("--repo", default=".", show_default=True, help="Repository for --rev.")
@click.option("--from-etcd", is_flag=True, help="Read back the graph etcd holds for --rev "
              "(a commit or a unique prefix; default: the synced head).")
@etcd_options
@handle_errors
def graph(directory: str, fmt: str, rev: str | None, repo: str, from_etcd: bool,
          etcd: EtcdSettings) -> None:
    """Print the graph of DIRECTORY (or of commit --rev): roots first, in a stable order."""
    commit = None
    if from_etcd:
        from reconciler.adapters.store import StoreError, StoreNotFound
        from reconciler.service.sync import read_synced_graph

        try:
            commit, g = read_synced_graph(etcd, rev)
        except StoreNotFound as exc:
            fail(str(exc), EXIT_FAILED)
        except StoreError as exc:
            fail(str(exc))
        click.echo(render.to_json(g, commit) if fmt == "json" else render.FORMATS[fmt](g),
                   nl=False)
        return
    if rev is not None:
        commit, result = _check_commit(repo, rev, directory)
        where = f"{rev}:{directory}"
    else:
        result = _check_directory(directory, MAX_FILE_BYTES, MAX_GRAPH_BYTES)
        where = directory
    g = _graph_or_exit(result, where)
    click.echo(render.to_json(g, commit) if fmt == "json" else render.FORMATS[fmt](g), nl=False)


@main.command()
@click.option("--base", required=True, help="The commit the change starts from "
              "(e.g. origin/main).")
@click.option("--head", default="HEAD", show_default=True, help="The commit with the change.")
@click.option("--repo", default=".", show_default=True, help="The git repository.")
@click.option("--path", "subdir", default="pipelines", show_default=True,
              help="Folder of the pipeline files inside the repository.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json", "text"]),
              default="markdown", show_default=True)
@handle_errors
def diff(base: str, head: str, repo: str, subdir: str, fmt: str) -> None:
    """Show what a change does to the graph, from two commits (never the working tree).

    Markdown (with a Mermaid picture) is ready for $GITHUB_STEP_SUMMARY or a PR comment.
    """
    base_sha, base_result = _check_commit(repo, base, subdir)
    head_sha, head_result = _check_commit(repo, head, subdir)
    base_graph = _graph_or_exit(base_result, f"{base}:{subdir}")
    head_graph = _graph_or_exit(head_result, f"{head}:{subdir}")
    d = graph_diff.diff_graphs(base_graph, head_graph, base_rev=base_sha, head_rev=head_sha)
    if fmt == "markdown":
        click.echo(graph_diff.to_markdown(d, base_graph, head_graph), nl=False)
    elif fmt == "json":
        click.echo(graph_diff.to_json(d), nl=False)
    else:
        click.echo(graph_diff.to_text(d), nl=False)
