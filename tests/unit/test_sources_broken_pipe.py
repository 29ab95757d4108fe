"""gitpython keeps a `git cat-file` process per repository and writes its questions to it.
When git refuses the repository (dubious ownership: it belongs to another user) that
process may exit before the question is written, and gitpython's write raises
BrokenPipeError. `resolve_commit` must then say why git refused, as when the refusal comes
back as an answer, never "[Errno 32] Broken pipe"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.sources import SourceError, open_repo, resolve_commit
from tests.helpers import git

OTHER_UID = 10001


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "one")
    return repo


@pytest.fixture
def no_git_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # No safe.directory from the machine's or the user's git config.
    for key in [k for k in os.environ if k.startswith("GIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)


def break_first_read(repo: Any) -> None:
    real = repo.commit
    calls = []

    def commit(rev: str) -> Any:
        calls.append(rev)
        if len(calls) == 1:
            raise BrokenPipeError(32, "Broken pipe")
        return real(rev)

    repo.commit = commit


def test_a_broken_pipe_on_a_readable_repository_still_resolves_the_commit(
        repo_dir: Path, no_git_config: None) -> None:
    repo = open_repo(repo_dir)
    head = git(repo_dir, "rev-parse", "HEAD")
    break_first_read(repo)
    assert resolve_commit(repo, "HEAD").hexsha == head


def test_a_broken_pipe_on_a_missing_rev_says_it_is_not_a_commit(
        repo_dir: Path, no_git_config: None) -> None:
    repo = open_repo(repo_dir)
    break_first_read(repo)
    with pytest.raises(SourceError, match="'no-such-branch' is not a commit"):
        resolve_commit(repo, "no-such-branch")


def test_a_broken_pipe_from_a_refused_repository_says_why_git_refused(
        repo_dir: Path, no_git_config: None) -> None:
    repo = open_repo(repo_dir)
    # Owned by another user now: git refuses it (the CI machine runs the suite as root).
    for path in [repo_dir, *repo_dir.rglob("*")]:
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
    break_first_read(repo)
    with pytest.raises(SourceError) as caught:
        resolve_commit(repo, "HEAD")
    message = str(caught.value)
    assert "dubious ownership" in message
    assert "safe.directory" in message
    assert "Broken pipe" not in message
