"""`validate`, `graph` and `diff`: the commands CI (and the pre-commit hook) run.

All of them read pipeline files through adapters/sources.py, so a directory, a commit's
tree and the index are read by one rule. An unreadable source is exit 2; a problem in
the files is exit 1 with every problem listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from reconciler.adapters.sources import (
    PathNotFound,
    SourceError,
    merge_base,
    open_repo,
    read_directory,
    read_directory_deployments,
    read_index,
    read_index_deployments,
    read_tree,
    read_tree_deployments,
    resolve_commit,
)
from reconciler.cli.app import EXIT_FAILED, fail, handle_errors, main
from reconciler.cli.options import etcd_options, output_option
from reconciler.core import diff as graph_diff
from reconciler.core import render, report
from reconciler.core.checks import MAX_GRAPH_BYTES, CheckResult, SourceFile, check_files
from reconciler.core.graph import Graph
from reconciler.core.settings import EtcdSettings
from reconciler.core.yamlload import MAX_FILE_BYTES

REPO_ENV = "RECONCILER_REPO"
PATH_ENV = "RECONCILER_PATH"

_limits = [
    click.option("--max-file-bytes", envvar="RECONCILER_MAX_FILE_BYTES", show_envvar=True,
                 type=click.IntRange(min=1), default=MAX_FILE_BYTES, show_default=True,
                 help="Refuse pipeline files larger than this."),
    click.option("--max-graph-bytes", envvar="RECONCILER_MAX_GRAPH_BYTES", show_envvar=True,
                 type=click.IntRange(min=1), default=MAX_GRAPH_BYTES, show_default=True,
                 help="Refuse a graph whose compressed form is larger (one etcd value)."),
]


def _with_limits(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_limits):
        func = option(func)
    return func


def repo_option(help: str) -> Callable[..., Any]:
    return click.option("--repo", envvar=REPO_ENV, show_envvar=True, default=".",
                        show_default=True, help=help)


def path_option(help: str = "Folder of the pipeline files inside the repository."
                ) -> Callable[..., Any]:
    return click.option("--path", "subdir", envvar=PATH_ENV, show_envvar=True,
                        default="pipelines", show_default=True, help=help)


def _check(files: list[SourceFile], max_file_bytes: int, max_graph_bytes: int,
           deployments: list[SourceFile]) -> CheckResult:
    return check_files(files, max_file_bytes=max_file_bytes, max_graph_bytes=max_graph_bytes,
                       deployments=deployments)


def _check_directory(directory: str, max_file_bytes: int, max_graph_bytes: int, *,
                     staged: bool = False) -> CheckResult:
    try:
        reader = read_index if staged else read_directory
        files = reader(directory, max_file_bytes=max_file_bytes)
        beside = read_index_deployments if staged else read_directory_deployments
        deployments = beside(directory, max_file_bytes=max_file_bytes)
    except SourceError as exc:
        fail(str(exc))
    return _check(files, max_file_bytes, max_graph_bytes, deployments)


def _check_commit(repo: str, rev: str, path: str, max_file_bytes: int = MAX_FILE_BYTES,
                  max_graph_bytes: int = MAX_GRAPH_BYTES) -> tuple[str, CheckResult]:
    try:
        git_repo = open_repo(repo)
        commit = resolve_commit(git_repo, rev)
        files = read_tree(git_repo, commit, path, max_file_bytes=max_file_bytes)
        deployments = read_tree_deployments(git_repo, commit, path,
                                            max_file_bytes=max_file_bytes)
    except SourceError as exc:
        fail(str(exc))
    return commit.hexsha, _check(files, max_file_bytes, max_graph_bytes, deployments)


def _graph_or_exit(result: CheckResult, where: str) -> Graph:
    if not result.ok or result.graph is None:
        click.echo(report.to_text(result), nl=False)
        fail(f"the pipeline files at {where} are invalid; fix them first", EXIT_FAILED)
    return result.graph


@main.command()
@click.argument("directory", default="pipelines")
@output_option(sorted(report.FORMATS), "text", "github: annotations on the pull request's "
               "lines.")
@click.option("--staged", is_flag=True, show_envvar=True,
              help="Read the files as staged in the git index (what the next commit holds), "
              "not the working tree: the pre-commit hook's mode.")
@_with_limits
@handle_errors
def validate(directory: str, output: str, staged: bool, max_file_bytes: int,
             max_graph_bytes: int) -> None:
    """Check the pipeline files in DIRECTORY (default: pipelines): YAML, schema and graph.

    Every problem is printed as path:line:column: message; exit 1 if there is any, exit 2
    if the files cannot be read at all.
    """
    result = _check_directory(directory, max_file_bytes, max_graph_bytes, staged=staged)
    click.echo(report.FORMATS[output](result), nl=False)
    if not result.ok:
        raise SystemExit(EXIT_FAILED)


@main.command()
@click.argument("directory", default="pipelines")
@output_option(["mermaid", "dot", "json"], "mermaid")
@click.option("--rev", default=None, show_envvar=True,
              help="Read the graph from this git commit (DIRECTORY inside it) instead of the "
              "working tree.")
@repo_option("Repository for --rev.")
@click.option("--from-etcd", is_flag=True, show_envvar=True,
              help="Read back the graph etcd holds for --rev (a commit or a unique prefix; "
              "default: the synced head).")
@_with_limits
@etcd_options
@handle_errors
def graph(directory: str, output: str, rev: str | None, repo: str, from_etcd: bool,
          max_file_bytes: int, max_graph_bytes: int, etcd: EtcdSettings) -> None:
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
    else:
        if rev is not None:
            commit, result = _check_commit(repo, rev, directory, max_file_bytes,
                                           max_graph_bytes)
            where = f"{rev}:{directory}"
        else:
            result = _check_directory(directory, max_file_bytes, max_graph_bytes)
            where = directory
        g = _graph_or_exit(result, where)
    click.echo(render.to_json(g, commit) if output == "json" else render.FORMATS[output](g),
               nl=False)


@main.command()
@click.option("--base", required=True, show_envvar=True,
              help="Where the change starts (e.g. origin/main). As with `git diff "
              "BASE...HEAD`, the change is compared with the merge base of BASE and HEAD, so "
              "commits that BASE has gained since the branch was made are not shown as "
              "reverted.")
@click.option("--head", default="HEAD", show_default=True, show_envvar=True,
              help="The commit with the change.")
@repo_option("The git repository.")
@path_option()
@output_option(["markdown", "json", "text"], "markdown")
@click.option("--exit-code", is_flag=True, show_envvar=True,
              help="Exit 1 when the graph changed, 0 when it did not (as `git diff "
              "--exit-code`).")
@click.option("--max-chars", type=click.IntRange(min=0), default=0, show_default=True,
              show_envvar=True,
              help=f"Cut the markdown to fit this many characters, saying what was cut (e.g. "
              f"60000: a PR comment holds {graph_diff.COMMENT_LIMIT:,}); 0: no limit.")
@_with_limits
@handle_errors
def diff(base: str, head: str, repo: str, subdir: str, output: str, exit_code: bool,
         max_chars: int, max_file_bytes: int, max_graph_bytes: int) -> None:
    """Show what a change does to the graph, from two commits (never the working tree).

    Markdown (with a Mermaid picture) is ready for $GITHUB_STEP_SUMMARY or a PR comment.
    A commit without the pipeline folder reads as an empty graph (the first change that
    adds pipelines shows everything as added).
    """
    if max_chars and max_chars < 2000:
        fail("--max-chars: at least 2000 (or 0 for no limit)")
    try:
        git_repo = open_repo(repo)
        tip, head_commit = resolve_commit(git_repo, base), resolve_commit(git_repo, head)
        base_commit = merge_base(git_repo, tip, head_commit)
        graphs = []
        missing = 0
        for rev, commit in ((base, base_commit), (head, head_commit)):
            try:
                files = read_tree(git_repo, commit, subdir, max_file_bytes=max_file_bytes)
            except PathNotFound:
                files, missing = [], missing + 1
            deployments = read_tree_deployments(git_repo, commit, subdir,
                                                max_file_bytes=max_file_bytes)
            graphs.append(_graph_or_exit(_check(files, max_file_bytes, max_graph_bytes,
                                                deployments), f"{rev}:{subdir}"))
        if missing == 2:
            # A typo, not a change: "no change" would pass a CI check that compared
            # nothing. Exit 2 (as graph --rev, validate): 1 means "changed" here.
            fail(f"{subdir} is in neither commit {base_commit.hexsha[:12]} ({base}) nor "
                 f"{head_commit.hexsha[:12]} ({head}): check --path")
    except SourceError as exc:
        fail(str(exc))
    base_graph, head_graph = graphs
    d = graph_diff.diff_graphs(base_graph, head_graph, base_rev=base_commit.hexsha,
                               head_rev=head_commit.hexsha)
    d.base_tip = tip.hexsha
    if output == "markdown":
        click.echo(graph_diff.to_markdown(d, base_graph, head_graph, max_chars=max_chars),
                   nl=False)
    elif output == "json":
        click.echo(graph_diff.to_json(d), nl=False)
    else:
        click.echo(graph_diff.to_text(d), nl=False)
    if exit_code and not d.empty:
        raise SystemExit(EXIT_FAILED)
