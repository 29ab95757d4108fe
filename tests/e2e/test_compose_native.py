"""docker-compose.yml as the source of truth, run natively (there is no Docker engine here).

The services' own commands and environment are read from the file (PyYAML, `${VAR:-x}`
defaults applied) and run as processes: the three etcd members (the real etcd binary),
`airflow-init` and `airflow-apiserver` (the real Airflow 3.3.2 of .venv-airflow), and a
reconciler replica (the Dockerfile's entrypoint, its ENV lines and its `git config
--system` line). What a container would do differently is translated, and nothing else:

- service hostnames become 127.0.0.1 and every container port a free loopback port
  (`etcd-1:2379` -> `127.0.0.1:<free>`; a service's own `0.0.0.0:<port>` -> its free port);
- mounts become folders: named volumes are temporary folders, `./x` is the repository's
  x, `/repo` is a root-owned read-only copy of an example repository, `/opt/airflow` (the
  image's AIRFLOW_HOME) a temporary folder; paths in commands and values are rewritten;
- Postgres is SQLite (no Postgres server here) and the API server binds loopback;
- the uid a service runs as: airflow-init as root (its `user: "0:0"`), the API server as
  the Airflow image's uid 50000, the reconciler as the image's 10001.

It proves: (a) the reconciler logs in with the password the API server really uses (the
shared passwords file); (b) `sync` works as uid 10001 on a root-owned read-only repository
with the image's git configuration, and without it fails with one clear line; (c)
/metrics is served on a wildcard address (RECONCILER_HTTP_HOST 0.0.0.0, what a published
port needs) and reached on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from tests.e2e.conftest import eventually
from tests.fixtures.airflow import airflow_venv
from tests.fixtures.etcd import (
    etcd_binary,
    free_port,  # never the same port twice
)
from tests.helpers import example_repo

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_UID, RECONCILER_UID = 50000, 10001
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` with VAR unset, and `$$` as a literal `$`."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def http(url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def dockerfile_image_env_and_git_config() -> tuple[dict[str, str], list[str]]:
    """The final stage's ENV values and its `git config --system ...` command."""
    text = (REPO / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", final, re.M):
        env.update(dict(pair.split("=", 1) for pair in line.split()))
    [git_line] = re.findall(r"(git config --system [^&\n]+)", final)
    return env, [part.strip("'") for part in git_line.split()]


class NativeCompose:
    """The compose file's services as local processes (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()))
        self.services: dict[str, Any] = self.file["services"]
        self.ports: dict[tuple[str, int], int] = {}
        names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
        self._hostport = re.compile(rf"\b({names}):(\d+)\b")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.mounts: dict[str, dict[str, Path]] = {}

    def port(self, service: str, container_port: int) -> int:
        return self.ports.setdefault((service, container_port), free_port())

    def volume(self, name: str) -> Path:
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mount(self, service: str, container_path: str, host: Path) -> None:
        self.mounts.setdefault(service, {})[container_path] = host

    def mount_volumes(self, service: str, special: dict[str, Path] | None = None) -> None:
        for spec in self.services[service].get("volumes", []):
            source, target = spec.split(":")[:2]
            if special and target in special:
                host = special[target]
            elif source.startswith("."):
                host = (REPO / source).resolve()
            else:
                host = self.volume(source)
            self.mount(service, target, host)

    def rewrite(self, service: str, text: str) -> str:
        text = self._hostport.sub(
            lambda m: f"127.0.0.1:{self.port(m.group(1), int(m.group(2)))}", text)
        text = re.sub(r"\b(?:0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)\b",
                      lambda m: f"127.0.0.1:{self.port(service, int(m.group(1)))}"
                      if (service, int(m.group(1))) in self.ports or m.group(0).startswith(
                          "0.0.0.0") else m.group(0), text)
        for target, host in sorted(self.mounts.get(service, {}).items(),
                                   key=lambda kv: len(kv[0]), reverse=True):
            text = re.sub(rf"(?<![\w/.-]){re.escape(target)}(?=/|\b|$)", str(host), text)
        return text

    def env(self, service: str, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "NO_PROXY": "*",
               "no_proxy": "*"}
        env.update({k: self.rewrite(service, str(v))
                    for k, v in (self.services[service].get("environment") or {}).items()})
        env.update(extra)
        return env

    def command(self, service: str) -> list[str]:
        command = self.services[service].get("command") or []
        command = [command] if isinstance(command, str) else list(command)
        entry = self.services[service].get("entrypoint")
        entry = [entry] if isinstance(entry, str) else list(entry or [])
        return [self.rewrite(service, part) for part in [*entry, *command]]

    def spawn(self, args: list[str], env: dict[str, str], log: str, uid: int | None = None,
              gid: int = 0) -> subprocess.Popen[bytes]:
        with open(self.root / f"{log}.log", "ab") as out:
            process = subprocess.Popen(as_user(uid, gid, args) if uid else args, env=env,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       cwd=self.root)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def wait_for(world: NativeCompose, check: Any, timeout: float, what: str, log: str,
             process: subprocess.Popen[bytes] | None = None) -> Any:
    """eventually(), with the service's log in the failure (read when it failed); fails at
    once when `process` exited."""
    def step() -> Any:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{log} exited with {process.returncode}")
        return check()

    try:
        return eventually(step, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- {log} log ---\n{world.log(log)}") from None


def as_user(uid: int, gid: int, args: list[str]) -> list[str]:
    """`args` run as uid:gid with no supplementary groups and no capabilities (setpriv,
    util-linux): what `USER uid:gid` in an image gives."""
    return [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}",
            "--clear-groups", *args]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture(scope="module")
def world() -> Iterator[NativeCompose]:
    root = Path(tempfile.mkdtemp(prefix="compose-native-"))
    root.chmod(0o755)  # the services' uids must reach their folders
    native = NativeCompose(root)
    try:
        yield native
    finally:
        native.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_compose_services_work_natively(world: NativeCompose) -> None:
    venv = airflow_venv()
    if not (venv / "bin" / "airflow").exists():
        pytest.fail(f"no Airflow venv at {venv}: run `make airflow-venv`", pytrace=False)

    # --- etcd: the three members as the file starts them ------------------------------
    etcd_names = [n for n in world.services if n.startswith("etcd-")]
    assert len(etcd_names) == 3
    for name in etcd_names:
        world.mount_volumes(name)
        args = world.command(name)
        assert args[0] == "etcd"
        world.spawn([etcd_binary(), *args[1:]], world.env(name), name)
    for name in etcd_names:
        url = f"http://127.0.0.1:{world.port(name, 2379)}/health"
        wait_for(world, lambda u=url: http(u)[0] == 200 and '"true"' in http(u)[1], 60,
                 f"{name} healthy", name)

    # --- airflow-init (root), then the API server (uid 50000) ---------------------------
    home = world.root / "opt-airflow"
    home.mkdir()
    db_dir = world.root / "airflow-db"  # SQLite writes beside its file (WAL)
    db_dir.mkdir()
    db = db_dir / "airflow.db"
    airflow_path = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    for name in ("airflow-init", "airflow-apiserver"):
        world.mount_volumes(name)
        world.mount(name, "/opt/airflow", home)

    def airflow_env(name: str) -> dict[str, str]:
        env = world.env(name, PATH=airflow_path, AIRFLOW_HOME=str(home),
                        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{db}?timeout=60",
                        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
                        AIRFLOW__API__WORKERS="1")
        # the image's folders, where the file mounts them
        mounts = world.mounts[name]
        env.update(AIRFLOW__CORE__DAGS_FOLDER=str(mounts["/opt/airflow/dags"]),
                   AIRFLOW__CORE__PLUGINS_FOLDER=str(mounts["/opt/airflow/plugins"]),
                   AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(mounts["/opt/airflow/logs"]))
        return env

    init = world.services["airflow-init"]
    assert init["user"] == "0:0"
    done = subprocess.run(world.command("airflow-init"), env=airflow_env("airflow-init"),
                          capture_output=True, text=True, timeout=300, cwd=world.root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    auth = world.volume("airflow-auth")
    passwords = json.loads((auth / "passwords.json").read_text())
    mine = auth / "reconciler.password"
    assert set(passwords) == {"admin", "reconciler"}
    assert (mine.stat().st_uid, mine.stat().st_mode & 0o777) == (RECONCILER_UID, 0o400)
    pw_stat = (auth / "passwords.json").stat()
    assert (pw_stat.st_uid, pw_stat.st_mode & 0o777) == (AIRFLOW_UID, 0o600)
    # test scaffolding for the SQLite stand-in: Postgres would be another server
    for folder in (home, db_dir):
        for path in (folder, *folder.rglob("*")):
            os.chown(path, AIRFLOW_UID, 0)

    api_port = world.port("airflow-apiserver", 8080)
    assert world.services["airflow-apiserver"]["command"] == "api-server"
    # USER: the image's user name (Airflow refuses a uid without one)
    apiserver = world.spawn(
        [str(venv / "bin" / "airflow"), "api-server", "--port", str(api_port),
         "--host", "127.0.0.1"],
        {**airflow_env("airflow-apiserver"), "USER": "airflow", "HOME": str(home)},
        "airflow-apiserver", uid=AIRFLOW_UID)
    api = f"http://127.0.0.1:{api_port}"
    wait_for(world, lambda: http(f"{api}/api/v2/monitor/health")[0] == 200, 180,
             "the API server", "airflow-apiserver", apiserver)

    # (a) the reconciler's file holds the password the API server checks
    assert mine.read_text() == passwords["reconciler"]
    assert http(f"{api}/auth/token", {"username": "reconciler",
                                      "password": mine.read_text()})[0] == 201
    assert http(f"{api}/auth/token", {"username": "reconciler",
                                      "password": "not-it"})[0] == 401

    # --- the reconciler (uid 10001) on a root-owned read-only repository ---------------
    repo = example_repo(world.root / "repo")
    subprocess.run(["chmod", "-R", "a-w", str(repo)], check=True)
    assert repo.stat().st_uid == 0
    user_home = world.root / "home-reconciler"
    user_home.mkdir()
    os.chown(user_home, RECONCILER_UID, RECONCILER_UID)
    image_env, git_config = dockerfile_image_env_and_git_config()
    gitconfig = world.root / "etc-gitconfig"
    # the image's `git config --system ...`, with git's system file pointed elsewhere
    subprocess.run(git_config, env={**os.environ, "GIT_CONFIG_SYSTEM": str(gitconfig)},
                   check=True)
    gitconfig.chmod(0o644)
    replica = "reconciler-a"
    world.mount_volumes(replica, special={"/repo": repo})
    world.mount(replica, "/home/reconciler", user_home)
    http_port = world.port(replica, int(world.services[replica]["environment"]
                                        ["RECONCILER_HTTP_PORT"]))
    bin_dir = Path(sys.executable).parent
    base_env = {**image_env, **world.env(replica), "HOME": str(user_home),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "RECONCILER_HTTP_PORT": str(http_port)}
    trusted = {**base_env, "GIT_CONFIG_SYSTEM": str(gitconfig)}
    assert base_env["RECONCILER_HTTP_HOST"] == "0.0.0.0"
    command = world.command(replica)
    assert command[:3] == ["run", "--repo", str(repo)]
    reconciler = world.spawn([str(bin_dir / "reconciler"), *command], trusted, replica,
                             uid=RECONCILER_UID, gid=RECONCILER_UID)

    # pull mode synced the branch as uid 10001
    etcd = EtcdSettings(endpoints=tuple(base_env["RECONCILER_ETCD_ENDPOINTS"].split(",")))

    def head() -> Any:
        with EtcdStore(etcd) as store:
            return store.read_head()[0]

    synced = wait_for(world, head, 60, "pull mode to sync", replica, reconciler)
    assert synced.source == f"pull:{repo}@main"

    # (a) ready as the leader means its passes reached Airflow with that password
    metrics_url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        status, body = http(f"{metrics_url}/readyz")
        return status == 200 and "leader" in body

    wait_for(world, ready, 60, "/readyz to say ready (leader)", replica, reconciler)
    # (c) on a wildcard address, reached through loopback (a published port's way in)
    assert "0.0.0.0" in listening_addresses(http_port)
    status, metrics = http(f"{metrics_url}/metrics")
    assert status == 200
    assert "reconciler_is_leader 1.0" in metrics
    requests_sent = re.search(r"^reconciler_airflow_requests_total (\S+)$", metrics, re.M)
    assert requests_sent is not None
    assert float(requests_sent.group(1)) >= 1
    assert "refused" not in world.log(replica)

    # (b) the one-shot `sync` as uid 10001: clear refusal without the image's git config,
    # a no-op success with it (pull mode synced this commit already)
    sync_command = [str(bin_dir / "reconciler"), "sync", "--repo", str(repo), "--rev", "HEAD"]
    refused = subprocess.run(as_user(RECONCILER_UID, RECONCILER_UID, sync_command),
                             env=base_env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "dubious ownership" in refused.stderr
    assert "safe.directory" in refused.stderr
    assert "is not a commit" not in refused.stderr
    ok = subprocess.run(as_user(RECONCILER_UID, RECONCILER_UID, sync_command), env=trusted,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert synced.commit[:12] in ok.stdout + ok.stderr
