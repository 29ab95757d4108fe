"""A throwaway PostgreSQL server on loopback, for the Airflow of the test bench.

Why not SQLite, standalone's default: SQLite has one writer at a time. On a busy 2-core
machine Airflow's scheduler, dag-processor, triggerer and API server queue for that lock;
past the lock wait the scheduler dies of "database is locked" (standalone does not restart
it, so every later run stays queued), and a longer wait stalls the API server instead.
PostgreSQL, what Airflow is deployed on (docker-compose.yml), has no such lock.

Like scripts/airflow_env.py it uses only the standard library and the server's own
programs (Debian's `postgresql` package: /usr/lib/postgresql/<version>/bin, or $PG_BIN):
`initdb` a cluster in a temporary directory, `postgres` on 127.0.0.1:<free port> in its own
process group, trust authentication for its one role on loopback only, no fsync (a test
bench loses nothing it needs on a crash). Run as root it runs the server as the `postgres`
user (PostgreSQL refuses root), in a fresh directory of the system's temporary folder (the
folders of a root-owned test run are closed to other users); `stop()` removes it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLE = "airflow"


def find_bin() -> Path:
    """The folder with initdb and postgres: $PG_BIN, the newest Debian one, or PATH."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name)
                      if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("no PostgreSQL server programs (initdb, postgres): install Debian's "
                       "`postgresql` package (apt-get install postgresql) or set PG_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresProcess:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="reconciler-pg-")))
    port: int = field(default_factory=free_port)
    bin: Path = field(default_factory=find_bin)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy's URL of the cluster's default database, for Airflow."""
        return f"postgresql+psycopg2://{ROLE}@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def _user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def start(self, timeout: float = 60.0) -> PostgresProcess:
        data = self.root / "data"
        self.root.mkdir(parents=True, exist_ok=True)
        user = self._user()
        if user is not None:
            owner = pwd.getpwnam(user)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        done = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            user=user, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-h", "127.0.0.1", "-k", str(self.root), "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                user=user, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}):\n"
                                   f"{self.tail()}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", ROLE], capture_output=True, timeout=10)
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres not ready after {timeout:.0f} s:\n{self.tail()}")

    def create_database(self, name: str) -> str:
        """A new, empty database in this cluster (one cluster serves both Airflow majors of
        the e2e tier); its SQLAlchemy URL."""
        done = subprocess.run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE,
             name], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed ({done.returncode}): "
                               f"{done.stderr[-2000:]}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """A fast shutdown (SIGINT) of the server's process group, then SIGKILL."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresProcess:
    return PostgresProcess().start()
