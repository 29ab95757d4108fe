"""The CLI contract of validate, graph, diff, sync and history (DESIGN section 7, issue 9):
`-o/--output` (alias `--format`) where data is printed, every option with an environment
variable listed in the README, durations wherever time is given, a `kind` in every JSON
answer, one line and exit 2 for an environment problem, no credential in any message."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.cli.app import ENVVAR_PREFIX, CommandError
from reconciler.cli.options import (
    json_answer,
    parse_duration_callback,
    parse_endpoints,
    parse_seconds_callback,
)
from reconciler.core.problems import redact

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
OURS = ("validate", "graph", "diff", "sync", "history")
DATA_COMMANDS = {"validate": "text", "graph": "mermaid", "diff": "markdown", "sync": "text",
                 "history": "text"}


def envvar(command: str, param: click.Option) -> str:
    """The variable click reads for `param`: its own, or the group's automatic one."""
    if param.envvar:
        assert isinstance(param.envvar, str)
        return param.envvar
    assert param.name
    return f"{ENVVAR_PREFIX}_{command.upper()}_{param.name.upper()}"


def options(command: str) -> list[click.Option]:
    return [p for p in main.commands[command].params
            if isinstance(p, click.Option) and p.name not in ("help", "version")]


@pytest.mark.parametrize("command", OURS)
def test_every_option_has_an_environment_variable_listed_in_the_readme(command: str) -> None:
    missing = [envvar(command, p) for p in options(command) if f"`{envvar(command, p)}`"
               not in README]
    assert missing == []
    for p in options(command):
        assert p.allow_from_autoenv
        assert p.show_envvar, f"{command} {p.opts}: --help should show its variable"


@pytest.mark.parametrize(("command", "default"), DATA_COMMANDS.items())
def test_every_command_that_prints_data_has_output_with_format_as_alias(
        command: str, default: str) -> None:
    (output,) = [p for p in options(command) if p.name == "output"]
    assert output.opts == ["-o", "--output", "--format"]
    assert output.default == default
    assert "json" in output.type.choices  # type: ignore[attr-defined]


def test_an_environment_variable_sets_an_option(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("dag_id: a\nowner: t\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path)],
                                env={"RECONCILER_VALIDATE_OUTPUT": "json"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["kind"], data["ok"], data["pipelines"]) == ("ValidationResult", True, 1)
    limited = CliRunner().invoke(main, ["validate", str(tmp_path)],
                                 env={"RECONCILER_MAX_FILE_BYTES": "10"})
    assert limited.exit_code == 1
    assert "over the 10 byte limit" in limited.stdout


@pytest.mark.parametrize(("text", "seconds"), [
    ("5", 5.0), ("5s", 5.0), ("2.5", 2.5), ("1m", 60.0), ("1.5h", 5400.0), ("2d", 172800.0),
    (" 30s ", 30.0), (7, 7.0)])
def test_durations_are_accepted_wherever_time_is_given(text: object, seconds: float) -> None:
    assert parse_seconds_callback(None, None, text) == seconds
    if isinstance(text, str):
        assert parse_duration_callback(None, None, text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["soon", "5 minutes", "-5s", "1y", ""])
def test_a_bad_duration_is_a_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a duration"):
        parse_seconds_callback(None, None, text)


def test_json_answers_are_objects_with_a_kind() -> None:
    assert json.loads(json_answer("History", items=[])) == {"kind": "History", "items": []}
    first = next(iter(json.loads(json_answer("SyncResult", {"kind": "x", "ok": True}))))
    assert first == "kind"
    assert json.loads(json_answer("SyncResult", {"kind": "x"}))["kind"] == "SyncResult"


def test_graph_json_and_validate_json_have_a_kind(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("dag_id: a\nowner: t\n")
    runner = CliRunner()
    graph = json.loads(runner.invoke(main, ["graph", str(tmp_path), "-o", "json"]).stdout)
    assert graph["kind"] == "Graph"
    bad = runner.invoke(main, ["validate", str(tmp_path / "nope"), "--format", "json"])
    assert bad.exit_code == 2  # an environment problem is a line on stderr, not JSON
    assert bad.stdout == ""


@pytest.mark.parametrize(("text", "shown"), [
    ("https://user:pa55@git.example.com/r.git", "https://git.example.com/r.git"),
    ("clone of https://ghp_token@github.com/o/r failed", "clone of https://github.com/o/r failed"),
    ("http://a:b@h:8080/api and ssh://git@h/r", "http://h:8080/api and ssh://h/r"),
    ("https://host/path?q=a@b", "https://host/path?q=a@b"),
    ("no url here: user@host", "no url here: user@host"),
])
def test_credentials_are_removed_from_urls_in_messages(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_command_error_is_one_redacted_line(capsys: pytest.CaptureFixture[str]) -> None:
    error = CommandError("cannot reach https://bot:hunter2@git.example.com/r.git\nsecond")
    error.show()
    assert capsys.readouterr().err == (
        "error: cannot reach https://git.example.com/r.git second\n")
    assert error.exit_code == 2


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(click.BadParameter) as info:
        parse_endpoints("https://root:hunter2@etcd.example.com:2379")
    assert "hunter2" not in str(info.value.message)
    assert "credentials do not belong in an endpoint" in str(info.value.message)


def test_an_unreadable_repository_for_graph_rev_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["graph", "--rev", "HEAD", "--repo",
                                       str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")
    assert "not a git repository" in result.stderr
