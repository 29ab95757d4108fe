"""`reconciler sync` and `reconciler history` against a real etcd: exit codes, one-line
errors, environment variables, auth, deadlines, and two real processes racing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reconciler.adapters.store import EtcdStore
from reconciler.cli import main
from reconciler.core.settings import EtcdSettings
from tests.fixtures.etcd import EtcdFactory, EtcdServer, free_port
from tests.helpers import namespace_writes
from tests.integration.test_sync import GitRepo, pipeline, pipelines

SECRET = "Pa55-word-never-shown"


def env_for(settings: EtcdSettings) -> dict[str, str]:
    env = {"RECONCILER_ETCD_ENDPOINTS": ",".join(settings.endpoints),
           "RECONCILER_ETCD_PREFIX": settings.prefix,
           "RECONCILER_NAMESPACE": settings.namespace}
    if settings.user:
        env["RECONCILER_ETCD_USER"] = settings.user
    if settings.password:
        env["RECONCILER_ETCD_PASSWORD"] = settings.password
    return env


@dataclass
class Cli:
    settings: EtcdSettings
    repo: GitRepo

    def __call__(self, *args: str, env: Mapping[str, str | None] | None = None) -> Result:
        full_env: dict[str, str | None] = {**env_for(self.settings), "CI": None,
                                           "GITHUB_ACTIONS": None, **(env or {})}
        return CliRunner().invoke(main, list(args), env=full_env, catch_exceptions=False)

    def sync(self, *args: str, env: Mapping[str, str | None] | None = None) -> Result:
        return self("sync", "--repo", str(self.repo.path), *args, env=env)


@pytest.fixture
def cli(tmp_path: Path, etcd_settings: EtcdSettings) -> Cli:
    return Cli(etcd_settings, GitRepo(tmp_path / "repo"))


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_sync_noop_refusal_rollback_and_history(cli: Cli) -> None:
    c1 = cli.repo.commit(pipelines(("a",)))
    first = cli.sync()
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"first sync: {c1[:12]} (1 pipeline,")
    c2 = cli.repo.commit(pipelines(("b", "a")))
    ff = cli.sync("--rev", c2)
    assert ff.exit_code == 0
    assert f"fast-forward {c1[:12]} -> {c2[:12]}" in ff.stdout

    with EtcdStore(cli.settings) as store:
        revision = namespace_writes(store)
        again = cli.sync()
        assert again.exit_code == 0
        assert "already the synced head; nothing written" in again.stdout
        older = cli.sync("--rev", c1)
        assert older.exit_code == 1
        assert "not a fast-forward" in one_error_line(older)
        assert namespace_writes(store) == revision

    rollback = cli.sync("--rev", c1, "--force", "--source", "ops:rollback")
    assert rollback.exit_code == 0
    assert f"rollback {c2[:12]} -> {c1[:12]} (--force)" in rollback.stdout

    text = cli("history")
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("#3")
    assert c1[:12] in lines[0]
    assert "forced" in lines[0]
    assert "ops:rollback" in lines[0]
    assert lines[0].endswith("head")
    assert "fast-forward" in lines[1]
    assert "first" in lines[2]
    answer = json.loads(cli("history", "--output", "json").stdout)
    assert (answer["kind"], answer["namespace"]) == ("History", cli.settings.root)
    data = answer["items"]
    assert [(h["commit"], h["forced"], h["previous"]) for h in data] == [
        (c1, True, c2), (c2, False, c1), (c1, False, None)]
    assert data[1]["source"].startswith("cli:")
    limited = json.loads(cli("history", "--limit", "1", "-o", "json").stdout)
    assert [h["seq"] for h in limited["items"]] == [3]
    assert cli("history", "--format", "json").stdout == cli("history", "-o", "json").stdout


def test_sync_json_output(cli: Cli) -> None:
    c1 = cli.repo.commit(pipelines(("a",), ("b", "a")))
    result = cli.sync("--output", "json", env={"GITHUB_ACTIONS": "true",
                                                "GITHUB_REPOSITORY": "org/graph",
                                                "GITHUB_SHA": c1, "GITHUB_RUN_ID": "7"})
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert (data["kind"], data["status"], data["reason"], data["commit"], data["pipelines"]) == (
        "SyncResult", "synced", "first", c1, 2)
    assert data["head"]["source"] == f"github:org/graph@{c1[:12]} run 7"
    assert data["blob_bytes"] > 0
    noop = json.loads(cli.sync("--output", "json", env={"CI": "true"}).stdout)
    assert (noop["status"], noop["head"]["source"]) == ("noop", data["head"]["source"])


def test_an_invalid_commit_prints_every_problem_and_writes_nothing(cli: Cli) -> None:
    cli.repo.commit({"pipelines/a.yaml": pipeline("a", "nope"),
                     "pipelines/b.yaml": "dag_id: c\nowner: t\n"})
    result = cli.sync()
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "pipelines/a.yaml:3:14: depends_on names 'nope', but no pipeline file defines it",
        "pipelines/b.yaml:1:9: dag_id 'c' does not match the file name 'b'; rename one of them",
    ]
    assert "2 problem(s); nothing written" in one_error_line(result)
    with EtcdStore(cli.settings) as store:
        assert store.get_prefix(store.root) == []


def test_the_working_tree_is_never_synced(cli: Cli) -> None:
    cli.repo.commit(pipelines(("a",)))
    cli.repo.write({"pipelines/dirty.yaml": "dag_id: [broken\n"})
    assert cli.sync().exit_code == 0  # the broken file is not committed: not even read
    history = json.loads(cli("history", "--output", "json").stdout)["items"]
    with EtcdStore(cli.settings) as store:
        graph = store.read_graph(history[0]["commit"])
    assert graph is not None
    assert list(graph.pipelines) == ["a"]


def test_environment_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    cli.repo.commit(pipelines(("a",)))
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    assert "not a git repository" in one_error_line(result := cli("sync", "--repo",
                                                                 str(not_a_repo)))
    assert result.exit_code == 2
    bad_rev = cli.sync("--rev", "no-such-branch")
    assert bad_rev.exit_code == 2
    assert "is not a commit" in one_error_line(bad_rev)
    bad_endpoint = cli.sync(env={"RECONCILER_ETCD_ENDPOINTS": "no-port"})
    assert bad_endpoint.exit_code == 2
    assert "is not host:port" in bad_endpoint.stderr


def test_an_empty_graph_or_a_missing_path_is_refused_and_nothing_written(cli: Cli) -> None:
    cli.repo.commit({"README.md": "pipelines come later\n"})
    missing = cli.sync()
    assert missing.exit_code == 1
    assert "pipelines is not in commit" in one_error_line(missing)
    assert "--allow-empty" in missing.stderr
    cli.repo.commit({"pipelines/README.md": "soon\n"})
    empty = cli.sync("--output", "json")
    assert empty.exit_code == 1
    assert (json.loads(empty.stdout)["reason"]) == "empty"
    with EtcdStore(cli.settings) as store:
        assert store.get_prefix(store.root) == []
    allowed = cli.sync("--allow-empty")
    assert allowed.exit_code == 0, allowed.output
    assert "(0 pipelines," in allowed.stdout
    # The environment variable works as the flag does.
    cli.repo.commit({"pipelines/x.txt": "still none\n"})
    assert cli.sync(env={"RECONCILER_SYNC_ALLOW_EMPTY": "1"}).exit_code == 0


def test_durations_and_environment_variables_of_the_options(cli: Cli) -> None:
    c1 = cli.repo.commit(pipelines(("a",)))
    for timeout in ("5", "5s", "0.5m", "2.5"):
        # parsed, and etcd answered: nothing is synced yet (exit 1, not a usage error)
        answer = cli("history", "--etcd-timeout", timeout)
        assert answer.exit_code == 1, timeout
        assert "nothing synced yet" in answer.stderr
    bad = cli("history", "--etcd-timeout", "soon")
    assert bad.exit_code == 2
    assert "'soon' is not a duration" in bad.stderr
    assert cli("history", "--etcd-timeout", "10m").exit_code == 2  # over 300 s
    synced = cli("sync", env={"RECONCILER_REPO": str(cli.repo.path),
                              "RECONCILER_SYNC_OUTPUT": "json",
                              "RECONCILER_ETCD_TIMEOUT": "3s"})
    assert synced.exit_code == 0, synced.output
    assert json.loads(synced.stdout)["commit"] == c1


def test_password_files_that_cannot_be_a_password_are_one_line_exit_2(
        cli: Cli, tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + SECRET.encode("utf-16-le"))
    two_lines = tmp_path / "two-lines"
    two_lines.write_text(f"{SECRET}\nsecond line\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {binary: "not UTF-8 text (byte 1 of", two_lines: "holds a control character",
             empty: "the file is empty", fifo: "not a regular file",
             tmp_path: "is a directory"}
    for path, message in cases.items():
        result = cli("history", "--etcd-password-file", str(path),
                     env={"RECONCILER_ETCD_USER": "root"})
        assert result.exit_code == 2, (path, result.output)
        assert message in result.stderr, (path, result.stderr)
        assert SECRET not in result.output
        assert "Traceback" not in result.output
        assert len(result.stderr.splitlines()) <= 4  # click's usage error for a directory


def test_credentials_in_an_endpoint_are_refused_without_being_shown(cli: Cli) -> None:
    result = cli("history", env={"RECONCILER_ETCD_ENDPOINTS": f"http://root:{SECRET}@h:2379"})
    assert result.exit_code == 2
    assert SECRET not in result.output
    assert "credentials do not belong in an endpoint" in result.stderr


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


# A silent endpoint is passed only by an etcd request timeout, which gRPC turns into a
# wall-clock deadline: those cases cannot run with the clock shifted (`real_clock`).
@pytest.mark.parametrize("kind", ["refused",
                                  pytest.param("silent", marks=pytest.mark.real_clock),
                                  pytest.param("both", marks=pytest.mark.real_clock)])
def test_unreachable_etcd_exits_2_within_10_seconds_without_traceback(
        kind: str, cli: Cli, silent_endpoint: str) -> None:
    cli.repo.commit(pipelines(("a",)))
    closed = f"127.0.0.1:{free_port()}"
    endpoints = {"refused": closed, "silent": silent_endpoint,
                 "both": f"{closed},{silent_endpoint}"}[kind]
    start = time.monotonic()
    # The default timeout (5 s per request) applies: nothing here shortens it.
    proc = run_cli("sync", "--repo", str(cli.repo.path),
                   env={"RECONCILER_ETCD_ENDPOINTS": endpoints})
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert elapsed < 10.0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: etcd at {endpoints} is unreachable")


def test_sync_and_history_with_user_password_auth(tmp_path: Path,
                                                  etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(password=SECRET)
    cli = Cli(server.settings(), GitRepo(tmp_path / "repo"))
    cli.repo.commit(pipelines(("a",)))
    ok = cli.sync()
    assert ok.exit_code == 0, ok.output
    assert cli("history").exit_code == 0

    wrong = cli.sync(env={"RECONCILER_ETCD_PASSWORD": SECRET + "-wrong"})
    assert wrong.exit_code == 2
    assert "refused the credentials of user 'root'" in one_error_line(wrong)
    assert SECRET not in wrong.output

    anonymous = cli("history", env={"RECONCILER_ETCD_USER": None,
                                    "RECONCILER_ETCD_PASSWORD": None})
    assert anonymous.exit_code == 2
    assert "requires authentication" in one_error_line(anonymous)

    password_file = tmp_path / "password"
    password_file.write_text(SECRET + "\n")
    from_file = cli("history", "--etcd-password-file", str(password_file),
                    env={"RECONCILER_ETCD_PASSWORD": None})
    assert from_file.exit_code == 0
    # There is no flag for the password itself.
    assert cli("history", "--etcd-password", SECRET).exit_code == 2


def test_tls_options(tmp_path: Path, etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(tls=True)
    settings = server.settings()
    cli = Cli(settings, GitRepo(tmp_path / "repo"))
    cli.repo.commit(pipelines(("a",)))
    assert settings.ca
    assert settings.cert
    assert settings.key
    tls_env = {"RECONCILER_ETCD_CA": settings.ca, "RECONCILER_ETCD_CERT": settings.cert,
               "RECONCILER_ETCD_KEY": settings.key}
    assert cli.sync(env=tls_env).exit_code == 0
    no_client_cert = cli("history", "--etcd-ca", settings.ca, "--etcd-timeout", "2")
    assert no_client_cert.exit_code == 2
    one_error_line(no_client_cert)


RACER = """
import sys, time
import reconciler.adapters.store, reconciler.service.sync  # imported before the start, like the CLI
from reconciler.cli import main
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time() - 0.05))
while time.time() < start_at:
    pass
main(sys.argv[2:], prog_name="reconciler")
"""


def race(repo: GitRepo, settings: EtcdSettings, revs: tuple[str, str]
         ) -> list[tuple[int, dict[str, object]]]:
    """Two OS processes run `reconciler sync` for revs at the same instant."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(env_for(settings))
    start_at = time.time() + 1.0  # after both interpreters have imported everything
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(start_at), "sync", "--repo",
                               str(repo.path), "--rev", rev, "--output", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for rev in revs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr
        out.append((proc.returncode, json.loads(stdout)))
    return out


def test_two_processes_racing_leave_a_consistent_head(tmp_path: Path,
                                                      etcd_server: EtcdServer) -> None:
    repo = GitRepo(tmp_path / "repo")
    c1 = repo.commit(pipelines(("a",)))
    c2 = repo.commit(pipelines(("b", "a")))
    c3 = repo.commit(pipelines(("c", "b")))
    retried = 0
    for round_ in range(4):
        # A newer and an older commit: whoever wins, the newer one ends as the head.
        settings = etcd_server.settings()
        with EtcdStore(settings) as store:
            store_sync_first = run_cli("sync", "--repo", str(repo.path), "--rev", c1,
                                       env=env_for(settings))
            assert store_sync_first.returncode == 0
            (code2, out2), (code3, out3) = race(repo, settings, (c2, c3))
            head, _ = store.read_head()
            assert head is not None
            assert head.commit == c3, (round_, out2, out3)
            assert code3 == 0
            assert out3["status"] == "synced"
            # c2 either went first (then c3 fast-forwarded over it) or was refused as older.
            assert (code2, out2["status"]) in ((0, "synced"), (1, "refused"))
            history = store.read_history()
            assert [h.previous for h in history[:-1]] == [h.commit for h in history[1:]]
            assert not any(h.forced for h in history)
            retried += int(out2["attempts"]) + int(out3["attempts"]) - 2

        # The same commit from both: exactly one writes, the other is a no-op.
        settings = etcd_server.settings()
        with EtcdStore(settings) as store:
            results = race(repo, settings, (c2, c2))
            assert sorted(out["status"] for _, out in results) == ["noop", "synced"]
            assert [code for code, _ in results] == [0, 0]
            assert [h.commit for h in store.read_history()] == [c2]
            retried += sum(int(out["attempts"]) for _, out in results) - 2
    # How often the transaction's comparison actually caught the other process.
    print(f"re-decisions after a lost race: {retried}")
