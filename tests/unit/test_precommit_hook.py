"""The shipped .pre-commit-hooks.yaml, loaded and run by pre-commit itself.

The end-to-end tests run `pre-commit try-repo` as a user's repository would: pre-commit
clones the hook repository and pip-installs it into an isolated virtualenv (from PyPI,
about 10 s with a warm pip cache), then runs the hook in a git repository of pipeline
files. The hook repository is a copy of the files the package is built from, committed in
a temporary repository, so the test checks the working tree, not whatever HEAD holds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pre_commit.clientlib import load_manifest

from reconciler.cli import main

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / ".pre-commit-hooks.yaml"
# What `pip install .` of the hook repository needs: the build config, the readme it
# declares, the package and the schema force-included into the wheel, and the manifest.
HOOK_REPO_FILES = ("pyproject.toml", "README.md", "reconciler", "schemas",
                   ".pre-commit-hooks.yaml")
PROBLEM_LINE = re.compile(r"^(?P<path>\S+\.ya?ml):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$",
                          re.MULTILINE)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=test@example.com", "-c", "user.name=test",
         "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_all(cwd: Path, message: str) -> str:
    git(cwd, "add", "--all")
    git(cwd, "commit", "-q", "--allow-empty", "-m", message)
    return git(cwd, "rev-parse", "HEAD")


def test_manifest_loads_with_pre_commits_own_loader() -> None:
    hooks = load_manifest(str(MANIFEST))
    assert [h["id"] for h in hooks] == ["reconciler-validate"]
    hook = hooks[0]
    assert hook["language"] == "python"
    # validation is of the whole graph: run once on the directory, not on the changed files
    assert hook["pass_filenames"] is False
    assert hook["args"] == []


def test_hook_entry_runs_our_console_script() -> None:
    (hook,) = load_manifest(str(MANIFEST))
    program, *args = shlex.split(hook["entry"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "reconciler.cli:main"
    assert args == ["validate", "--staged"]  # the index: what the commit will hold
    assert args[0] in main.commands
    assert "--staged" in {o for p in main.commands["validate"].params for o in p.opts}


@pytest.mark.parametrize(("path", "runs"), [
    ("pipelines/06_pipeline.yaml", True),
    ("pipelines/team-a/x.yml", True),
    ("pipelines/README.md", False),
    ("airflow-deployments/af3.yaml", True),  # read with the pipelines (beside them)
    ("deploy/airflow-deployments/af3.yaml", False),
    ("schemas/pipeline.schema.json", False),
    ("docs/pipelines/x.yaml", False),
    (".github/workflows/pr.yml", False),
])
def test_hook_runs_when_a_pipeline_file_changes(path: str, runs: bool) -> None:
    (hook,) = load_manifest(str(MANIFEST))
    assert bool(re.search(hook["files"], path)) is runs


@pytest.fixture(scope="module")
def hook_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository holding this working tree's hook, as a user would reference it."""
    repo = tmp_path_factory.mktemp("hook-repo")
    for name in HOOK_REPO_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, repo / name)
    git(repo, "init", "-q")
    commit_all(repo, "hook repository")
    return repo


@pytest.fixture(scope="module")
def pre_commit_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pre-commit's cache of hook environments, shared by this module's tests only."""
    return tmp_path_factory.mktemp("pre-commit-home")


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A repository of pipeline files: the shipped example graph, committed."""
    repo = tmp_path / "user-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copytree(REPO / "pipelines", repo / "pipelines")
    commit_all(repo, "pipelines")
    return repo


def pre_commit(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PRE_COMMIT"))}
    env |= {"PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pre_commit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def problems(output: str) -> list[tuple[str, int, int, str]]:
    return [(m["path"], int(m["line"]), int(m["col"]), m["msg"])
            for m in PROBLEM_LINE.finditer(output)]


def test_try_repo_passes_on_valid_pipeline_files(
    hook_repo: Path, pre_commit_home: Path, user_repo: Path
) -> None:
    proc = pre_commit(user_repo, pre_commit_home, "try-repo", str(hook_repo),
                      "reconciler-validate", "--all-files")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^reconciler validate\.+Passed$", proc.stdout, re.MULTILINE), proc.stdout


def test_try_repo_fails_on_an_invalid_change_with_file_line_and_column(
    hook_repo: Path, pre_commit_home: Path, user_repo: Path
) -> None:
    (user_repo / "pipelines" / "07_pipeline.yaml").write_text(
        "dag_id: 07_pipeline\nowner: team-dwh\ndepends_on: [06_pipeline, nightly_export]\n")
    (user_repo / "pipelines" / "08_pipeline.yaml").write_text(
        "dag_id: 08_pipeline\nowner: [unclosed\n")
    git(user_repo, "add", "--all")  # staged, as in a commit being made
    proc = pre_commit(user_repo, pre_commit_home, "try-repo", str(hook_repo),
                      "reconciler-validate", "--all-files")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "- hook id: reconciler-validate" in proc.stdout
    found = problems(proc.stdout)
    assert any((path, line, col) == ("pipelines/07_pipeline.yaml", 3, 27)
               and msg.startswith("depends_on names 'nightly_export', but no pipeline file")
               for path, line, col, msg in found), proc.stdout
    assert any(path == "pipelines/08_pipeline.yaml" and line == 3 and "YAML syntax" in msg
               for path, line, _, msg in found), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_config_can_point_the_hook_at_another_directory(
    hook_repo: Path, pre_commit_home: Path, tmp_path: Path
) -> None:
    # The way the manifest's comment documents it: override `args` and `files`.
    repo = tmp_path / "other-layout"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copytree(REPO / "pipelines", repo / "deploy" / "pipelines")
    (repo / "deploy" / "pipelines" / "02_pipeline.yaml").write_text(
        "dag_id: 02_pipeline\nowner: team-dwh\nenabled: yes\n")
    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n"
        f"  - repo: {hook_repo}\n"
        f"    rev: {git(hook_repo, 'rev-parse', 'HEAD')}\n"
        f"    hooks:\n"
        f"      - id: reconciler-validate\n"
        f"        args: [deploy/pipelines]\n"
        f"        files: ^deploy/pipelines/\n")
    commit_all(repo, "pipelines elsewhere")
    proc = pre_commit(repo, pre_commit_home, "run", "--all-files")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (path, line, col, msg), = problems(proc.stdout)
    assert (path, line, col) == ("deploy/pipelines/02_pipeline.yaml", 3, 10)
    assert "YAML 1.1 boolean" in msg


def test_a_commit_whose_upstream_is_only_an_untracked_file_is_refused(
    hook_repo: Path, pre_commit_home: Path, user_repo: Path
) -> None:
    # The working tree has 09_pipeline, so a working-tree validate passed this commit.
    (user_repo / "pipelines" / "08_pipeline.yaml").write_text(
        "dag_id: 08_pipeline\nowner: team-dwh\ndepends_on: [09_pipeline]\n")
    (user_repo / "pipelines" / "09_pipeline.yaml").write_text(
        "dag_id: 09_pipeline\nowner: team-dwh\n")  # never staged
    git(user_repo, "add", "pipelines/08_pipeline.yaml")
    (user_repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n"
        f"  - repo: {hook_repo}\n"
        f"    rev: {git(hook_repo, 'rev-parse', 'HEAD')}\n"
        f"    hooks:\n"
        f"      - id: reconciler-validate\n")
    git(user_repo, "add", ".pre-commit-config.yaml")
    proc = pre_commit(user_repo, pre_commit_home, "run")  # on the staged files, as on commit
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = problems(proc.stdout)
    assert [(path, line, col) for path, line, col, _ in found] == [
        ("pipelines/08_pipeline.yaml", 3, 14)], proc.stdout
    assert "'09_pipeline', but no pipeline file defines it" in found[0][3]
    # Staging the upstream makes the same commit pass.
    git(user_repo, "add", "pipelines/09_pipeline.yaml")
    again = pre_commit(user_repo, pre_commit_home, "run")
    assert again.returncode == 0, again.stdout + again.stderr


def test_validate_staged_reads_the_index_not_the_working_tree(
        user_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same check without pre-commit, so it runs in a second: the CLI flag itself.
    from click.testing import CliRunner

    monkeypatch.chdir(user_repo)
    (user_repo / "pipelines" / "07_pipeline.yaml").write_text(
        "dag_id: 07_pipeline\nowner: x\ndepends_on: [06_pipeline, 09_pipeline]\n")
    (user_repo / "pipelines" / "09_pipeline.yaml").write_text("dag_id: 09_pipeline\nowner: x\n")
    git(user_repo, "add", "pipelines/07_pipeline.yaml")
    runner = CliRunner()
    working_tree = runner.invoke(main, ["validate"])
    staged = runner.invoke(main, ["validate", "--staged"])
    assert working_tree.exit_code == 0, working_tree.output
    assert staged.exit_code == 1, staged.output
    assert staged.stdout.startswith("pipelines/07_pipeline.yaml:3:27: depends_on names "
                                    "'09_pipeline', but no pipeline file defines it")
    # An unstaged fix does not count either.
    git(user_repo, "add", "pipelines/09_pipeline.yaml")
    (user_repo / "pipelines" / "09_pipeline.yaml").write_text("dag_id: [broken\n")
    assert runner.invoke(main, ["validate", "--staged"]).exit_code == 0
    assert runner.invoke(main, ["validate"]).exit_code == 1
