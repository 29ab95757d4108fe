"""Where pipeline files come from: a directory on disk, a git commit's tree, or the index.

All three readers apply one rule (`judge`) and give the same SourceFile values to
checks.check_files, so `validate`, `validate --staged`, `graph`, `diff` and `sync` read the
same files from the same tree:

- Names starting with "." (files and folders) are skipped, never opened: `.git`, editor
  and tool folders. Everything else is looked at.
- Only regular files ending in `.yaml` or `.yml` are read. `a.YAML` or `a.Yml` is refused
  and named (it would be silently ignored otherwise). Other files are ignored.
- A symbolic link (mode 120000 in git) is refused and named, whatever it points to; it
  is never followed, and neither its target nor the target's content is ever shown.
- FIFOs, sockets and devices are refused without being opened; a git submodule or a
  nested repository is refused (its files are not this repository's).
- A name that is not UTF-8 or holds a control character is refused, shown escaped, so a
  name cannot forge an output line.
- Reads are bounded: a file over the limit is not read at all (its real size is
  reported); one under it is read with at most limit + 1 bytes (it may be growing).
- A file or folder that cannot be read is a SourceError (exit 2), never a skip.

Reading from git uses the commit's tree or the index only, never the working tree.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.core.checks import PIPELINE_SUFFIXES, SourceFile
from reconciler.core.deployments import deployments_dir
from reconciler.core.errors import NeedsHuman
from reconciler.core.problems import redact
from reconciler.core.yamlload import MAX_FILE_BYTES

GIT_TIMEOUT = 300


class SourceError(NeedsHuman):
    """The files could not be read at all (no such directory, not a git repository, bad
    rev, an unreadable file or folder): an environment problem, exit 2."""

    dependency = "git"


class PathNotFound(SourceError):
    """The pipeline folder is not in the commit (or the index)."""


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    SPECIAL = "special"  # FIFO, socket, device
    SUBMODULE = "submodule"


class Verdict(enum.Enum):
    READ = "read"
    WALK = "walk"
    SKIP = "skip"
    REFUSE = "refuse"


_REFUSALS = {
    Kind.SYMLINK: ("symlink", "a symbolic link: links are never followed; commit the file "
                   "itself instead"),
    Kind.SPECIAL: ("not-a-file", "not a regular file (a FIFO, socket or device): only "
                   "regular files are read"),
    Kind.SUBMODULE: ("submodule", "a git submodule or nested repository: its files are not "
                     "read; commit the pipeline files in this repository"),
}


def name_is_clean(raw: bytes) -> bool:
    try:
        return raw.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def shown_name(raw: bytes) -> str:
    """A name as it may be printed: invalid UTF-8 and unprintable characters escaped."""
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text  # the common case, without a look at each character
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def judge(raw_name: bytes, kind: Kind) -> tuple[Verdict, str, str]:
    """The reading rule for one entry: (verdict, code, message) (the last two on REFUSE)."""
    if raw_name.startswith(b"."):
        return Verdict.SKIP, "", ""
    if not name_is_clean(raw_name):
        return (Verdict.REFUSE, "file-name", "the name is not UTF-8 or holds a control "
                "character; rename it")
    if kind in _REFUSALS:
        return Verdict.REFUSE, *_REFUSALS[kind]
    if kind is Kind.DIR:
        return Verdict.WALK, "", ""
    name = raw_name.decode("utf-8")
    if name.endswith(PIPELINE_SUFFIXES):
        return Verdict.READ, "", ""
    lower = name.lower()
    if lower.endswith(PIPELINE_SUFFIXES):
        fixed = name[:len(name) - len(lower.rpartition(".")[2])] + lower.rpartition(".")[2]
        return (Verdict.REFUSE, "file-extension", f"the extension must be lower-case .yaml or "
                f".yml, or the file is not read; rename it to {fixed}")
    return Verdict.SKIP, "", ""


def _join(base: str, *parts: str) -> str:
    """A display path: `base` as the user gave it, then the parts (as os.walk + pathlib did)."""
    rest = "/".join(parts)
    if base in ("", "."):
        return rest
    return base.rstrip("/") + "/" + rest if rest else base


# --- a directory on disk ----------------------------------------------------------------

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _why(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if exc.errno != errno.EACCES else \
        "permission denied"


def check_directory_argument(directory: str | Path) -> None:
    """The folder given on the command line: it may be a link (the user chose it), but it
    must lead to a readable directory. Raises SourceError with one clear line."""
    where = os.fspath(directory)
    try:
        st = os.stat(where)
    except FileNotFoundError:
        if os.path.islink(where):
            raise SourceError(f"{where}: a symbolic link to a path that does not exist"
                              ) from None
        raise SourceError(f"{where}: no such directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(f"{where}: a symbolic link that loops back on itself") from None
        raise SourceError(f"{where}: cannot read: {_why(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{where}: not a directory")


def read_directory(directory: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES
                   ) -> list[SourceFile]:
    """The pipeline files under `directory`, by the reading rule (module docstring)."""
    check_directory_argument(directory)
    root = str(Path(directory))
    out: list[SourceFile] = []
    _walk(root, root, out, max_file_bytes)
    return sorted(out, key=lambda f: f.path)


def _kind_of(entry: os.DirEntry[str]) -> Kind:
    if entry.is_symlink():
        return Kind.SYMLINK
    if entry.is_dir(follow_symlinks=False):
        return (Kind.SUBMODULE if os.path.lexists(os.path.join(entry.path, ".git"))
                else Kind.DIR)
    if entry.is_file(follow_symlinks=False):
        return Kind.FILE
    return Kind.SPECIAL


def _walk(path: str, shown: str, out: list[SourceFile], max_file_bytes: int) -> None:
    try:
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"{shown}: cannot read this folder: {_why(exc)}") from None
    for entry in entries:
        raw = os.fsencode(entry.name)
        display = _join(shown, shown_name(raw))
        try:
            kind = _kind_of(entry)
        except OSError as exc:
            raise SourceError(f"{display}: cannot read: {_why(exc)}") from None
        verdict, code, message = judge(raw, kind)
        if verdict is Verdict.REFUSE:
            out.append(SourceFile.refused(display, message, code))
        elif verdict is Verdict.WALK:
            _walk(entry.path, display, out, max_file_bytes)
        elif verdict is Verdict.READ:
            out.append(_read_file(entry.path, display, max_file_bytes))


def _read_file(path: str, display: str, max_file_bytes: int) -> SourceFile:
    # O_NOFOLLOW and O_NONBLOCK: an entry swapped for a link or a FIFO after the listing
    # is refused instead of followed, and never blocks the read.
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return SourceFile.refused(display, *reversed(_REFUSALS[Kind.SYMLINK]))
        raise SourceError(f"{display}: cannot read: {_why(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return SourceFile.refused(display, *reversed(_REFUSALS[Kind.SPECIAL]))
        if st.st_size > max_file_bytes:
            return SourceFile(display, b"", st.st_size)
        chunks, left = [], max_file_bytes + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_file_bytes:  # it grew since fstat
            return SourceFile(display, b"", max(len(data), os.fstat(fd).st_size))
        return SourceFile(display, data)
    except OSError as exc:
        raise SourceError(f"{display}: cannot read: {_why(exc)}") from None
    finally:
        os.close(fd)


# --- git ------------------------------------------------------------------------------

def open_repo(repo_path: str | Path) -> Any:  # -> git.Repo
    import git

    try:
        return git.Repo(repo_path, search_parent_directories=True)
    except (git.NoSuchPathError, git.InvalidGitRepositoryError):
        raise SourceError(f"{redact(str(repo_path))}: not a git repository") from None
    except (OSError, git.GitError) as exc:
        raise SourceError(f"{redact(str(repo_path))}: cannot open the repository: "
                          f"{redact(str(exc)).splitlines()[0]}") from None


def ownership_refusal(where: str | Path, stderr: str) -> SourceError | None:
    """git's "dubious ownership" refusal (the repository belongs to another user, e.g. a
    read-only mount in a container) as one clear error; None for any other failure."""
    if "dubious ownership" not in stderr:
        return None
    shown = redact(str(where))
    try:
        owner = f"uid {os.stat(where).st_uid}"
    except OSError:
        owner = "another user"
    return SourceError(
        f"{shown}: git refuses to read this repository: it is owned by {owner}, not by this "
        f"user (uid {os.getuid()}) (git: dubious ownership). Trust it: `git config --system "
        f"--add safe.directory {shown}` (the reconciler image trusts every path), or "
        f"GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0={shown}")


def _discovery_refusal(repo: Any, where: str | Path) -> SourceError | None:
    """Whether git, finding the repository from `where` as gitpython's own processes do
    (no --git-dir: the ownership check applies only then), refuses it."""
    try:
        proc = subprocess.run([_git_command(repo)[0][0], "rev-parse", "--git-dir"], cwd=where,
                              check=False,
                              capture_output=True, timeout=GIT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ownership_refusal(where, proc.stderr.decode(errors="replace"))


def resolve_commit(repo: Any, rev: str) -> Any:  # -> git.Commit
    import git

    try:
        return repo.commit(rev)
    except git.GitCommandError as exc:
        where = repo.working_dir or repo.git_dir
        refused = ownership_refusal(where, str(exc.stderr or ""))
        if refused is not None:
            raise refused from None
        raise SourceError(f"{rev!r} is not a commit in {where}") from None
    except (git.BadName, git.BadObject, ValueError) as exc:
        where = repo.working_dir or repo.git_dir
        # gitpython says "possible dubious ownership" in a ValueError of its own
        refused = ownership_refusal(where, str(exc))
        if refused is not None:
            raise refused from None
        raise SourceError(f"{rev!r} is not a commit in {where}") from None
    except OSError as exc:
        # gitpython's long-lived `git cat-file` exited before it read the question (git
        # refused the repository, e.g. dubious ownership): its stdin broke. Ask git once
        # more, in one process, to learn why (a refusal raises here), then read again.
        where = repo.working_dir or repo.git_dir
        refused = _discovery_refusal(repo, where)
        if refused is not None:
            raise refused from None
        sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
                   ok_codes=(0, 1)).decode().strip()
        if not sha:
            raise SourceError(f"{rev!r} is not a commit in {where}") from None
        try:
            return repo.commit(sha)
        except (OSError, ValueError, git.GitError):
            raise SourceError(f"{redact(str(where))}: cannot read commit {sha[:12]}: "
                              f"{redact(str(exc))}") from None


def merge_base(repo: Any, base: Any, head: Any) -> Any:  # -> git.Commit
    """The best common ancestor of two commits, as `git diff base...head` uses."""
    out = _git(repo, "merge-base", base.hexsha, head.hexsha, ok_codes=(0, 1)).strip()
    if not out:
        raise SourceError(f"{base.hexsha[:12]} and {head.hexsha[:12]} have no common "
                          "ancestor (unrelated histories): nothing to compare the change with")
    return resolve_commit(repo, out.decode())


def read_commit(repo_path: str | Path, rev: str, subdir: str = "pipelines", *,
                max_file_bytes: int = MAX_FILE_BYTES, allow_missing: bool = False
                ) -> tuple[str, list[SourceFile]]:
    """The commit's full sha and the pipeline files in `subdir` of its tree.

    A `subdir` missing in the commit raises PathNotFound, unless `allow_missing` (then it
    reads as no files).
    """
    repo = open_repo(repo_path)
    commit = resolve_commit(repo, rev)
    try:
        return commit.hexsha, read_tree(repo, commit, subdir, max_file_bytes=max_file_bytes)
    except PathNotFound:
        if allow_missing:
            return commit.hexsha, []
        raise


def _git_command(repo: Any) -> tuple[list[str], str]:
    """The git command line for `repo`, and the folder to run it in."""
    command = [repo.git.GIT_PYTHON_GIT_EXECUTABLE or "git", "--git-dir", str(repo.git_dir)]
    if getattr(repo, "working_tree_dir", None):
        command += ["--work-tree", str(repo.working_tree_dir)]
    return command, getattr(repo, "working_tree_dir", None) or repo.git_dir


def _git_failure(repo: Any, what: str, stderr: bytes) -> SourceError:
    text = stderr.decode(errors="replace")
    refused = ownership_refusal(getattr(repo, "working_tree_dir", None) or repo.git_dir, text)
    if refused is not None:
        return refused
    detail = text.strip().splitlines()
    return SourceError(redact(f"git {what} failed: {detail[-1] if detail else ''}").strip())


def _git(repo: Any, *args: str, stdin: bytes | None = None,
         ok_codes: tuple[int, ...] = (0,)) -> bytes:
    command, cwd = _git_command(repo)
    try:
        proc = subprocess.run([*command, *args], input=stdin, capture_output=True,
                              timeout=GIT_TIMEOUT, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"git {args[0]} failed: {exc}") from None
    if proc.returncode not in ok_codes:
        raise _git_failure(repo, args[0], proc.stderr)
    return proc.stdout


def _normal(subdir: str) -> str:
    subdir = str(PurePosixPath(subdir.replace("\\", "/"))).strip("/")
    return "" if subdir == "." else subdir


# A name judge() reads without a second look: no leading dot, printable ASCII, no
# folder, a lower-case .yaml or .yml extension.
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.-]*\.ya?ml")
_MODE_KINDS = {b"120000": Kind.SYMLINK, b"160000": Kind.SUBMODULE, b"040000": Kind.DIR}


def _entries_to_files(entries: Iterator[tuple[bytes, bytes, str, int]], shown_base: str,
                      repo: Any, max_file_bytes: int, what: str) -> list[SourceFile]:
    """Apply the rule to (mode, relative path, object id, size) entries of a tree or the
    index, then read the blobs that pass in one `git cat-file --batch`."""
    out, wanted = _apply_rule(entries, shown_base, max_file_bytes)
    return sorted([*out, *_read_blobs(repo, wanted, what)], key=lambda f: f.path)


def _apply_rule(entries: Iterator[tuple[bytes, bytes, str, int]], shown_base: str,
                max_file_bytes: int) -> tuple[list[SourceFile], list[tuple[str, str, int]]]:
    """(the entries refused or over the limit, (display path, object id, size) of each
    blob to read)."""
    out: list[SourceFile] = []
    wanted: list[tuple[str, str, int]] = []
    refused_dirs: set[str] = set()
    lead = _join(shown_base, "x")[:-1]  # what a display path starts with
    plain = _PLAIN_NAME.fullmatch
    for mode, rel, object_id, size in entries:
        if mode[:3] == b"100" and plain(rel) is not None:
            # The common case: a regular file right here, named `<id>.yaml` in plain ASCII,
            # which the rule reads (judge() says so, without looking at each part).
            display = lead + rel.decode()
            if size > max_file_bytes:
                out.append(SourceFile(display, b"", size))
            else:
                wanted.append((display, object_id, size))
            continue
        parts = rel.split(b"/")
        shown_parts: list[str] = []
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            kind = (_MODE_KINDS.get(mode, Kind.FILE) if last else Kind.DIR)
            if kind is Kind.FILE and not mode.startswith(b"100"):
                kind = Kind.SPECIAL
            shown_parts.append(shown_name(part))
            display = _join(shown_base, *shown_parts)
            verdict, code, message = judge(part, kind)
            if verdict is Verdict.SKIP:
                break
            if verdict is Verdict.REFUSE:
                if display not in refused_dirs:  # a folder is named once, not per file
                    refused_dirs.add(display)
                    out.append(SourceFile.refused(display, message, code))
                break
            if verdict is Verdict.READ:
                if size > max_file_bytes:
                    out.append(SourceFile(display, b"", size))
                else:
                    wanted.append((display, object_id, size))
    return out, wanted


_CHUNK = 1 << 20


def _read_blobs(repo: Any, wanted: list[tuple[str, str, int]], what: str
                ) -> Iterator[SourceFile]:
    """The blobs `wanted` names, in that order, from one `git cat-file --batch`, each as
    soon as git has written it: the caller checks one file while git reads the next (a
    second core works instead of waiting). git's input is written, and its errors read,
    by a helper thread; a git that has not finished after GIT_TIMEOUT is killed."""
    if not wanted:
        return
    command, cwd = _git_command(repo)
    try:
        proc = subprocess.Popen([*command, "cat-file", "--batch", "--buffer"], cwd=cwd,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise SourceError(f"git cat-file failed: {exc}") from None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None
    assert stdout is not None
    assert stderr is not None
    out_fd = stdout.fileno()
    errors: list[bytes] = []
    timed_out: list[bool] = []

    def feed() -> None:
        try:
            stdin.write("".join(f"{sha}\n" for _, sha, _ in wanted).encode())
            stdin.close()
        except OSError:
            pass  # git stopped reading: its exit code and stderr say why
        errors.append(stderr.read())

    def stop() -> None:
        timed_out.append(True)
        proc.kill()

    feeder = threading.Thread(target=feed, name="git-cat-file-input", daemon=True)
    watchdog = threading.Timer(GIT_TIMEOUT, stop)
    feeder.start()
    watchdog.start()
    finished = False
    try:
        data, at = b"", 0
        for display, sha, size in wanted:
            header_end = data.find(b"\n", at)
            end = header_end + 1 + size  # the content, then a newline
            while header_end < 0 or len(data) <= end:
                if header_end >= 0 and data[at:header_end] != f"{sha} blob {size}".encode():
                    break  # not this blob (missing?): refused below, without waiting
                chunk = os.read(out_fd, _CHUNK)  # what git has written, up to a chunk
                if not chunk:
                    break
                data, at = data[at:] + chunk, 0
                header_end = data.find(b"\n")
                end = header_end + 1 + size
            if header_end < 0:
                break  # git ended early: its exit code and stderr say why
            if data[at:header_end] != f"{sha} blob {size}".encode():
                raise SourceError(f"git cat-file answered {data[at:header_end][:80]!r} for "
                                  f"{display} in {what}")
            if len(data) <= end:
                break
            yield SourceFile(display, data[header_end + 1:end])
            at = end + 1
        else:
            finished = True
    finally:
        if not finished:
            proc.kill()
        stdout.close()
        returncode = proc.wait()
        watchdog.cancel()
        feeder.join()
    if timed_out:
        raise SourceError(f"git cat-file failed: no answer within {GIT_TIMEOUT} s")
    if returncode != 0:
        raise _git_failure(repo, "cat-file", b"".join(errors))
    if not finished:
        raise SourceError(f"git cat-file ended before it answered for every file in {what}")


def read_tree(repo: Any, commit: Any, subdir: str = "pipelines", *,
              max_file_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    """The pipeline files in `subdir` of the commit's tree, by the reading rule.

    One `git ls-tree` and one `git cat-file --batch` read them all (gitpython asks for
    one blob at a time: 1.2 s of a 2 s budget at 10,000 files). Raises PathNotFound when
    `subdir` is not in the commit.
    """
    return sorted(open_tree(repo, commit, subdir, max_file_bytes=max_file_bytes),
                  key=lambda f: f.path)


def open_tree(repo: Any, commit: Any, subdir: str = "pipelines", *,
              max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[SourceFile]:
    """read_tree's files as they come, in no particular order (check_files sorts them):
    the tree is listed at once (PathNotFound and every refusal are raised or known
    here), then the blobs are read while the caller consumes them. A SourceError of git's
    can still come while iterating."""
    subdir = _normal(subdir)
    short = commit.hexsha[:12]
    if subdir:
        listing = _git(repo, "ls-tree", "-z", "--full-tree", commit.hexsha, "--", subdir)
        entry = listing.rstrip(b"\0")
        if not entry:
            raise PathNotFound(f"{subdir} is not in commit {short}")
        mode = entry.split(b" ", 1)[0]
        if mode == b"120000":
            raise SourceError(f"{subdir} is a symbolic link in commit {short}; links are never "
                              "followed")
        if mode != b"040000":
            raise SourceError(f"{subdir} is not a directory in commit {short}")
        tree = entry.split(b"\t", 1)[0].split()[2].decode()
    else:
        tree = commit.hexsha + "^{tree}"
    listing = _git(repo, "ls-tree", "-r", "-z", "--long", tree)

    def entries() -> Iterator[tuple[bytes, bytes, str, int]]:
        for item in listing.split(b"\0"):
            if not item:
                continue
            meta, _, rel = item.partition(b"\t")
            mode, _kind, object_id, object_size = meta.split()
            yield mode, rel, object_id.decode(), int(object_size) if object_size.isdigit() else 0

    out, wanted = _apply_rule(entries(), subdir, max_file_bytes)
    return _then_blobs(out, repo, wanted, f"commit {short}")


def _then_blobs(known: list[SourceFile], repo: Any, wanted: list[tuple[str, str, int]],
                what: str) -> Iterator[SourceFile]:
    yield from known
    yield from _read_blobs(repo, wanted, what)  # close() reaches it: git is stopped


def read_index(directory: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES
               ) -> list[SourceFile]:
    """The pipeline files under `directory` as staged in the git index (what the next
    commit will hold), by the reading rule; paths are shown as for read_directory."""
    shown = str(Path(directory))
    repo = open_repo(directory if os.path.isdir(directory) else os.getcwd())
    if not repo.working_tree_dir:
        raise SourceError(f"{shown}: a bare repository has no index")
    top = Path(repo.working_tree_dir).resolve()
    try:
        prefix = Path(os.path.abspath(directory)).resolve().relative_to(top).as_posix()
    except ValueError:
        raise SourceError(f"{shown}: not inside the repository at {top}") from None
    prefix = "" if prefix == "." else prefix
    under = os.fsencode(prefix) + b"/" if prefix else b""
    listing = _git(repo, "ls-files", "--stage", "-z", "--full-name")
    rows = []
    unmerged: set[bytes] = set()
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, _, path = item.partition(b"\t")
        if not path.startswith(under):
            continue
        mode, object_id, stage = meta.split()
        rel = path[len(under):]
        if stage != b"0":
            unmerged.add(rel)
            continue
        rows.append((mode, rel, object_id.decode()))
    if not rows and not unmerged and not os.path.isdir(directory):
        # a typo: nothing staged under it and no such folder (an empty folder is valid)
        raise PathNotFound(f"{shown}: no such directory, in the index or the working tree")
    sizes: dict[str, int] = {}
    blobs = [sha for mode, _, sha in rows if mode.startswith(b"100")]
    if blobs:
        check = _git(repo, "cat-file", "--batch-check",
                     stdin=b"".join(sha.encode() + b"\n" for sha in blobs))
        for line in check.splitlines():
            sha, _kind, size = line.decode().split()
            sizes[sha] = int(size)
    out = [SourceFile.refused(_join(shown, shown_name(rel)), "an unresolved merge conflict: "
                              "resolve it and stage the file", "unmerged")
           for rel in sorted(unmerged)]
    out += _entries_to_files(((mode, rel, sha, sizes.get(sha, 0)) for mode, rel, sha in rows),
                             shown, repo, max_file_bytes, "the index")
    return sorted(out, key=lambda f: f.path)


# --- the deployments folder beside the pipelines (issue 18) ------------------------------
# Read from the same source as the pipelines, by the same rule; a folder that is not there
# means "no deployments declared" (every repository before them), never an error.


def read_directory_deployments(pipelines_dir: str | Path, *,
                               max_file_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    """The deployment files beside the pipeline folder `pipelines_dir` (working tree)."""
    where = deployments_dir(os.fspath(pipelines_dir))
    if where is None or not os.path.lexists(where):
        return []
    if os.path.islink(where):
        raise SourceError(f"{where}: a symbolic link; links are never followed")
    return read_directory(where, max_file_bytes=max_file_bytes)


def read_index_deployments(pipelines_dir: str | Path, *,
                           max_file_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    """The deployment files beside `pipelines_dir` as staged in the git index."""
    where = deployments_dir(os.fspath(pipelines_dir))
    if where is None:
        return []
    try:
        return read_index(where, max_file_bytes=max_file_bytes)
    except PathNotFound:
        return []


def read_tree_deployments(repo: Any, commit: Any, subdir: str = "pipelines", *,
                          max_file_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    """The deployment files beside `subdir` in the commit's tree."""
    where = deployments_dir(subdir)
    if where is None:
        return []
    try:
        return read_tree(repo, commit, where, max_file_bytes=max_file_bytes)
    except PathNotFound:
        return []
