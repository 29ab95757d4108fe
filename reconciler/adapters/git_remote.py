"""Pull mode's private clone of a remote repository, fetched without ever writing or showing
its credentials.

- The remote is stored without userinfo: `http://user:token@host/r.git` becomes
  `http://host/r.git` in the clone's config, in FETCH_HEAD and in every git command line.
- The credentials (from the URL, RECONCILER_GIT_TOKEN or a token file read again at each
  fetch, so a rotated token is picked up) reach git only through the environment of the
  git process: an environment-only config (GIT_CONFIG_COUNT/KEY/VALUE) names a credential
  helper, a shell function scoped to the remote's scheme://host:port, that prints them
  from two environment variables of that process. Other helpers are cleared for the
  fetch, so none of them (a `store` helper in ~/.gitconfig) can write the token to disk.
  /proc/<pid>/environ is readable by the same user only; argv (`ps`) never holds it.
- A changed URL (a moved repository, a new --repo) re-points the remote before the fetch.
- The clone is private: its folder is 0700 and git runs with umask 077 (files of an
  older clone are made private too).
- Every git command has a deadline; its whole process group is killed when it passes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from reconciler.core.errors import RetryLater
from reconciler.core.safe_text import redact

GIT_TIMEOUT = 60.0
"""Seconds one git command (a fetch, above all) may take before it is killed."""

DEFAULT_USERNAME = "x-access-token"
"""The user name sent with a token when none is given (GitHub's for tokens; GitLab and
Gitea accept any non-empty name with a personal access token)."""

MAX_TOKEN_FILE_BYTES = 64 * 1024

_USER_ENV = "RECONCILER_GIT_HELPER_USERNAME"
_PASSWORD_ENV = "RECONCILER_GIT_HELPER_PASSWORD"
# The helper: a shell function (printf is a builtin: no process gets the secret in its
# argv); it answers `get` only, so `store` and `erase` write nothing anywhere.
_HELPER = (f'!f() {{ test "$1" = get || return 0; printf "username=%s\\npassword=%s\\n" '
           f'"${_USER_ENV}" "${_PASSWORD_ENV}"; }}; f')


class RemoteUnavailable(RetryLater):
    """The remote could not be fetched (network, credentials, no such branch)."""

    dependency = "git"


@dataclass(frozen=True)
class GitCredentials:
    username: str
    password: str = field(repr=False)


_SSH_SCHEMES = ("ssh", "git+ssh", "ssh+git")


def split_url(url: str) -> tuple[str, GitCredentials | None]:
    """The URL without userinfo, and the credentials it held (percent-decoded). An ssh
    URL keeps its user name (ssh's login, not a secret) and loses only a password."""
    parts = urlsplit(url)
    if "://" not in url or parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.scheme.lower() in _SSH_SCHEMES:
        host = f"{parts.username}@{host}"
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if parts.scheme.lower() in _SSH_SCHEMES:
        return clean, None
    return clean, GitCredentials(unquote(parts.username), unquote(parts.password or ""))


def read_token_file(path: str) -> str:
    """The token in a file (one line; a final newline dropped). Raises RemoteUnavailable,
    never showing the content."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise RemoteUnavailable(f"cannot read the git token file {path}: "
                                f"{(exc.strerror or str(exc)).lower()}") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise RemoteUnavailable(f"the git token file {path} is too large for a token")
    try:
        token = raw.decode("utf-8").removeprefix("\ufeff").strip("\r\n")
    except UnicodeDecodeError:
        raise RemoteUnavailable(f"the git token file {path} is not UTF-8 text") from None
    if not token:
        raise RemoteUnavailable(f"the git token file {path} is empty")
    return token


class RemoteClone:
    """A bare clone of `url` at `workdir`, fetched branch by branch (module docstring)."""

    def __init__(self, url: str, workdir: str | Path, *, username: str | None = None,
                 token: str | None = None, token_file: str | None = None,
                 timeout: float = GIT_TIMEOUT, environ: Mapping[str, str] | None = None
                 ) -> None:
        self.url, self._url_credentials = split_url(url)
        self.shown = self.url
        """The remote as messages show it: never with credentials."""
        self.workdir = Path(workdir)
        self.username = username
        self._token = token
        self.token_file = token_file
        self.timeout = timeout
        self._environ = dict(os.environ if environ is None else environ)
        self._secrets: set[str] = {s for s in (token, self._url_password()) if s}

    def _url_password(self) -> str | None:
        return self._url_credentials.password if self._url_credentials else None

    def credentials(self) -> GitCredentials | None:
        """What the helper answers: the token (RECONCILER_GIT_TOKEN, else the token file,
        read now) or the URL's password; the user name given, else the URL's, else
        DEFAULT_USERNAME. None: no credentials (a public remote, ssh, a local path)."""
        from_url = self._url_credentials
        token = self._token
        if token is None and self.token_file:
            token = read_token_file(self.token_file)
            self._secrets.add(token)
        if token is None and from_url is None:
            return None
        if token is None:
            assert from_url is not None
            return GitCredentials(self.username or from_url.username, from_url.password)
        user = self.username or (from_url.username if from_url else None) or DEFAULT_USERNAME
        return GitCredentials(user, token)

    def redact(self, text: str) -> str:
        """`text` without this remote's credentials (git may echo the URL it was given)."""
        return redact(text, self._secrets)

    # --- git ------------------------------------------------------------------------------

    def _environment(self, credentials: GitCredentials | None) -> dict[str, str]:
        env = {k: v for k, v in self._environ.items()
               if k not in (_USER_ENV, _PASSWORD_ENV)}
        env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a human
        if "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
            env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"  # nor for a passphrase
        env.pop("GIT_DIR", None)
        if credentials is None:
            return env
        for name, value in (("username", credentials.username),
                            ("token", credentials.password)):
            if "\n" in value or "\r" in value or "\0" in value:
                raise RemoteUnavailable(f"the git {name} holds a line break; it cannot be "
                                        "a credential")
        parts = urlsplit(self.url)
        scope = f"{parts.scheme}://{parts.netloc}"
        try:
            count = int(env.get("GIT_CONFIG_COUNT", "0") or "0")
        except ValueError:
            count = 0
        # Appended after any GIT_CONFIG_* of the environment (safe.directory, say).
        for key, value in (("credential.helper", ""),  # clears every configured helper
                           (f"credential.{scope}.helper", _HELPER),
                           ("credential.interactive", "false")):
            env[f"GIT_CONFIG_KEY_{count}"] = key
            env[f"GIT_CONFIG_VALUE_{count}"] = value
            count += 1
        env["GIT_CONFIG_COUNT"] = str(count)
        env[_USER_ENV] = credentials.username
        env[_PASSWORD_ENV] = credentials.password
        return env

    def _git(self, *args: str, env: Mapping[str, str], check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        command = ["git", "--git-dir", str(self.workdir), *args]
        try:
            proc = subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, umask=0o077, start_new_session=True)
        except OSError as exc:
            raise RemoteUnavailable(f"cannot run git: {exc.strerror or exc}") from None
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # git and its helpers (git-remote-http) are one process group of their own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RemoteUnavailable(f"git {args[0]} of {self.shown}: no answer within "
                                    f"{self.timeout:g} s") from None
        result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
        if check and proc.returncode != 0:
            raise RemoteUnavailable(self.redact(
                f"git {args[0]} of {self.shown} failed: {_last_line(stderr)}"))
        return result

    def _prepare(self, env: Mapping[str, str]) -> str | None:
        """The private bare repository, its remote pointing at self.url; the old URL when
        it was re-pointed."""
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / "HEAD").exists():
            self.workdir.mkdir(mode=0o700, exist_ok=True)
            self._git("init", "--bare", "--quiet", env=env)
        _make_private(self.workdir)
        current = self._git("config", "--get", "remote.origin.url", env=env, check=False)
        old = current.stdout.strip() if current.returncode == 0 else None
        if old is None:
            self._git("remote", "add", "origin", self.url, env=env)
        elif old != self.url:
            self._git("remote", "set-url", "origin", self.url, env=env)
            return self.redact(old)  # a clone of an older version may hold userinfo
        return None

    def fetch(self, branch: str) -> str | None:
        """Fetch `branch` into refs/heads/<branch>; returns the former remote (shown
        without credentials) when a changed URL re-pointed it, else None. Raises
        RemoteUnavailable."""
        credentials = self.credentials()
        env = self._environment(credentials)
        try:
            moved = self._prepare(env)
        except OSError as exc:
            raise RemoteUnavailable(f"cannot prepare the clone at {self.workdir}: "
                                    f"{exc.strerror or exc}") from None
        self._git("fetch", "--quiet", "--no-tags", "origin",
                  f"+refs/heads/{branch}:refs/heads/{branch}", env=env)
        return moved


def _make_private(folder: Path) -> None:
    """Nobody else may read the clone: 0700 on the folder; files an older version left
    readable to others lose those bits."""
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077 == 0:
        return
    with contextlib.suppress(OSError):  # a mount point of another owner: its files still are
        folder.chmod(0o700)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
