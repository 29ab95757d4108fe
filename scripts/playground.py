"""The local playground (`make playground`): a real etcd, a real `airflow standalone` with
the example DAGs, the graph of git HEAD synced into etcd, and the reconciler in the
foreground. No Docker. Ctrl-C stops everything it started, and nothing else.

Everything lives under .work/playground/ (delete it to start afresh), or under
$PLAYGROUND_DIR when set (the end-to-end test runs it in a temporary folder).

`--airflow 2` (`make playground AIRFLOW=2`) shows the same on Airflow 2.11 (REST API v1,
basic auth; its venv is `make airflow2-venv`); the reconciler finds out by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("PLAYGROUND_DIR") or REPO / ".work" / "playground")
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from airflow_env import AirflowProcess, start_airflow  # noqa: E402


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now. Checked the way servers bind
    (etcd, uvicorn and Python's HTTP server set SO_REUSEADDR): connections of a previous
    run left in TIME_WAIT do not make a port taken, only a socket bound to it does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_or_free(preferred: int, what: str = "") -> int:
    """`preferred` if it is free, else a free port, saying so: a user who exported the
    usual address needs to know it changed."""
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    if what:
        print(f"port {preferred} for {what} is taken (another playground, or another "
              f"program listens on it): using 127.0.0.1:{port} instead", flush=True)
    return port


def start_etcd(port: int) -> subprocess.Popen[bytes]:
    etcd = shutil.which("etcd") or str(BIN / "etcd")
    peer = port_or_free(port + 1, "etcd peer port")
    data = WORK / "etcd"
    url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    log = open(WORK / "etcd.log", "ab")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(
        [etcd, "--name", "playground", "--data-dir", str(data), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", peer_url,
         "--initial-advertise-peer-urls", peer_url, "--initial-cluster",
         f"playground={peer_url}", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"etcd exited; see {WORK / 'etcd.log'}") from None
            time.sleep(0.2)
    raise SystemExit("etcd did not start in 30 s")


def stop_group(proc: subprocess.Popen[bytes] | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    print(f"stopping {name}", flush=True)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


ROOT = "01_pipeline_init"


def set_paused(airflow: AirflowProcess, dag_id: str, paused: bool) -> None:
    """Pause or unpause a DAG through Airflow's REST API (as the UI's toggle does)."""
    path = f"{airflow.api}/dags/{dag_id}"
    if airflow.major == 2:  # basic auth on API v1
        status, body = airflow.request("PATCH", path, {"is_paused": paused},
                                       basic=(airflow.username, airflow.password))
    else:
        status, body = airflow.request("PATCH", path, {"is_paused": paused}, airflow.token())
    if status != 200:
        raise RuntimeError(f"PATCH {path} answered {status}: {body}")


def default_root_schedule(major: int) -> str:
    """The root's cron: every minute, so a newcomer sees cycles coming; every 5 minutes on
    Airflow 2, whose standalone runs one task at a time (SequentialExecutor: SQLite allows
    no other), some seconds each: a cycle of the example graph (14 tasks) takes minutes
    there, and a root every minute would pile up runs without end."""
    return "*/5 * * * *" if major == 2 else "* * * * *"


def main() -> int:
    parser = argparse.ArgumentParser(description="etcd, airflow standalone and the "
                                     "reconciler on the example graph, on loopback")
    parser.add_argument("--airflow", type=int, choices=[2, 3], default=3,
                        help="the Airflow major to run (default 3)")
    major = parser.parse_args().airflow
    root_schedule = os.environ.get("EXAMPLE_ROOT_SCHEDULE") or default_root_schedule(major)
    every = {"* * * * *": "every minute", "*/5 * * * *": "every 5 minutes"}.get(
        root_schedule, f"on {root_schedule!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    etcd_port = port_or_free(2379, "etcd")
    airflow_port = port_or_free(8080, "Airflow")
    metrics_port = port_or_free(9102, "the reconciler's metrics")
    # The playground's Airflow keeps SQLite, whose API server stalls on concurrent writes:
    # the reconciler's default concurrency adapts to it (README, "An Airflow on SQLite").
    env = dict(os.environ, RECONCILER_ETCD_ENDPOINTS=f"127.0.0.1:{etcd_port}",
               RECONCILER_INTERVAL=os.environ.get("RECONCILER_INTERVAL", "2"))
    etcd = airflow = reconciler = None
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background ignores SIGINT.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"starting etcd on 127.0.0.1:{etcd_port}", flush=True)
        etcd = start_etcd(etcd_port)
        # The graph first, and the root paused until Airflow's API server answers: a cycle
        # opened before the sync is sat out by every pipeline synced after it (backfill:
        # false), and a task started before the API server listens fails. So the first
        # root run a newcomer sees fans out.
        print("syncing pipelines/ of git HEAD into etcd", flush=True)
        synced = subprocess.run([str(BIN / "reconciler"), "sync", "--repo", str(REPO),
                                 "--rev", "HEAD", "--source", "playground"], env=env)
        if synced.returncode not in (0,):
            print("sync refused; the reconciler keeps the graph etcd already holds",
                  flush=True)
        print(f"starting airflow standalone on 127.0.0.1:{airflow_port} (about 30 s)",
              flush=True)
        airflow = start_airflow(WORK / ("airflow2" if major == 2 else "airflow"),
                                airflow_port, major=major, extra_env={
            # the listener plugin (examples/plugins/) wakes the reconciler when a run or a
            # task of a graph DAG ends; it reads the reconciler's own etcd variables
            "RECONCILER_ETCD_ENDPOINTS": f"127.0.0.1:{etcd_port}",
            "RECONCILER_ETCD_PREFIX": "reconciler",
            "RECONCILER_NAMESPACE": "default",
            "EXAMPLE_ROOT_PAUSED": "true",  # created paused; unpaused below
            "EXAMPLE_ROOT_SCHEDULE": root_schedule,
            # task logs as a user expects them in the UI (the bench's default is WARNING)
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }, timeout=480)  # about 30 s; a busy machine can take minutes
        env.update(RECONCILER_AIRFLOW_URL=airflow.url,
                   RECONCILER_AIRFLOW_USERNAME=airflow.username,
                   RECONCILER_AIRFLOW_PASSWORD=airflow.password)
        print(f"""
  Airflow UI   {airflow.url}   user {airflow.username}   password {airflow.password}
  etcd         127.0.0.1:{etcd_port}
  metrics      http://127.0.0.1:{metrics_port}/metrics   (/healthz, /readyz)
  status       RECONCILER_ETCD_ENDPOINTS=127.0.0.1:{etcd_port} \\
               RECONCILER_AIRFLOW_URL={airflow.url} RECONCILER_AIRFLOW_USERNAME=admin \\
               RECONCILER_AIRFLOW_PASSWORD={airflow.password} .venv/bin/reconciler status
  01_pipeline_init runs {every}; watch 02-07 follow it. Ctrl-C stops everything.
""", flush=True)
        reconciler = subprocess.Popen(
            [str(BIN / "reconciler"), "run", "--http-port", str(metrics_port)], env=env,
            start_new_session=True)
        try:
            set_paused(airflow, ROOT, False)
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"could not unpause {ROOT} ({exc}): unpause it in the UI", flush=True)
        reconciler.wait()
        return 0 if stopping else reconciler.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup
        stop_group(reconciler, "the reconciler")
        if airflow is not None:
            print("stopping airflow", flush=True)
            # paused again, so that the next start also syncs before the root runs
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                set_paused(airflow, ROOT, True)
            airflow.stop()
        stop_group(etcd, "etcd")


if __name__ == "__main__":
    sys.exit(main())
