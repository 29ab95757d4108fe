"""Start and stop a real `airflow standalone` (Airflow 3, or 2 with `major=2`; its own venv)
on loopback.

Used by the end-to-end fixture (tests/fixtures/airflow.py), the latency benchmark and the
playground. It imports nothing from the reconciler and only the standard library, so it
runs from any Python. Airflow pins many packages, so it lives in its own venv
(`make airflow-venv`; default `.venv-airflow` in the repository, or $AIRFLOW_VENV).

What it sets up, and why:
- AIRFLOW_HOME in the given directory, SQLite (standalone's default), DAGs from
  examples/dags, plugins from examples/plugins, no Airflow example DAGs.
- The metadata database: `database_url` (the test tier and the benchmarks pass a
  PostgreSQL of scripts/postgres_env.py), else SQLite in WAL mode with a 20 s lock wait
  (the playground): with SQLite's default rollback journal and 5 s wait a busy machine
  makes the scheduler die of "database is locked"; in WAL mode readers never block the
  one writer.
- The API server on 127.0.0.1:<port> only (standalone binds 0.0.0.0 otherwise), and
  `[core] execution_api_server_url` pointing at that same port: without it every task
  fails, because task processes report to http://localhost:8080/execution/ by default.
- Known users of the simple auth manager, with passwords it chose, written to the file
  `[core] simple_auth_manager_passwords_file` names (so nothing has to be read back from
  `simple_auth_manager_passwords.json.generated`): `admin` (role admin), `reconciler`
  (role user: the least the reconciler needs) and `viewer` (role viewer: read-only).
- A fixed JWT secret per start (`jwt_secret`), so tests can tell tokens apart.
- A fast dag-processor and scheduler: this is a test bench, not a deployment.
- No log servers: the scheduler and the triggerer would each start one (`airflow
  serve-logs`, ports 8793 and 8794) on every interface, hard-coded in Airflow. standalone
  starts its components as `airflow <name>` from PATH, so a small `airflow` in
  $AIRFLOW_HOME/bin, first on PATH, adds `--skip-serve-logs` to those two and runs the
  venv's own. On one machine with a local executor the API server reads the task log
  files directly, so logs stay readable in the UI and the REST API.
- Its own process group (`start_new_session`), stopped as a whole by `stop()`.

Airflow 2 (`major=2`, its own venv: `make airflow2-venv`, default `.venv-airflow2` or
$AIRFLOW2_VENV) differs where 2.x does (DESIGN section 12): the webserver on
127.0.0.1:<port> (`[webserver] web_server_host`), basic auth for the REST API v1 (`[api]
auth_backends`, session kept for the UI), the admin user standalone makes with the password
it writes to `standalone_admin_password.txt` (read back once ready), the DAG processor
inside the scheduler. Its scheduler and triggerer would start a log server on every
interface (hard-coded): a shim `airflow` first on PATH adds `--skip-serve-logs` to the
commands standalone starts by name (the webserver reads the local log files itself).

    python scripts/airflow_env.py [--port 8080] [--home .work/airflow] [--major 2]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path(os.environ.get("AIRFLOW_VENV") or REPO / ".venv-airflow")
DEFAULT_VENV2 = Path(os.environ.get("AIRFLOW2_VENV") or REPO / ".venv-airflow2")
BASIC_AUTH = "airflow.api.auth.backend.basic_auth,airflow.api.auth.backend.session"
"""Airflow 2's `[api] auth_backends` for the reconciler: basic auth (the default is
session only, which refuses every API client with 403), and the session for the UI."""
USERNAME = "admin"
ROLES = {"admin": "admin", "reconciler": "user", "viewer": "viewer"}
"""The simple auth manager's users of the bench and their roles."""

COMPONENTS = ["scheduler", "dag-processor", "api-server", "triggerer"]
"""What `airflow standalone` runs, each as `airflow <name>`, a child of its own."""
COMPONENTS2 = ["scheduler", "webserver", "triggerer"]
"""The same for Airflow 2 (its DAG processor runs inside the scheduler)."""
EXAMPLE_DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline",
                "05_pipeline", "06_pipeline", "07_pipeline"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _opener() -> urllib.request.OpenerDirector:
    # Loopback only: never through a proxy from the environment.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class AirflowProcess:
    home: Path
    port: int
    venv: Path
    dags_folder: Path
    log_path: Path
    users: dict[str, str] = field(
        default_factory=lambda: {name: secrets.token_urlsafe(12) for name in ROLES})
    """username -> password, for every user in ROLES."""
    jwt_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    extra_env: dict[str, str] = field(default_factory=dict)
    database_url: str | None = None
    """SQLAlchemy URL of the metadata database; None: SQLite in AIRFLOW_HOME."""
    major: int = 3
    """2: Airflow 2 (REST API v1, basic auth, the webserver); 3: Airflow 3."""
    process: subprocess.Popen[bytes] | None = None
    startup_seconds: float | None = None
    """From the start of `airflow standalone` to healthy with every example DAG parsed."""
    started_at: float | None = None
    """time.monotonic() when `airflow standalone` was started."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def username(self) -> str:
        return USERNAME

    @property
    def password(self) -> str:
        return self.users[USERNAME]

    @property
    def api(self) -> str:
        """The REST API's path prefix: /api/v1 on Airflow 2, /api/v2 on Airflow 3."""
        return "/api/v1" if self.major == 2 else "/api/v2"

    @property
    def health_path(self) -> str:
        return "/api/v1/health" if self.major == 2 else "/api/v2/monitor/health"

    def env(self) -> dict[str, str]:
        if self.major == 2:
            return self._env2()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                self.database_url or f"sqlite:///{self.database}?timeout=20"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.dags_folder.parent / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                f"{name}:{role}" for name, role in ROLES.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__API__WORKERS": "1",
            # Quick to notice new DAG files and queued runs: this is a test bench.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # A task reports to the API server (Execution API) with a 5 s deadline by
            # default; on a loaded machine with SQLite the first tasks after start missed
            # it and failed (httpx.ReadTimeout). Airflow's own advice: raise it under load.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW__CORE__PARALLELISM": "16",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "16",
            # as deployed (docker-compose.yml): pages as large as the reconciler asks for
            "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        # standalone starts `airflow scheduler` etc. by name: the shim (no log servers),
        # then its venv, come first on PATH.
        env["PATH"] = os.pathsep.join([str(self.shim.parent), str(self.venv / "bin"),
                                       env.get("PATH", "")])
        env.update(self.extra_env)
        return env

    def _env2(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                self.database_url or f"sqlite:///{self.database}?timeout=20"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.dags_folder.parent / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(self.port),
            "AIRFLOW__WEBSERVER__BASE_URL": self.url,
            "AIRFLOW__WEBSERVER__WORKERS": "2",
            "AIRFLOW__WEBSERVER__SECRET_KEY": self.jwt_secret,
            "AIRFLOW__WEBSERVER__WARN_DEPLOYMENT_EXPOSURE": "False",
            # a busy machine: gunicorn's master and the DAG imports get time to answer
            # (the 120 s defaults shut the webserver down under load)
            "AIRFLOW__WEBSERVER__WEB_SERVER_MASTER_TIMEOUT": "600",
            "AIRFLOW__WEBSERVER__WEB_SERVER_WORKER_TIMEOUT": "600",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__SCHEDULER__PARSING_PROCESSES": "1",
            "AIRFLOW__API__AUTH_BACKENDS": BASIC_AUTH,
            # new files are found within 5 s; a parsed file is parsed again once a minute
            # (each parse is a process of its own: every 5 s starves a small machine)
            "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            # LocalExecutor starts this many worker processes at once: few, on a laptop
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "16",
            "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        env["PATH"] = (f"{self.shim.parent}{os.pathsep}{self.venv / 'bin'}{os.pathsep}"
                       f"{env.get('PATH', '')}")
        env.update(self.extra_env)
        return env

    @property
    def shim(self) -> Path:
        """The `airflow` that standalone runs for each component (see write_shim)."""
        return self.home / "bin" / "airflow"

    def write_shim(self) -> None:
        """An `airflow` that adds --skip-serve-logs to `airflow scheduler` and `airflow
        triggerer`: their log servers bind 0.0.0.0 and [::] whatever the settings say."""
        real = shlex.quote(str(self.venv / "bin" / "airflow"))
        self.shim.parent.mkdir(parents=True, exist_ok=True)
        self.shim.write_text(
            "#!/bin/sh\n"
            "# Written by scripts/airflow_env.py: no log server on every interface.\n"
            'case "$1" in\n'
            f'  scheduler|triggerer) exec {real} "$@" --skip-serve-logs ;;\n'
            "esac\n"
            f'exec {real} "$@"\n')
        self.shim.chmod(0o755)

    @property
    def passwords_file(self) -> Path:
        return self.home / "passwords.json"

    @property
    def database(self) -> Path:
        return self.home / "airflow.db"

    def start(self) -> AirflowProcess:
        airflow = self.venv / "bin" / "airflow"
        if not airflow.exists():
            target = "airflow2-venv" if self.major == 2 else "airflow-venv"
            variable = "AIRFLOW2_VENV" if self.major == 2 else "AIRFLOW_VENV"
            raise RuntimeError(f"no Airflow at {airflow}: run `make {target}` (or set "
                               f"{variable} to the venv that has apache-airflow "
                               f"{self.major})")
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_shim()
        if self.major == 2:
            self.users = {}  # standalone makes `admin`; its password is read once ready
        else:
            # Airflow keeps a password that is already in the file and generates only the
            # missing ones, so these stay the passwords of the users.
            self.passwords_file.write_text(json.dumps(self.users))
            self.passwords_file.chmod(0o600)
        if self.database_url is None:
            # The journal mode is kept in the file: Airflow's migration fills a WAL database.
            with contextlib.closing(sqlite3.connect(self.database)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(airflow), "standalone"], env=self.env(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                timeout: float = 10.0, basic: tuple[str, str] | None = None
                ) -> tuple[int, Any]:
        """One JSON request; (status, decoded body or {}). HTTP errors are answers too.
        `token`: a bearer token (Airflow 3); `basic`: (user, password) (Airflow 2)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if basic:
            pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {pair}")
        try:
            with _opener().open(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}

    def _get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return self.request("GET", path, token=token)

    def token(self, username: str = USERNAME) -> str:
        status, body = self.request("POST", "/auth/token",
                                    {"username": username, "password": self.users[username]})
        if status != 201:
            raise RuntimeError(f"POST /auth/token for {username!r} answered {status}: {body}")
        return str(body["access_token"])

    def wait_ready(self, dag_ids: list[str], timeout: float = 240.0) -> float:
        """Until the API is healthy and every DAG in `dag_ids` is parsed; returns seconds
        since `start()`."""
        started = self.started_at if self.started_at is not None else time.monotonic()
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"airflow standalone exited ({self.process.returncode}):\n"
                                   f"{self.tail()}")
            try:
                status, health = self._get(self.health_path)
                # Airflow 2 reports a standalone DAG processor it does not run as None
                parts = {k: v.get("status") for k, v in health.items() if isinstance(v, dict)
                         and (self.major == 3 or v.get("status") is not None)}
                if status == 200 and parts and all(s == "healthy" for s in parts.values()):
                    if self.major == 2:
                        self._read_admin_password()
                        status, dags = self.request("GET", "/api/v1/dags?limit=100",
                                                    basic=(USERNAME, self.password))
                    else:
                        status, dags = self._get("/api/v2/dags?limit=100", self.token())
                    found = {d["dag_id"] for d in dags.get("dags", [])}
                    missing = sorted(set(dag_ids) - found)
                    if status == 200 and not missing:
                        self.startup_seconds = time.monotonic() - started
                        return self.startup_seconds
                    last = f"DAGs not parsed yet: {missing}"
                else:
                    last = f"health {status}: {parts or health}"
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                last = str(exc)  # not listening yet, or still starting up
            time.sleep(0.5)
        raise RuntimeError(f"Airflow not ready after {timeout:.0f} s ({last}):\n{self.tail()}")

    def _read_admin_password(self) -> None:
        file = self.home / "standalone_admin_password.txt"
        if USERNAME not in self.users:
            self.users[USERNAME] = file.read_text().strip()  # OSError: not written yet

    def stopped_components(self) -> list[str]:
        """The components standalone started that are no longer running (standalone keeps
        serving the API when, say, its scheduler dies, so runs then stay queued forever)."""
        if self.process is None or self.process.poll() is not None:
            return ["standalone"]
        running: set[str] = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")"
                ppid = int(stat.read_text().rpartition(")")[2].split()[1])
                if ppid == self.process.pid:
                    # "python .../airflow scheduler", or a title the process set itself
                    # ("airflow api_server -- host:...")
                    words = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                    running.update(words.decode(errors="replace").replace("_", "-").split())
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
        return [name for name in (COMPONENTS2 if self.major == 2 else COMPONENTS)
                if name not in running]

    def diagnosis(self) -> str:
        """What to print when a test waited in vain: dead components, health, the log."""
        try:
            status, health = self._get(self.health_path)
            parts = {k: v.get("status") for k, v in health.items() if isinstance(v, dict)}
            state = f"health {status}: {parts}"
        except (OSError, ValueError) as exc:
            state = f"health: {exc}"
        stopped = self.stopped_components()
        return (f"airflow standalone: {state}; stopped components: {stopped or 'none'}\n"
                f"--- airflow log (last 40 lines) ---\n{self.tail(40)}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group of `airflow standalone`, and nothing else."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is standalone's pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            self.process.wait()
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        # standalone's children (API server workers, dag-processor, task runners) may
        # outlive it: wait for the group to empty, then kill what is left of it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def start_airflow(home: Path, port: int | None = None, *, venv: Path | None = None,
                  dags_folder: Path = REPO / "examples" / "dags",
                  extra_env: dict[str, str] | None = None,
                  database_url: str | None = None,
                  timeout: float = 240.0, major: int = 3) -> AirflowProcess:
    """Start `airflow standalone` (Airflow `major` 3 or 2) and wait until it is healthy with
    the example DAGs parsed. On any failure the process group is stopped before the error
    is raised."""
    default = DEFAULT_VENV2 if major == 2 else DEFAULT_VENV
    home = home.resolve()  # Airflow refuses a relative SQLite path
    proc = AirflowProcess(home=home, port=port or free_port(), venv=venv or default,
                          dags_folder=dags_folder, log_path=home / "standalone.log",
                          extra_env=extra_env or {}, database_url=database_url, major=major)
    proc.start()
    try:
        proc.wait_ready(EXAMPLE_DAGS, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description="Run airflow standalone on loopback.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--home", type=Path, default=REPO / ".work" / "airflow")
    parser.add_argument("--major", type=int, choices=[2, 3], default=3)
    args = parser.parse_args()
    # SIGTERM as Ctrl-C, so that the Airflow process group is stopped either way (also
    # while starting: start_airflow stops it on any exception). A handler, not a blocked
    # mask: the children must still receive SIGTERM from stop().
    signal.signal(signal.SIGTERM, _interrupt)
    proc = start_airflow(args.home, args.port, major=args.major)
    try:
        # A local bench: the passwords are shown so that a human can log in to the UI.
        print(f"Airflow {proc.url} ready in {proc.startup_seconds:.1f} s", flush=True)
        for name, password in proc.users.items():
            role = ROLES.get(name, "admin") if proc.major == 3 else "Admin"
            print(f"  user {name:<10} role {role:<7} password {password}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
