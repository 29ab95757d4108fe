"""The one reading rule (adapters/sources.py) for a directory, a commit's tree and the index.

Hostile trees: symbolic links out of the repository, FIFOs, sockets, unreadable files and
folders, wrong-case extensions, names with control characters or not UTF-8, files that
are huge or sparse. The property test builds random trees, commits them, and proves that
`validate`'s directory reader and `sync`'s tree reader see the same files and the same
problems. The tests may run as root, who reads any file whatever its mode: `unprivileged()`
then drops the effective uid to nobody around the read, so "unreadable" means unreadable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.adapters.sources import (
    SourceError,
    judge,
    open_repo,
    read_directory,
    read_index,
    read_tree,
)
from reconciler.cli import main
from reconciler.core.checks import SourceFile, check_files

SECRET = "s3cret-content-of-the-link-target"
NOBODY = 65534


@contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block without root's right to read everything (no-op for other users)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextmanager
def open_tmp() -> Iterator[Path]:
    """A temporary folder that nobody can traverse (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="reading-rule-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                if not os.path.islink(os.path.join(dirpath, d)):
                    os.chmod(os.path.join(dirpath, d), 0o755)
        shutil.rmtree(path)


@pytest.fixture
def world() -> Iterator[Path]:
    with open_tmp() as path:
        yield path


def git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, env=env, timeout=60).stdout.strip()


def commit_all(repo: Path) -> str:
    if not (repo / ".git").exists():
        git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "tree")
    return git(repo, "rev-parse", "HEAD")


def pipeline(dag_id: str, *ups: str) -> bytes:
    text = f"dag_id: {dag_id}\nowner: t\n"
    if ups:
        text += f"depends_on: [{', '.join(ups)}]\n"
    return text.encode()


def validate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["validate", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def by_code(files: list[SourceFile]) -> dict[str, str]:
    return {f.path.rpartition("/")[2]: f.problem.code for f in files if f.problem}


# --- the rule itself --------------------------------------------------------------------

@pytest.mark.parametrize(("name", "verdict", "code"), [
    (b"a.yaml", "read", ""),
    (b"a.yml", "read", ""),
    (b"a.YAML", "refuse", "file-extension"),
    (b"a.Yml", "refuse", "file-extension"),
    (b"a.json", "skip", ""),
    (b"README", "skip", ""),
    (b".a.yaml", "skip", ""),
    (b"a\nb.yaml", "refuse", "file-name"),
    (b"\xff.yaml", "refuse", "file-name"),
    ("a\u202eb.yaml".encode(), "refuse", "file-name"),  # right-to-left override
])
def test_the_rule_for_a_regular_file(name: bytes, verdict: str, code: str) -> None:
    from reconciler.adapters.sources import Kind

    got, got_code, message = judge(name, Kind.FILE)
    assert (got.value, got_code) == (verdict, code)
    assert bool(message) == (verdict == "refuse")


def test_wrong_case_extension_says_what_to_rename_it_to(world: Path) -> None:
    (world / "a.YAML").write_bytes(pipeline("a"))
    (world / "b.Yml").write_bytes(pipeline("b", "a"))
    code, out, err = validate(str(world))
    assert code == 1, out + err
    assert f"{world}/a.YAML:1:1: the extension must be lower-case .yaml or .yml, or the file " \
        "is not read; rename it to a.yaml" in out
    assert f"{world}/b.Yml:1:1:" in out
    assert "rename it to b.yml" in out
    assert "depends_on names" not in out  # b's upstream is the refused a.YAML: not unknown


# --- symbolic links: never followed, never shown ----------------------------------------

def test_a_symlink_out_of_the_repository_is_refused_and_its_target_never_shown(
        world: Path) -> None:
    (world / "outside.txt").write_text(f"{SECRET}\n")
    folder = world / "pipelines"
    folder.mkdir()
    (folder / "a.yaml").write_bytes(pipeline("a"))
    (folder / "b.yaml").symlink_to(world / "outside.txt")
    (folder / "c.yaml").symlink_to("a.yaml")  # even a link inside the folder
    (folder / "team").symlink_to(world)  # a folder link: not walked either
    for fmt in ("text", "json", "github"):
        code, out, err = validate(str(folder), "--format", fmt)
        assert code == 1, out + err
        assert SECRET not in out + err
        assert "outside.txt" not in out + err
    _, out, _ = validate(str(folder))
    assert out.splitlines() == [
        f"{folder}/b.yaml:1:1: a symbolic link: links are never followed; commit the file "
        "itself instead",
        f"{folder}/c.yaml:1:1: a symbolic link: links are never followed; commit the file "
        "itself instead",
        f"{folder}/team:1:1: a symbolic link: links are never followed; commit the file "
        "itself instead",
        "3 problem(s) in 3 file(s)",
    ]


def test_dangling_and_looping_links_inside_the_folder_are_refused_not_a_traceback(
        world: Path) -> None:
    (world / "dangling.yaml").symlink_to(world / "nowhere.yaml")
    (world / "loop.yaml").symlink_to("loop.yaml")
    code, out, err = validate(str(world))
    assert code == 1, out + err
    assert by_code(read_directory(world)) == {"dangling.yaml": "symlink", "loop.yaml": "symlink"}


def test_git_trees_refuse_symlinks_too(world: Path) -> None:
    (world / "outside.txt").write_text(SECRET)
    folder = world / "pipelines"
    folder.mkdir()
    (folder / "a.yaml").write_bytes(pipeline("a"))
    (folder / "b.yaml").symlink_to("../outside.txt")
    sha = commit_all(world)
    repo = open_repo(world)
    files = read_tree(repo, repo.commit(sha), "pipelines")
    assert [(f.path, f.problem.code if f.problem else None) for f in files] == [
        ("pipelines/a.yaml", None), ("pipelines/b.yaml", "symlink")]
    assert all(SECRET.encode() not in f.data for f in files)
    assert all(SECRET not in str(f.problem) for f in files)


# --- files that are not plain files ----------------------------------------------------

def test_a_fifo_is_refused_without_being_opened(world: Path) -> None:
    os.mkfifo(world / "x.yaml")
    (world / "a.yaml").write_bytes(pipeline("a"))
    # A subprocess, so that a hang (the old behaviour) fails the test instead of stalling it.
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(world)],
                          capture_output=True, text=True, timeout=30)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        f"{world}/x.yaml:1:1: not a regular file (a FIFO, socket or device): only regular "
        "files are read")


def test_a_socket_and_a_device_are_refused(world: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(world / "s.yaml"))
        os.symlink("/dev/null", world / "null.yaml")
        codes = by_code(read_directory(world))
    assert codes == {"s.yaml": "not-a-file", "null.yaml": "symlink"}


# --- unreadable: an error, never a skip ------------------------------------------------

def test_an_unreadable_file_is_an_environment_error(world: Path) -> None:
    (world / "a.yaml").write_bytes(pipeline("a"))
    secret = world / "b.yaml"
    secret.write_bytes(pipeline("b"))
    secret.chmod(0)
    assert validate(str(world))[0] in (0, 1)  # warm the imports before dropping privileges
    with unprivileged():
        code, out, err = validate(str(world))
        with pytest.raises(SourceError, match=r"b\.yaml: cannot read: permission denied"):
            read_directory(world)
    assert code == 2, out + err
    assert out == ""
    assert err == f"error: {world}/b.yaml: cannot read: permission denied\n"


def test_an_unreadable_subfolder_is_an_error_not_a_silent_ok(world: Path) -> None:
    (world / "a.yaml").write_bytes(pipeline("a"))
    team = world / "team"
    team.mkdir()
    (team / "b.yaml").write_bytes(pipeline("b", "a"))
    team.chmod(0)
    assert validate(str(world))[0] in (0, 1)
    with unprivileged():
        code, out, err = validate(str(world))
    assert (code, out) == (2, "")
    assert err == f"error: {world}/team: cannot read this folder: permission denied\n"


# --- the DIR argument ------------------------------------------------------------------

@pytest.mark.parametrize(("make", "message"), [
    (lambda w: None, "no such directory"),
    (lambda w: (w / "d").symlink_to(w / "nowhere"), "a symbolic link to a path that does not "
                                                    "exist"),
    (lambda w: (w / "d").symlink_to(w / "d"), "a symbolic link that loops back on itself"),
    (lambda w: (w / "d").write_text("x"), "not a directory"),
])
def test_a_bad_directory_argument_is_one_line_and_exit_2(world: Path, make, message: str  # type: ignore[no-untyped-def]
                                                         ) -> None:
    make(world)
    code, out, err = validate(str(world / "d"))
    assert (code, out, err) == (2, "", f"error: {world / 'd'}: {message}\n")


def test_a_directory_argument_that_is_a_link_is_followed(world: Path) -> None:
    # The argument is the user's own choice (e.g. a link to the checkout); entries are not.
    real = world / "real"
    real.mkdir()
    (real / "a.yaml").write_bytes(pipeline("a"))
    (world / "link").symlink_to(real)
    code, out, _ = validate(str(world / "link"))
    assert (code, out) == (0, "ok: 1 file, 1 pipeline, 0 dependencies, 1 root\n")


# --- hidden entries, names, sizes ----------------------------------------------------------

def test_hidden_files_and_folders_are_skipped_by_both_readers(world: Path) -> None:
    folder = world / "pipelines"
    (folder / ".dir").mkdir(parents=True)
    (folder / ".dir" / "d.yaml").write_bytes(b"broken: [")
    (folder / ".hidden.yaml").write_bytes(b"broken: [")
    (folder / "a.yaml").write_bytes(pipeline("a"))
    sha = commit_all(world)
    repo = open_repo(world)
    assert [f.path for f in read_tree(repo, repo.commit(sha), "pipelines")] == [
        "pipelines/a.yaml"]
    assert [f.path for f in read_directory(folder)] == [f"{folder}/a.yaml"]


def test_a_name_with_a_newline_cannot_forge_an_output_line(world: Path) -> None:
    (world / "a.yaml\nforged.yaml:1:1: everything is fine").write_bytes(b"x")
    code, out, _ = validate(str(world))
    assert code == 1
    assert out.splitlines() == [
        f"{world}/a.yaml\\nforged.yaml:1:1: everything is fine:1:1: the name is not UTF-8 or "
        "holds a control character; rename it", "1 problem(s) in 1 file(s)"]


def test_a_huge_sparse_file_is_refused_with_its_real_size_without_reading_it(
        world: Path) -> None:
    with (world / "a.yaml").open("wb") as fh:
        fh.truncate(8 * 1024**3)  # 8 GiB of nothing: reading it whole would take minutes
    (world / "b.yaml").write_bytes(b"dag_id: b\nowner: x\n#" + b"x" * 70 * 1024)
    start = time.monotonic()
    code, out, _ = validate(str(world))
    assert time.monotonic() - start < 20
    assert code == 1
    assert out.splitlines()[:2] == [
        f"{world}/a.yaml:1:1: file is 8589934592 bytes, over the 65536 byte limit for a "
        "pipeline file",
        f"{world}/b.yaml:1:1: file is 71700 bytes, over the 65536 byte limit for a pipeline "
        "file"]
    assert read_directory(world)[0] == SourceFile(f"{world}/a.yaml", b"", 8 * 1024**3)


def test_a_submodule_or_nested_repository_is_refused_by_both_readers(world: Path) -> None:
    inner = world / "inner"
    inner.mkdir()
    git(inner, "init", "-q")
    (inner / "x.yaml").write_bytes(pipeline("x"))
    commit_all(inner)
    repo_dir = world / "repo"
    folder = repo_dir / "pipelines"
    folder.mkdir(parents=True)
    git(repo_dir, "init", "-q")
    (folder / "a.yaml").write_bytes(pipeline("a"))
    git(repo_dir, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(inner),
        "pipelines/team")
    sha = commit_all(repo_dir)
    repo = open_repo(repo_dir)
    assert by_code(read_tree(repo, repo.commit(sha), "pipelines")) == {"team": "submodule"}
    assert by_code(read_directory(folder)) == {"team": "submodule"}


# --- the index (validate --staged) ---------------------------------------------------------

def test_the_index_reader_reads_what_is_staged_not_the_working_tree(
        world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = world / "pipelines"
    folder.mkdir()
    git(world, "init", "-q")
    (folder / "a.yaml").write_bytes(pipeline("a"))
    (folder / "b.yaml").write_bytes(pipeline("b", "a"))
    git(world, "add", "-A")
    (folder / "b.yaml").write_bytes(b"changed after staging: [")  # not staged
    (folder / "c.yaml").write_bytes(pipeline("c", "b"))  # untracked
    (folder / "l.yaml").symlink_to("a.yaml")
    git(world, "add", "pipelines/l.yaml")
    monkeypatch.chdir(world)
    files = read_index("pipelines")
    assert [(f.path, f.data, f.problem.code if f.problem else None) for f in files] == [
        ("pipelines/a.yaml", pipeline("a"), None),
        ("pipelines/b.yaml", pipeline("b", "a"), None),
        ("pipelines/l.yaml", b"", "symlink")]


# --- the property: validate and sync read a committed tree alike ----------------------------

NAMES = st.sampled_from(["a", "b", "c", "team", "x_1", "Ünï", ".hid", "a\tb", "\udcff"])
SUFFIXES = st.sampled_from([".yaml", ".yml", ".YAML", ".Yml", ".txt", ""])
CONTENTS = st.sampled_from([
    "valid", "valid-with-upstream", "syntax", "yes", "utf16", "latin1", "bom", "empty",
    "big", "binary"])
LINKS = st.sampled_from(["sibling", "outside", "absolute", "dangling", "loop", "dir"])


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> dict[str, object]:
    """{name: ("file", content) | ("link", target) | {sub-tree}}."""
    out: dict[str, object] = {}
    for _ in range(draw(st.integers(0, 5 if depth == 0 else 3))):
        name = draw(NAMES) + draw(SUFFIXES)
        kind = draw(st.sampled_from(["file", "file", "file", "link", "dir"] if depth < 2
                                    else ["file", "link"]))
        if kind == "dir":
            # git keeps no empty folder: give each one a file, so both readers can see it
            out[name] = {**draw(trees(depth + 1)), "keep.txt": ("file", "empty")}
        elif kind == "link":
            out[name] = ("link", draw(LINKS))
        else:
            out[name] = ("file", draw(CONTENTS))
    return out


def content(kind: str, stem: str) -> bytes:
    safe = stem if stem.isidentifier() else "p"
    return {
        "valid": pipeline(safe),
        "valid-with-upstream": pipeline(safe, "a"),
        "syntax": b"dag_id: [\n",
        "yes": f"dag_id: {safe}\nowner: t\nenabled: yes\nunknown: 1\n".encode(),
        "utf16": pipeline(safe).decode().encode("utf-16"),
        "latin1": f"dag_id: {safe}\nowner: Jos\xe9\n".encode("latin-1"),
        "bom": b"\xef\xbb\xbf" + pipeline(safe),
        "empty": b"",
        "big": b"# " + b"x" * (70 * 1024),
        "binary": bytes(range(256)),
    }[kind]


def build(root: bytes, tree: dict[str, object], world: Path) -> None:
    os.makedirs(root, exist_ok=True)
    for name, spec in tree.items():
        path = os.path.join(root, os.fsencode(name))
        if isinstance(spec, dict):
            build(path, spec, world)
        elif spec[0] == "file":
            with open(path, "wb") as fh:
                fh.write(content(str(spec[1]), name.partition(".")[0]))
        else:
            target = {"sibling": "a.yaml", "outside": "../" * 5 + "outside.txt",
                      "absolute": str(world / "outside.txt"), "dangling": "nowhere.yaml",
                      "loop": name, "dir": "."}[str(spec[1])]
            os.symlink(target, path)


def relative(files: list[SourceFile], prefix: str) -> list[tuple[object, ...]]:
    def rel(path: str) -> str:
        assert path.startswith(prefix), (path, prefix)
        return path[len(prefix):]

    return [(rel(f.path), f.data, f.size,
             f.problem and (rel(f.problem.path), f.problem.message, f.problem.code))
            for f in files]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=trees(), hostile=st.sets(st.sampled_from(["fifo", "socket", "unreadable-file",
                                                      "unreadable-dir"])))
def test_validate_and_sync_read_the_same_committed_tree_alike(
        tree: dict[str, object], hostile: set[str]) -> None:
    from reconciler.service.sync import read_tree as sync_reader  # what `sync` calls

    with open_tmp() as world:
        (world / "outside.txt").write_text(SECRET)
        folder = world / "pipelines"
        build(os.fsencode(folder), tree, world)
        (folder / "anchor.yaml").write_bytes(pipeline("anchor"))  # never an empty folder
        sha = commit_all(world)
        repo = open_repo(world)
        from_tree = sync_reader(repo, repo.commit(sha), "pipelines")
        from_dir = read_directory(folder)
        assert relative(from_dir, f"{world}/") == relative(from_tree, "")
        checked_dir, checked_tree = check_files(from_dir), check_files(from_tree)
        assert [(p.path[len(f"{world}/"):], p.line, p.column,
                 p.message.replace(f"{world}/", "")) for p in checked_dir.problems] == [
            (p.path, p.line, p.column, p.message) for p in checked_tree.problems]
        assert checked_dir.graph == checked_tree.graph
        for f in from_dir:
            assert SECRET.encode() not in f.data
            assert f.problem is None or SECRET not in str(f.problem)

        # What git cannot hold: the directory reader refuses it or stops with one error.
        if "fifo" in hostile:
            os.mkfifo(folder / "fifo.yaml")
        sock = None
        if "socket" in hostile:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(folder / "sock.yaml"))
        if "unreadable-file" in hostile:
            (folder / "locked.yaml").write_bytes(pipeline("locked"))
            (folder / "locked.yaml").chmod(0)
        if "unreadable-dir" in hostile:
            (folder / "locked_dir").mkdir()
            (folder / "locked_dir").chmod(0)
        try:
            with unprivileged():
                try:
                    again = read_directory(folder)
                except SourceError as exc:
                    error: str | None = str(exc)
                else:
                    error = None
        finally:
            if sock is not None:
                sock.close()
        if hostile & {"unreadable-file", "unreadable-dir"}:
            assert error is not None
            assert "locked" in error
            assert "permission denied" in error
        else:
            assert error is None
            special = {"fifo.yaml"} if "fifo" in hostile else set()
            special |= {"sock.yaml"} if "socket" in hostile else set()
            assert {f.path.rpartition("/")[2] for f in again
                    if f.problem and f.problem.code == "not-a-file"} == special
            assert len(again) == len(from_dir) + len(special)
