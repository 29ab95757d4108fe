"""Start and stop a real `airflow standalone` (Airflow 3, its own venv) on loopback.

Used by the end-to-end fixtures, the latency benchmark and the playground. It imports
nothing from the reconciler. Airflow pins many packages, so it lives in its own venv
(`make airflow-venv`, default `.venv-airflow`, or $AIRFLOW_VENV).

    python scripts/airflow_env.py [--port 8080] [--home .work/airflow]   # runs until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path(os.environ.get("AIRFLOW_VENV", REPO / ".venv-airflow"))
USERNAME = "admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AirflowProcess:
    home: Path
    port: int
    venv: Path
    dags_folder: Path
    log_path: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def username(self) -> str:
        return USERNAME

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.dags_folder.parent / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            # Standalone binds 0.0.0.0 otherwise; tasks must reach the API server's own port.
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__WORKERS": "1",
            # Quick to notice new DAG files and queued runs: this is a test bench.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW__CORE__PARALLELISM": "16",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "16",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        # standalone starts `airflow scheduler` etc. by name: its venv comes first on PATH.
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def start(self) -> AirflowProcess:
        airflow = self.venv / "bin" / "airflow"
        if not airflow.exists():
            raise RuntimeError(f"no Airflow at {airflow}: run `make airflow-venv` first")
        self.home.mkdir(parents=True, exist_ok=True)
        # A known password for the simple auth manager's admin, kept by Airflow as it is.
        (self.home / "passwords.json").write_text(json.dumps({USERNAME: self.password}))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(airflow), "standalone"], env=self.env(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def _get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def token(self) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            self.url + "/auth/token", method="POST",
            data=json.dumps({"username": USERNAME, "password": self.password}).encode(),
            headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=10) as response:
            return str(json.loads(response.read())["access_token"])

    def wait_ready(self, dag_ids: list[str], timeout: float = 240.0) -> float:
        """Until the API is healthy and every DAG in `dag_ids` is parsed; returns seconds."""
        started = time.monotonic()
        deadline = started + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"airflow standalone exited:\n{self.tail()}")
            try:
                status, health = self._get("/api/v2/monitor/health")
                if status == 200 and all(
                        part.get("status") in ("healthy", None)
                        for part in health.values() if isinstance(part, dict)):
                    status, dags = self._get("/api/v2/dags?limit=1000", self.token())
                    found = {d["dag_id"] for d in dags.get("dags", [])}
                    missing = set(dag_ids) - found
                    if status == 200 and not missing:
                        return time.monotonic() - started
                    last = f"DAGs not parsed yet: {sorted(missing)}"
                else:
                    last = f"health {status}: {health}"
            except (OSError, ValueError, KeyError) as exc:
                last = str(exc)
            time.sleep(1.0)
        raise RuntimeError(f"Airflow not ready after {timeout:.0f} s ({last}):\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group of `airflow standalone`, and nothing else."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        # standalone's children (api-server workers, dag-processor) may outlive it
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


EXAMPLE_DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline",
                "05_pipeline", "06_pipeline", "07_pipeline"]


def start_airflow(home: Path, port: int | None = None, *, venv: Path = DEFAULT_VENV,
                  dags_folder: Path = REPO / "examples" / "dags",
                  extra_env: dict[str, str] | None = None,
                  timeout: float = 240.0) -> AirflowProcess:
    proc = AirflowProcess(home=home, port=port or free_port(), venv=venv,
                          dags_folder=dags_folder, log_path=home / "standalone.log",
                          extra_env=extra_env or {})
    proc.start()
    try:
        proc.wait_ready(EXAMPLE_DAGS, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description="Run airflow standalone on loopback.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--home", type=Path, default=REPO / ".work" / "airflow")
    args = parser.parse_args()
    proc = start_airflow(args.home, args.port)
    print(f"Airflow {proc.url}  user {proc.username}  password {proc.password}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        proc.stop()


if __name__ == "__main__":
    sys.exit(main())
