"""Where pipeline files come from: a directory on disk, or the tree of a git commit.

Both give the same SourceFile values to checks.check_files. Reading from git uses the
commit's tree only (never the working tree), so what is synced is what was committed.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from reconciler.core.checks import PIPELINE_SUFFIXES, SourceFile
from reconciler.core.yamlload import MAX_FILE_BYTES


class SourceError(Exception):
    """The files could not be read at all (no such directory, not a git repository, bad rev)."""


def read_directory(directory: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES
                   ) -> list[SourceFile]:
    root = Path(directory)
    if not root.is_dir():
        raise SourceError(f"{directory}: no such directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(PIPELINE_SUFFIXES) or name.startswith("."):
                continue
            path = Path(dirpath) / name
            with path.open("rb") as fh:
                # One byte over the limit is enough to refuse it; never read a huge file whole.
                data = fh.read(max_file_bytes + 1)
            out.append(SourceFile(str(path), data))
    return out


def open_repo(repo_path: str | Path):  # -> git.Repo
    import git

    try:
        return git.Repo(repo_path, search_parent_directories=True)
    except (git.NoSuchPathError, git.InvalidGitRepositoryError):
        raise SourceError(f"{repo_path}: not a git repository") from None


def resolve_commit(repo, rev: str):  # -> git.Commit
    import git

    try:
        return repo.commit(rev)
    except (git.BadName, git.BadObject, ValueError):
        raise SourceError(f"{rev!r} is not a commit in {repo.working_dir or repo.git_dir}"
                          ) from None


def read_commit(repo_path: str | Path, rev: str, subdir: str = "pipelines", *,
                max_file_bytes: int = MAX_FILE_BYTES) -> tuple[str, list[SourceFile]]:
    """The commit's full sha and the pipeline files in `subdir` of its tree."""
    repo = open_repo(repo_path)
    commit = resolve_commit(repo, rev)
    return commit.hexsha, read_tree_files(commit, subdir, max_file_bytes=max_file_bytes)


def read_tree_files(commit, subdir: str = "pipelines", *,
                    max_file_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    subdir = str(PurePosixPath(subdir)).strip("/")
    try:
        tree = commit.tree / subdir if subdir not in ("", ".") else commit.tree
    except KeyError:
        return []  # the commit has no pipelines yet: an empty graph
    if tree.type != "tree":
        raise SourceError(f"{subdir} is not a directory in commit {commit.hexsha[:12]}")
    out = []
    for item in tree.traverse():
        if item.type != "blob" or not item.name.endswith(PIPELINE_SUFFIXES):
            continue
        if item.name.startswith("."):
            continue
        if item.size > max_file_bytes:
            data = item.data_stream.read(max_file_bytes + 1)
        else:
            data = item.data_stream.read()
        out.append(SourceFile(item.path, data))
    return sorted(out, key=lambda f: f.path)
