"""Pull mode against a real git remote served over smart HTTP with basic auth
(tests/fixtures/git_http.py): the token (in the URL, RECONCILER_GIT_TOKEN or a token file)
reaches git, and never the clone's files, a git command line (argv of every git, GIT_TRACE
of its children, /proc while they run), the logs or etcd; the clone is private; a changed
--repo re-points the remote; a clone an older version left with the token in its config is
cleaned."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings, GitSettings
from reconciler.service.puller import GitUnavailable, Puller
from tests.fakes.clock import FakeClock
from tests.fixtures.git_http import GitHttpServer, GitWatch
from tests.helpers import example_repo, git

USER = "bot"


@pytest.fixture
def token() -> str:
    return "tok-" + secrets.token_hex(12)


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    example_repo(root / "origin")
    return root


@pytest.fixture
def server(served: Path, token: str) -> Iterator[GitHttpServer]:
    with GitHttpServer(served, USER, token) as s:
        yield s


@pytest.fixture
def watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GitWatch:
    w = GitWatch(tmp_path / "watch")
    for name, value in w.environment().items():
        monkeypatch.setenv(name, value)
    return w


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[EtcdStore]:
    with EtcdStore(etcd_settings) as s:
        yield s


def puller(url: str, store: EtcdStore, workdir: Path, git_settings: GitSettings | None = None
           ) -> Puller:
    return Puller(url, "main", "pipelines", store, FakeClock(), interval=30,
                  workdir=str(workdir), git=git_settings)


def head_commit(store: EtcdStore) -> str | None:
    head, _ = store.read_head()
    return head.commit if head is not None else None


def assert_private_and_clean(workdir: Path, token: str) -> None:
    """Every file of the clone: not readable by others, without the token."""
    assert stat.S_IMODE(workdir.stat().st_mode) & 0o077 == 0
    seen = 0
    for folder, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = Path(folder, name)
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o007 == 0, f"{path} is {oct(mode)}: readable by others"
            if name in files and path.is_file():
                seen += 1
                assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    assert seen > 10  # a real clone was read


def remote_url(workdir: Path) -> str:
    return git(workdir, "config", "--get", "remote.origin.url").strip()


def test_a_token_in_the_url_reaches_git_only_through_its_environment(
        server: GitHttpServer, served: Path, store: EtcdStore, tmp_path: Path, token: str,
        watch: GitWatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    workdir = tmp_path / "clone"
    p = puller(server.url("origin", userinfo=f"{USER}:{token}"), store, workdir)
    with watch.polling():
        p.tick()  # the clone
        assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
        (served / "origin" / "pipelines" / "08_pipeline.yaml").write_text(
            "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
        git(served / "origin", "add", ".")
        git(served / "origin", "commit", "-qm", "add 08")
        p.tick()  # a fetch into the existing clone
    assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
    assert p.failures == 0
    assert any(authorized for _, _, authorized in server.requests)  # the token was used
    assert remote_url(workdir) == server.url("origin")  # no userinfo
    assert_private_and_clean(workdir, token)
    assert "fetch" in watch.argv()  # git ran through the shim
    assert "remote-http" in watch.trace()  # and its children were traced
    assert watch.git_cmdlines()  # /proc showed git's command lines while it ran
    assert watch.leaks(token) == []
    assert token not in caplog.text
    assert all(token not in str(getattr(r, "fields", "")) for r in caplog.records)
    for entry in store.read_history():
        assert token not in entry.source
        assert server.url("origin") in entry.source


@pytest.mark.parametrize("source", ["environment", "file"])
def test_a_token_from_the_environment_or_a_file_and_a_rotated_one(
        server: GitHttpServer, served: Path, store: EtcdStore, tmp_path: Path, token: str,
        watch: GitWatch, caplog: pytest.LogCaptureFixture, source: str) -> None:
    caplog.set_level(logging.DEBUG)
    workdir = tmp_path / "clone"
    token_file = tmp_path / "token"
    old = "tok-" + secrets.token_hex(12)  # a token the server no longer takes

    def settings(value: str) -> GitSettings:
        if source == "file":
            token_file.write_text(value + "\n")
            return GitSettings(username=USER, token_file=str(token_file))
        return GitSettings(username=USER, token=value)

    with watch.polling():
        stale = puller(server.url("origin"), store, workdir, settings(old))
        stale.tick()
        assert stale.failures == 1
        assert head_commit(store) is None
        assert stale.last_error is not None
        assert "Authentication failed" in stale.last_error or "401" in stale.last_error
        if source == "file":
            token_file.write_text(token + "\n")  # rotated: read again at the next fetch
            fresh = stale
        else:
            fresh = puller(server.url("origin"), store, workdir, settings(token))
        fresh.tick()
    assert fresh.failures == 0, fresh.last_error
    assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
    assert_private_and_clean(workdir, token)
    assert_private_and_clean(workdir, old)
    for secret in (token, old):
        assert watch.leaks(secret) == []
        assert secret not in caplog.text
        assert all(secret not in str(getattr(r, "fields", "")) for r in caplog.records)


def test_a_changed_repo_re_points_the_remote(server: GitHttpServer, served: Path,
                                             store: EtcdStore, tmp_path: Path, token: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    moved = served / "moved"
    git(served, "clone", "-q", str(served / "origin"), str(moved))
    git(moved, "config", "user.email", "t@example.com")
    git(moved, "config", "user.name", "t")
    (moved / "pipelines" / "08_pipeline.yaml").write_text(
        "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
    git(moved, "add", ".")
    git(moved, "commit", "-qm", "only in the moved repository")
    workdir = tmp_path / "clone"
    first = puller(server.url("origin", userinfo=f"{USER}:{token}"), store, workdir)
    first.tick()
    assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
    caplog.set_level(logging.INFO)
    restarted = puller(server.url("moved", userinfo=f"{USER}:{token}"), store, workdir)
    restarted.tick()  # a restart with a new --repo, the same workdir
    assert restarted.failures == 0, restarted.last_error
    assert head_commit(store) == git(moved, "rev-parse", "HEAD")
    assert remote_url(workdir) == server.url("moved")
    assert "remote changed" in caplog.text
    assert token not in caplog.text


def test_a_clone_left_by_an_older_version_loses_the_token_and_becomes_private(
        server: GitHttpServer, served: Path, store: EtcdStore, tmp_path: Path,
        token: str) -> None:
    workdir = tmp_path / "clone"
    url = server.url("origin", userinfo=f"{USER}:{token}")
    old_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    subprocess.run(["git", "clone", "-q", "--bare", url, str(workdir)], check=True,
                   env=old_env)  # what the old code did: a clone, then fetches
    subprocess.run(["git", "--git-dir", str(workdir), "fetch", "-q", "origin",
                    "+refs/heads/main:refs/heads/main"], check=True, env=old_env)
    for folder, _, files in os.walk(workdir):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder, name), 0o644)
    assert token in (workdir / "config").read_text()
    p = puller(url, store, workdir)
    p.tick()
    assert p.failures == 0, p.last_error
    assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
    assert remote_url(workdir) == server.url("origin")
    assert_private_and_clean(workdir, token)


def test_an_unreachable_remote_names_it_without_the_token(store: EtcdStore, tmp_path: Path,
                                                          token: str) -> None:
    from tests.fixtures.etcd import free_port

    url = f"http://{USER}:{token}@127.0.0.1:{free_port()}/nothing.git"
    p = puller(url, store, tmp_path / "clone")
    with pytest.raises(GitUnavailable) as info:
        p.pull_once()
    assert token not in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_run_in_pull_mode_never_shows_the_token(server: GitHttpServer, served: Path,
                                                etcd_settings: EtcdSettings, tmp_path: Path,
                                                token: str, watch: GitWatch) -> None:
    """The whole process: `reconciler run` with RECONCILER_REPO=http://user:token@..., its
    stderr, the command line of every process while it runs (its own and git's), its
    clone."""
    from tests.fakes.fake_airflow import FakeAirflow
    from tests.integration.test_run_command import DAGS, env

    workdir = tmp_path / "clone"
    with FakeAirflow(DAGS) as fake, watch.polling():
        environ = env(etcd_settings, fake.url)  # PATH leads to the shim, GIT_TRACE set
        # The URL with its token comes from the environment, as a container sets it (a
        # flag would show it in the reconciler's own command line).
        environ["RECONCILER_REPO"] = server.url("origin", userinfo=f"{USER}:{token}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--http-port", "0",
             "--workdir", str(workdir), "--pull-interval", "1"],
            env=environ, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            with EtcdStore(etcd_settings) as store:
                while time.monotonic() < deadline and head_commit(store) is None:
                    time.sleep(0.2)
                assert head_commit(store) == git(served / "origin", "rev-parse", "HEAD")
            time.sleep(1.5)  # a second fetch
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert token not in stderr
    assert watch.leaks(token) == []
    assert watch.argv().count("fetch") >= 2
    assert_private_and_clean(workdir, token)
