"""The main job, `make playground` (scripts/playground.py), as a user runs it: a real etcd,
a real `airflow standalone` on SQLite and the reconciler in the foreground. It starts,
syncs git HEAD before Airflow runs anything, drives the example graph (the root's very
first scheduled run fans out to 02-05, then 06 and 07, through the reconciler, one write
at a time), listens on loopback only (no log server of Airflow's on every interface, yet
task logs are readable through the API), and Ctrl-C stops everything it started."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings
from reconciler.core.state import run_id_for
from tests.e2e.conftest import REPO, eventually

BANNER_END = "Ctrl-C stops everything."
ROOT = "01_pipeline_init"
DOWNSTREAM = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline", "06_pipeline",
              "07_pipeline"]
LOOPBACK = ("127.", "::1", "::ffff:127.")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def listeners(pid: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of every TCP socket listening in the process tree of
    `pid` (what `ss -ltnp` shows for those processes)."""
    found = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:3]) or proc.name()
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # ended meanwhile (a task runner)
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def task_log(airflow_url: str, user: str, password: str, dag_id: str, run_id: str,
             task_id: str) -> Any:
    """The REST API's answer for a task's log (what the UI shows)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    login = urllib.request.Request(
        f"{airflow_url}/auth/token", method="POST",
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"})
    with opener.open(login, timeout=10) as answer:
        token = json.loads(answer.read())["access_token"]
    run = urllib.parse.quote(run_id, safe="")
    request = urllib.request.Request(
        f"{airflow_url}/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/logs/1",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    with opener.open(request, timeout=30) as answer:
        return json.loads(answer.read())


def task_log_v1(airflow_url: str, user: str, password: str, dag_id: str, run_id: str,
                task_id: str) -> str:
    """Airflow 2's REST API v1 answer for a task's log (basic auth), as text."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    run = urllib.parse.quote(run_id, safe="")
    request = urllib.request.Request(
        f"{airflow_url}/api/v1/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/logs/1",
        headers={"Accept": "application/json"})
    basic = f"{user}:{password}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(basic).decode())
    with opener.open(request, timeout=30) as answer:
        return str(json.loads(answer.read())["content"])


@pytest.mark.parametrize("major", [3, 2], ids=["airflow3", "airflow2"])
def test_the_playground_starts_runs_the_example_graph_and_stops_everything(
        tmp_path: Path, major: int) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECONCILER_") and k != "EXAMPLE_ROOT_SCHEDULE"}
    # The root as shipped (every minute): its very first run is the cycle a newcomer sees.
    env.update(PLAYGROUND_DIR=str(tmp_path / "playground"), PYTHONUNBUFFERED="1")
    if major == 2:
        # One task at a time there: hourly, so the test waits for one cycle, not several
        # (the 5-minute default is tests/unit/test_playground_schedule.py's).
        env["EXAMPLE_ROOT_SCHEDULE"] = "0 * * * *"
    log_path = tmp_path / "playground.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "playground.py"),
                                 "--airflow", str(major)],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def output() -> str:
        return log_path.read_text(errors="replace")

    ports: list[int] = []
    try:
        eventually(lambda: BANNER_END in output() or proc.poll() is not None, timeout=540,
                   what="the playground's banner")
        text = output()
        assert proc.poll() is None, text
        ui = re.search(r"Airflow UI\s+(http://127\.0\.0\.1:(\d+))\s+user (\S+)\s+password (\S+)",
                       text)
        etcd = re.search(r"etcd\s+127\.0\.0\.1:(\d+)", text)
        metrics = re.search(r"metrics\s+(http://127\.0\.0\.1:(\d+))/metrics", text)
        assert ui, text
        assert etcd, text
        assert metrics, text
        ports = [int(ui.group(2)), int(etcd.group(1)), int(metrics.group(2))]
        assert "sync refused" not in text

        eventually(lambda: ready(metrics.group(1) + "/readyz"), timeout=60,
                   what="the reconciler's /readyz")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        with EtcdStore(EtcdSettings(endpoints=(f"127.0.0.1:{etcd.group(1)}",))) as store:
            record, _ = store.read_head()
            assert record is not None
            assert record.commit == head  # git HEAD, synced by the playground

        # the graph was synced before Airflow started, so before any root run
        assert text.index("syncing pipelines/") < text.index("starting airflow"), text

        assert ("runs on '0 * * * *'" if major == 2 else "runs every minute") in text
        client = AirflowV1Client if major == 2 else AirflowClient
        api = client(AirflowSettings(url=ui.group(1), username=ui.group(3),
                                     password=ui.group(4), timeout=15))

        def root_runs() -> list[dict[str, Any]]:
            return sorted((r for r in api.list_runs([ROOT]) if r.get("logical_date")),
                          key=lambda r: r["logical_date"])

        # The first cycle is not sat out: none of 02-07 is "not in cycle ... added to the
        # graph after this cycle opened" (as when the root ran before the sync). Polled
        # every few seconds: Airflow on SQLite has one API worker for the tasks too.
        first = eventually(lambda: (root_runs() or [None])[0], timeout=150, every=3,
                           what="the root's first scheduled run")
        first_cycle = datetime.fromisoformat(first["logical_date"])
        with EtcdStore(EtcdSettings(endpoints=(f"127.0.0.1:{etcd.group(1)}",))) as store:

            def first_cycle_states() -> dict[str, str] | None:
                seen = {v["dag_id"]: v["state"] for v in store.read_observed().values()
                        if isinstance(v, dict) and v.get("cycle")
                        and datetime.fromisoformat(v["cycle"]) == first_cycle}
                return seen if set(DOWNSTREAM) <= set(seen) else None

            states = eventually(first_cycle_states, timeout=150, every=3,
                                what=f"the statuses of the first cycle {first_cycle}")
        assert "not_in_cycle" not in states.values(), states

        # The first cycle whose root run succeeded (on a loaded machine a task can miss
        # Airflow's own API deadline) runs 02-05, then 06 and 07, once each.
        ok = eventually(lambda: next((r for r in root_runs() if r["state"] == "success"),
                                     None), timeout=300, every=3, what="a root run succeeding")
        cycle = datetime.fromisoformat(ok["logical_date"])
        ours = run_id_for(cycle)

        def chain_ran() -> bool:
            runs = [r for r in api.list_runs(DOWNSTREAM) if r["dag_run_id"] == ours]
            return ({r["dag_id"] for r in runs if r["state"] == "success"} == set(DOWNSTREAM))

        eventually(chain_ran, timeout=900 if major == 2 else 420, every=3,
                   what=f"02-07 run by the reconciler for the cycle {cycle}")
        assert all(len([r for r in api.list_runs([d]) if r["dag_run_id"] == ours]) == 1
                   for d in DOWNSTREAM)  # once each

        # Loopback only, every process of the playground (etcd, each Airflow component,
        # the reconciler); the expected listeners are there, so the listing does look.
        sockets = listeners(proc.pid)
        exposed = [s for s in sockets if not s[1].startswith(LOOPBACK)]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert set(ports) <= {port for _, _, port in sockets}, sockets

        # Task logs stay readable without the log servers: the API server reads the file.
        home = tmp_path / "playground" / ("airflow2" if major == 2 else "airflow")
        (log_file,) = home.glob(f"logs/dag_id={ROOT}/run_id={ok['dag_run_id']}/"
                                "task_id=extract/attempt=1.log")
        if major == 2:
            # Airflow 2's webserver reads the task's local file (text log lines).
            content = task_log_v1(ui.group(1), ui.group(3), ui.group(4), ROOT,
                                  ok["dag_run_id"], "extract")
            assert "Could not read served logs" not in content, content
            assert "Running <TaskInstance: 01_pipeline_init.extract" in content, content
        else:
            written = {json.loads(line).get("event") for line in log_file.read_text().splitlines()
                       if line.startswith("{")}
            answer = task_log(ui.group(1), ui.group(3), ui.group(4), ROOT, ok["dag_run_id"],
                              "extract")
            served = {c.get("event") for c in answer["content"] if isinstance(c, dict)}
            assert str(log_file) in served, answer  # its source: the file, not a log server
            assert written, log_file  # the playground logs tasks at INFO
            assert written <= served, answer
            assert "Could not read served logs" not in json.dumps(answer), answer
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError(f"the playground did not stop on Ctrl-C\n{output()}") from None
    assert code == 0, output()
    text = output()
    assert "stopping airflow" in text
    assert "stopping etcd" in text
    for port in ports:
        assert not listening(port), f"port {port} still open after Ctrl-C\n{text}"
