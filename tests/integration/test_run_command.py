"""`reconciler run`, `plan` and `status` as real processes against a real etcd and the
fake Airflow: health endpoints, metrics, clean SIGTERM, dry runs, unreachable services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.core.state import run_id_for
from reconciler.service.sync import sync
from tests.fakes.fake_airflow import FakeAirflow
from tests.fixtures.etcd import free_port
from tests.helpers import example_repo

REPO = Path(__file__).resolve().parents[2]
DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]
CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


@pytest.fixture
def synced(tmp_path: Path, etcd_settings: EtcdSettings) -> EtcdSettings:
    repo = example_repo(tmp_path / "repo")
    with EtcdStore(etcd_settings) as store:
        assert sync(repo, "HEAD", "pipelines", store, source="t",
                    now=datetime.now(UTC) - timedelta(days=1)).ok
    return etcd_settings


@pytest.fixture
def fake() -> Iterator[FakeAirflow]:
    with FakeAirflow(DAGS) as f:
        f.add_run("01_pipeline_init", "scheduled__x", CYCLE, state="success",
                  start_date=CYCLE, end_date=CYCLE + timedelta(seconds=5))
        yield f


def env(etcd: EtcdSettings, airflow_url: str) -> dict[str, str]:
    return dict(os.environ, RECONCILER_ETCD_ENDPOINTS=",".join(etcd.endpoints),
                RECONCILER_ETCD_PREFIX=etcd.prefix, RECONCILER_NAMESPACE=etcd.namespace,
                RECONCILER_AIRFLOW_URL=airflow_url, RECONCILER_AIRFLOW_USERNAME="admin",
                RECONCILER_AIRFLOW_PASSWORD="secret-pw", RECONCILER_INTERVAL="0.2")


def cli(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_plan_is_a_dry_run(synced: EtcdSettings, fake: FakeAirflow) -> None:
    e = env(synced, fake.url)
    proc = cli("plan", environ=e)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(line.split()[1] for line in lines) == DAGS[1:5]
    assert all(line.startswith("trigger ") for line in lines)
    assert fake.runs("02_pipeline") == []  # nothing triggered
    with EtcdStore(synced) as store:
        assert store.read_ledger() == {}  # nothing written
    data = json.loads(cli("plan", "--output", "json", environ=e).stdout)
    assert {a["run_id"] for a in data["actions"]} == {run_id_for(CYCLE)}


def test_status_names_what_each_pipeline_waits_for(synced: EtcdSettings,
                                                   fake: FakeAirflow) -> None:
    proc = cli("status", environ=env(synced, fake.url))
    assert proc.returncode == 0, proc.stderr
    assert "06_pipeline" in proc.stdout
    assert "waiting for 02_pipeline" in proc.stdout


def test_one_shot_commands_exit_2_fast_when_airflow_is_down(synced: EtcdSettings) -> None:
    started = time.monotonic()
    proc = cli("status", environ=env(synced, f"http://127.0.0.1:{free_port()}"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot connect to Airflow")
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30


def test_one_shot_commands_exit_2_fast_when_etcd_is_down(fake: FakeAirflow) -> None:
    down = EtcdSettings(endpoints=(f"127.0.0.1:{free_port()}",))
    proc = cli("plan", environ=env(down, fake.url))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: etcd at ")
    assert "Traceback" not in proc.stderr


def test_run_serves_health_and_metrics_and_stops_cleanly_on_sigterm(
        synced: EtcdSettings, fake: FakeAirflow) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run", "--http-port",
                             str(port), "--log-format", "json"], env=env(synced, fake.url),
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: get(base + "/healthz")[0] == 200)
        assert wait_for(lambda: get(base + "/readyz")[0] == 200)
        wait_for(lambda: len(fake.runs("05_pipeline")) == 1)
        status, metrics = get(base + "/metrics")
        assert status == 200
        assert 'reconciler_actions_total{kind="trigger",result="ok"} 4.0' in metrics
        assert "reconciler_is_leader 1.0" in metrics
        fake.faults = [("500", 0)] * 1000  # Airflow breaks: not ready, but alive
        assert wait_for(lambda: get(base + "/readyz")[0] == 503)
        assert get(base + "/healthz")[0] == 200
        fake.faults = []
        assert wait_for(lambda: get(base + "/readyz")[0] == 200, 90)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in logs]
    assert "triggered" in messages
    assert "airflow problem, retrying" in messages
    assert "pass succeeds again" in messages
    assert messages[-1] == "reconciler stopped"
    # one line per state change, not per poll: the failure was logged once
    assert messages.count("airflow problem, retrying") == 1
    with EtcdStore(synced) as store:
        assert store.leader() is None  # the lease was released on SIGTERM


def test_a_one_shot_command_answers_within_about_10_s_when_airflow_hangs(
        synced: EtcdSettings, fake: FakeAirflow) -> None:
    fake.fail_next(1000, "hang", 60)
    started = time.monotonic()
    proc = cli("status", environ=env(synced, fake.url))
    elapsed = time.monotonic() - started
    fake.faults.clear()
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 15  # ONE_SHOT_DEADLINE (8 s) plus start-up


@pytest.mark.parametrize(("args", "says"), [
    (["--interval", "0"], "--interval must be above 0"),
    (["--interval", "-1"], "'-1' is not a duration"),
    (["--lease-ttl", "0"], "--lease-ttl must be at least 2"),
    (["--interval", "30s", "--lease-ttl", "1"], "--lease-ttl must be at least 2"),
    (["--interval", "soon"], "is not a duration"),
])
def test_run_refuses_settings_that_cannot_work_at_start(synced: EtcdSettings,
                                                        fake: FakeAirflow, args: list[str],
                                                        says: str) -> None:
    proc = cli("run", "--http-port", "0", *args, environ=env(synced, fake.url))
    assert proc.returncode == 2
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_without_airflow_credentials_exits_2_at_start(synced: EtcdSettings,
                                                          fake: FakeAirflow) -> None:
    environ = env(synced, fake.url)
    del environ["RECONCILER_AIRFLOW_PASSWORD"]
    proc = cli("run", "--http-port", "0", environ=environ)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: Airflow user 'admin' has no password: set "
                                   "RECONCILER_AIRFLOW_PASSWORD (or --airflow-password-file)")
    assert sum(fake.requests.values()) == 0


def test_run_with_its_metrics_port_taken_exits_2_with_one_line(synced: EtcdSettings,
                                                               fake: FakeAirflow) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("run", "--http-port", str(port), environ=env(synced, fake.url))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot serve /metrics on 127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr


def test_a_binary_password_file_is_one_line_and_exit_2(synced: EtcdSettings,
                                                       fake: FakeAirflow,
                                                       tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xff\xfe\x00binary")
    proc = cli("status", "--airflow-password-file", str(secret),
               environ=env(synced, fake.url))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --airflow-password-file {secret}: not a UTF-8 text file"


def test_healthz_fails_when_no_pass_ends_and_readyz_names_the_dependency() -> None:
    from reconciler.service.observability import Health

    now = [100.0]
    health = Health(stall_after=30, monotonic=lambda: now[0])
    assert health.alive  # starting
    health.start()
    health.beat()
    health.passed()
    assert health.alive
    assert health.is_ready
    now[0] += 31
    assert not health.alive
    health.beat()
    health.unready("etcd", "etcd at 127.0.0.1:1 is unreachable")
    assert health.alive
    assert not health.is_ready
    assert "etcd: etcd at 127.0.0.1:1 is unreachable" in health.describe()


def test_run_never_prints_credentials_of_its_urls(synced: EtcdSettings, fake: FakeAirflow,
                                                   tmp_path: Path) -> None:
    url = fake.url.replace("http://", "http://someone:url-s3cret@")
    origin = example_repo(tmp_path / "origin")
    repo = f"file://someone:repo-s3cret@localhost{origin}"  # git ignores the user part here
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run", "--http-port", "0",
                             "--repo", repo, "--workdir", str(tmp_path / "clone"),
                             "--log-format", "json"], env=env(synced, url),
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(fake.runs("05_pipeline")) == 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "url-s3cret" not in stderr
    assert "repo-s3cret" not in stderr
    assert "***@" in stderr  # the URLs are shown, without their credentials
    with EtcdStore(synced) as store:
        for entry in store.read_history():
            assert "s3cret" not in entry.source


@pytest.mark.parametrize(("generation", "wrong"), [("v2", "v1"), ("v1", "v2")])
def test_run_with_the_wrong_airflow_api_exits_2_with_one_line(
        synced: EtcdSettings, generation: str, wrong: str) -> None:
    from tests.fakes.fake_airflow_v1 import FakeAirflowV1

    with (FakeAirflowV1 if generation == "v1" else FakeAirflow)(DAGS) as airflow:
        proc = cli("run", "--http-port", "0",
                   environ={**env(synced, airflow.url), "RECONCILER_AIRFLOW_API": wrong})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: RECONCILER_AIRFLOW_API={wrong}, but ")
    assert proc.stderr.rstrip().endswith(f"set RECONCILER_AIRFLOW_API={generation} or auto")


def test_run_waits_for_an_airflow_that_is_down_at_start_then_finds_its_api(
        synced: EtcdSettings, fault_proxy: Any) -> None:
    import threading

    from tests.fakes.fake_airflow_v1 import FakeAirflowV1

    with FakeAirflowV1(DAGS) as airflow2:
        airflow2.add_run("01_pipeline_init", "scheduled__x", CYCLE, state="success",
                         start_date=CYCLE, end_date=CYCLE + timedelta(seconds=5))
        proxy = fault_proxy(airflow2.url)
        proxy.refuse()
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run", "--http-port",
                                 str(port), "--log-format", "json"],
                                env=env(synced, proxy.url), stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        reader.start()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: any("waiting for Airflow to tell its API" in x for x in lines), 30)
            assert get(base + "/healthz")[0] == 200  # alive meanwhile, not ready
            assert get(base + "/readyz")[0] == 503
            assert airflow2.runs("02_pipeline") == []
            proxy.pass_through()
            wait_for(lambda: len(airflow2.runs("05_pipeline")) == 1, 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            reader.join(10)
    assert proc.returncode == 0, lines
    messages = [json.loads(line) for line in lines if line.startswith("{")]
    waiting = [m for m in messages if m["message"] == "waiting for Airflow to tell its API"]
    assert len(waiting) == 1  # said once, not per attempt
    (found,) = [m for m in messages if m["message"] == "airflow api"]
    assert (found["api"], found["version"], found["chosen"]) == ("v1", "2.11.2", "auto")
