"""Sync checks the files of a commit while git is still reading them (issue 11, part 4).

`open_tree` (adapters/sources.py) lists the tree at once and hands over the blobs as one
`git cat-file --batch` writes them; `check_files` checks each as it comes and orders
everything else by path afterwards. These tests hold both to what the sorted, all-at-once
reading gives, and check that a git that fails or is abandoned halfway leaves nothing
behind (no git process, no helper thread) and says what went wrong.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Generator
from pathlib import Path

import pytest

from reconciler.adapters.sources import (
    PathNotFound,
    SourceError,
    _read_blobs,
    open_repo,
    open_tree,
    read_tree,
    resolve_commit,
)
from reconciler.core.checks import SourceFile, check_files


def git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A commit whose pipelines/ holds good files, bad ones and entries the rule refuses."""
    root = tmp_path / "repo"
    files = {
        "pipelines/a.yaml": "dag_id: a\nowner: t\n",
        "pipelines/b.yaml": "dag_id: b\nowner: t\ndepends_on: [a, a, nope]\n",
        "pipelines/c.yml": "dag_id: c\nowner: t\nunknown: 1\n",
        "pipelines/c.yaml": "dag_id: c\nowner: t\n",  # c twice: the order decides the message
        "pipelines/sub/d.yaml": "dag_id: d\nowner: t\ndepends_on: [e]\n",
        "pipelines/sub/e.yaml": "dag_id: e\nowner: t\ndepends_on: [d]\n",  # a cycle
        "pipelines/Upper.YAML": "dag_id: Upper\nowner: t\n",
        "pipelines/big.yaml": "dag_id: big\nowner: t\ndescription: " + "x" * 70_000 + "\n",
        "pipelines/README.md": "not read\n",
    }
    # 600 KB in all, far more than a pipe holds: a reader that stops leaves git blocked.
    files.update({f"pipelines/many/p{i:03d}.yaml": f"dag_id: p{i:03d}\nowner: t\n"
                  f"description: {'y' * 3000}\n" for i in range(200)})
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "pipelines" / "link.yaml").symlink_to("a.yaml")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tree")
    return root


def helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "git-cat-file-input"]


def test_the_stream_holds_what_read_tree_reads(repo: Path) -> None:
    r = open_repo(repo)
    commit = resolve_commit(r, "HEAD")
    listed = read_tree(r, commit, "pipelines")
    streamed = list(open_tree(r, commit, "pipelines"))
    assert sorted(streamed, key=lambda f: f.path) == listed
    assert {f.path for f in listed} >= {"pipelines/link.yaml", "pipelines/Upper.YAML",
                                         "pipelines/big.yaml", "pipelines/sub/d.yaml"}
    assert not helper_threads()


def test_checking_the_stream_finds_what_checking_the_sorted_files_finds(repo: Path) -> None:
    r = open_repo(repo)
    commit = resolve_commit(r, "HEAD")
    listed = check_files(read_tree(r, commit, "pipelines"))
    streamed = check_files(open_tree(r, commit, "pipelines"))
    assert streamed.problems == listed.problems
    assert streamed.files == listed.files
    codes = {p.code for p in listed.problems}
    assert {"duplicate-id", "duplicate-upstream", "unknown-upstream", "cycle", "symlink",
            "file-extension", "too-large", "unknown-key"} <= codes


def test_the_order_files_come_in_changes_nothing() -> None:
    files = [SourceFile("p/a.yaml", b"dag_id: a\nowner: t\n"),
             SourceFile("p/a.yml", b"dag_id: a\nowner: t\n"),
             SourceFile("p/b.yaml", b"dag_id: b\nowner: t\ndepends_on: [a]\n"),
             SourceFile("p/c.yaml", b"dag_id: c\nowner: t\ndepends_on: [b]\n")]
    ordered = check_files(files)
    reversed_ = check_files(reversed(files))
    assert reversed_.problems == ordered.problems
    assert [str(p) for p in ordered.problems] == [
        "p/a.yml:1:1: pipeline 'a' is defined twice: also in p/a.yaml; keep one file"]
    good = files[:1] + files[2:]
    graph, graph_reversed = check_files(good).graph, check_files(reversed(good)).graph
    assert graph is not None
    assert graph_reversed is not None
    assert list(graph.pipelines) == list(graph_reversed.pipelines) == ["a", "b", "c"]
    assert graph.compressed() == graph_reversed.compressed()


def test_a_missing_path_is_known_before_any_file_is_read(repo: Path) -> None:
    r = open_repo(repo)
    with pytest.raises(PathNotFound):
        open_tree(r, resolve_commit(r, "HEAD"), "elsewhere")  # not only once iterated


def test_a_blob_git_cannot_read_fails_halfway_and_leaves_nothing_running(repo: Path) -> None:
    r = open_repo(repo)
    commit = resolve_commit(r, "HEAD")
    good = [f for f in read_tree(r, commit, "pipelines") if f.problem is None and f.data]
    shas = {line.split()[3]: line.split()[2] for line in git(
        repo, "ls-tree", "-r", commit.hexsha, "pipelines").splitlines()}
    wanted = [(f.path, shas[f.path], len(f.data)) for f in good[:2]]
    wanted.insert(1, ("pipelines/gone.yaml", "0" * 40, 10))
    stream = _read_blobs(r, wanted, "commit x")
    assert next(stream).path == wanted[0][0]  # the first arrives before git has failed
    with pytest.raises(SourceError, match=r"answered b'0{40} missing' for pipelines/gone"):
        next(stream)
    assert not helper_threads()


def test_a_stream_left_halfway_stops_git(repo: Path) -> None:
    r = open_repo(repo)
    stream = open_tree(r, resolve_commit(r, "HEAD"), "pipelines")
    assert isinstance(stream, Generator)
    while not next(stream).data:  # past the refused entries, into git's answers
        pass
    assert helper_threads()  # git is still writing (blocked: nobody reads the pipe)
    stream.close()  # e.g. the checks raised: git is killed and waited for, the helper ends
    assert not helper_threads()
