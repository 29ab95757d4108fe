"""The main job, `make playground` (scripts/playground.py), as a user runs it: a real etcd,
a real `airflow standalone` on SQLite and the reconciler in the foreground. It starts,
syncs git HEAD, drives the example graph (a root run fans out to 02-05 through the
reconciler, one write at a time), and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings
from reconciler.core.state import run_id_for
from tests.e2e.conftest import REPO, eventually

BANNER_END = "Ctrl-C stops everything."
FAN_OUT = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]


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


def test_the_playground_starts_runs_the_example_graph_and_stops_everything(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    # manual roots only: the test opens the one cycle it checks
    env.update(PLAYGROUND_DIR=str(tmp_path / "playground"), EXAMPLE_ROOT_SCHEDULE="none",
               PYTHONUNBUFFERED="1")
    log_path = tmp_path / "playground.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "playground.py")],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def output() -> str:
        return log_path.read_text(errors="replace")

    ports: list[int] = []
    try:
        eventually(lambda: BANNER_END in output() or proc.poll() is not None, timeout=300,
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

        api = AirflowClient(AirflowSettings(url=ui.group(1), username=ui.group(3),
                                            password=ui.group(4), timeout=15))
        cycle = datetime.now(UTC).replace(microsecond=0)  # after the sync: a new cycle
        api.trigger("01_pipeline_init", f"playground__{cycle.isoformat()}", cycle, {})
        ours = run_id_for(cycle)

        def fanned_out() -> bool:
            runs = api.list_runs(FAN_OUT)
            return {r["dag_id"] for r in runs if r["dag_run_id"] == ours} == set(FAN_OUT)

        eventually(fanned_out, timeout=240, what="02-05 triggered by the reconciler")
        assert all(len([r for r in api.list_runs([d]) if r["dag_run_id"] == ours]) == 1
                   for d in FAN_OUT)  # once each
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
