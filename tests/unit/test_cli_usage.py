"""The CLI contract a newcomer meets first (issue 16): a usage error is one line on stderr
and exit 2, as the README says; every command that prints data takes `-o/--output`; a
typo'd pipeline path is refused by diff, graph --rev and validate, as by sync; counts
read as English ("1 root")."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.core.words import counted
from tests.helpers import example_repo, git

USAGE_ERRORS = [
    (["graph", "--rev", "HEAD", "--path", "typo"], "reconciler graph", "--path"),
    (["no-such-command"], "reconciler", "no-such-command"),
    (["--no-such-flag", "status"], "reconciler", "--no-such-flag"),
    (["status", "--state", "bogus"], "reconciler status", "bogus"),
    (["rollback"], "reconciler rollback", "SEQ"),
    (["rollback", "seven"], "reconciler rollback", "seven"),
    (["wait", "--timeout", "soon"], "reconciler wait", "soon"),
    (["validate", "-o", "yaml"], "reconciler validate", "yaml"),
    (["diff"], "reconciler diff", "--base"),
    (["status", "--etcd-endpoints", "https://root:hunter2@etcd:2379"], "reconciler status",
     "credentials do not belong in an endpoint"),
]


@pytest.mark.parametrize(("args", "command", "named"), USAGE_ERRORS,
                         ids=[" ".join(a) for a, _, _ in USAGE_ERRORS])
def test_a_usage_error_is_one_line_on_stderr_and_exit_2(args: list[str], command: str,
                                                         named: str) -> None:
    result = CliRunner().invoke(main, args, env={"RECONCILER_ETCD_ENDPOINTS": "127.0.0.1:1"},
                                prog_name="reconciler")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {command}: ")
    assert result.stderr.endswith(f" (try '{command} --help')\n")
    assert named in result.stderr
    assert "hunter2" not in result.stderr


def test_help_and_the_bare_command_still_print_the_usage() -> None:
    bare = CliRunner().invoke(main, [], prog_name="reconciler")
    assert "Usage: reconciler [OPTIONS] COMMAND" in bare.output
    helped = CliRunner().invoke(main, ["status", "--help"], prog_name="reconciler")
    assert helped.exit_code == 0
    assert "Usage: reconciler status" in helped.output


# --- -o/--output everywhere data is printed --------------------------------------------------

QUIET = {"run"}
"""Commands that print no data: `run` logs (--log-format picks the log's form)."""


@pytest.mark.parametrize("command", sorted(set(main.commands) - QUIET))
def test_every_command_that_prints_data_takes_output_json(command: str) -> None:
    params = {p.name: p for p in main.commands[command].params}
    output = params.get("output")
    assert isinstance(output, click.Option), f"{command} has no -o/--output"
    assert output.opts == ["-o", "--output", "--format"]
    assert "json" in output.type.choices  # type: ignore[attr-defined]


def test_the_quiet_commands_are_the_ones_the_readme_names() -> None:
    assert set(main.commands) >= QUIET
    assert all(c in main.commands for c in ("resume", "reconcile", "wait"))


# --- a typo'd pipeline path is refused ----------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return example_repo(tmp_path / "repo")


def test_diff_refuses_a_path_in_neither_commit(repo: Path) -> None:
    for extra in ([], ["--exit-code"], ["-o", "json"]):
        result = CliRunner().invoke(main, ["diff", "--repo", str(repo), "--base", "HEAD",
                                           "--path", "pipelnes", *extra])
        assert result.exit_code == 2  # not 1: with --exit-code that means "changed"
        assert result.stdout == ""
        head = git(repo, "rev-parse", "HEAD")[:12]
        assert result.stderr == (f"error: pipelnes is in neither commit {head} (HEAD) nor "
                                 f"{head} (HEAD): check --path\n")


def test_diff_still_reads_a_path_missing_in_one_commit_as_an_empty_graph(repo: Path) -> None:
    git(repo, "mv", "pipelines", "graph")
    git(repo, "commit", "-qm", "move")
    result = CliRunner().invoke(main, ["diff", "--repo", str(repo), "--base", "HEAD~1",
                                       "--path", "graph", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["added"]) == 7


def test_graph_rev_and_validate_refuse_a_typo_as_well(repo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    graph = runner.invoke(main, ["graph", "--rev", "HEAD", "--repo", str(repo), "pipelnes"])
    assert graph.exit_code == 2
    assert graph.stderr.startswith("error: pipelnes is not in commit ")
    monkeypatch.chdir(repo)
    for args in (["validate", "pipelnes"], ["validate", "--staged", "pipelnes"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith("error: pipelnes: no such directory"), result.stderr
    staged = runner.invoke(main, ["validate", "--staged", "pipelines"])
    assert staged.exit_code == 0
    assert staged.stdout == "ok: 7 files, 7 pipelines, 9 dependencies, 1 root\n"


# --- counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "noun", "text"), [
    (0, "root", "0 roots"), (1, "root", "1 root"), (2, "root", "2 roots"),
    (1, "dependency", "1 dependency"), (9, "dependency", "9 dependencies"),
    (1, "open cycle", "1 open cycle"), (3, "byte", "3 bytes")])
def test_counts_read_as_english(n: int, noun: str, text: str) -> None:
    assert counted(n, noun) == text


def test_validate_says_1_root(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("dag_id: a\nowner: t\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.stdout == "ok: 1 file, 1 pipeline, 0 dependencies, 1 root\n"
