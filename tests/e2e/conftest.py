"""Helpers of the end-to-end tier: the reconciler as a real process (`reconciler run`)
against the real etcd and the real `airflow standalone` of tests/fixtures/.

`bench` runs each test on both Airflow majors: `airflow3` (API v2) and `airflow2` (2.11,
API v1 with basic auth; the reconciler finds out which by itself: RECONCILER_AIRFLOW_API is
auto). Each major's standalone is started once per session, when first needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import AirflowSettings, EtcdSettings
from reconciler.core.state import DagRun, iso
from reconciler.service.sync import sync
from tests.helpers import example_repo

REPO = Path(__file__).resolve().parents[2]
DAGS = ["01_pipeline_init", "02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline",
        "06_pipeline", "07_pipeline"]
T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float = 120.0, what: str = "",
               every: float = 0.5) -> T:
    """Poll until `check` returns something truthy (Flux's Eventually). A check that meets
    an Airflow too busy to answer in time tries again: the bench's own reads are not what
    a test asserts."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AirflowUnavailable as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")


def client_of(airflow: Any) -> AirflowClient:
    """A client of that bench Airflow, of its API generation (v1 on Airflow 2)."""
    cls = AirflowV1Client if getattr(airflow, "major", 3) == 2 else AirflowClient
    return cls(AirflowSettings(url=airflow.url, username=airflow.username,
                               password=airflow.password, timeout=10))


class Bench:
    """One test's world: a namespace in etcd, the graph synced into it, an Airflow client."""

    def __init__(self, airflow: Any, etcd: EtcdSettings, repo: Path, log_dir: Path) -> None:
        self.airflow = airflow
        self.etcd = etcd
        self.repo = repo
        self.log_dir = log_dir
        self.api = client_of(airflow)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RECONCILER_ETCD_ENDPOINTS": ",".join(self.etcd.endpoints),
            "RECONCILER_ETCD_PREFIX": self.etcd.prefix,
            "RECONCILER_NAMESPACE": self.etcd.namespace,
            "RECONCILER_AIRFLOW_URL": self.airflow.url,
            "RECONCILER_AIRFLOW_USERNAME": self.airflow.username,
            "RECONCILER_AIRFLOW_PASSWORD": self.airflow.password,
            "RECONCILER_INTERVAL": "0.5",
            "RECONCILER_HTTP_PORT": "0",
        })
        env.update(extra)
        return env

    def start(self, **extra_env: str) -> subprocess.Popen[bytes]:
        self.starts += 1
        log = open(self.log_dir / f"reconciler-{self.starts}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run"], env=self.env(**extra_env),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.log_dir.glob("reconciler-*.log")))

    # --- Airflow side --------------------------------------------------------------------

    def open_cycle(self, cycle: datetime, conf: dict[str, Any] | None = None) -> None:
        """A root run for `cycle`, as Airflow's scheduler would create it (a retry after a
        lost answer adopts the run the first try made)."""
        eventually(lambda: self.api.trigger("01_pipeline_init", f"e2e__{iso(cycle)}", cycle,
                                            conf or {}), 60, f"the root run of {iso(cycle)}")

    def runs(self, dag_id: str, cycle: datetime) -> list[DagRun]:
        return [r for r in (DagRun.from_api(x) for x in self.api.list_runs(
                    dag_ids=[dag_id], logical_date_gte=cycle))
                if r.logical_date == cycle]

    def run(self, dag_id: str, cycle: datetime) -> DagRun | None:
        runs = self.runs(dag_id, cycle)
        assert len(runs) <= 1, f"{dag_id} has {len(runs)} runs in cycle {cycle}"
        return runs[0] if runs else None

    def finished(self, dag_id: str, cycle: datetime) -> DagRun | None:
        run = self.run(dag_id, cycle)
        return run if run is not None and run.state in ("success", "failed") else None

    def wait_done(self, dag_id: str, cycle: datetime, timeout: float | None = None,
                  after: datetime | None = None) -> DagRun:
        # Airflow 2 starts every task as a new `airflow tasks run` process: far slower
        # on a busy machine than Airflow 3's task runner
        timeout = timeout or (480.0 if getattr(self.airflow, "major", 3) == 2 else 180.0)
        def check() -> DagRun | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the reconciler exited ({self.process.returncode})\n"
                                     f"{self.logs()}")
            run = self.finished(dag_id, cycle)
            if run is None or (after is not None and (run.end_date or after) <= after):
                return None
            return run

        try:
            return eventually(check, timeout, f"{dag_id} to finish in cycle {iso(cycle)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- reconciler log ---\n{self.logs()}") from None


@pytest.fixture(autouse=True)
def airflow_still_whole(request: pytest.FixtureRequest) -> None:
    """Fail at once, saying why, when a component of the shared Airflow died in an earlier
    test (standalone keeps its API up without a scheduler: every run would stay queued)."""
    for name in ("airflow_server", "airflow2_server"):
        if name not in request.fixturenames:
            continue
        airflow = request.getfixturevalue(name)
        if stopped := airflow.stopped_components():
            pytest.fail(f"Airflow's {', '.join(stopped)} stopped earlier in the session\n"
                        f"{airflow.diagnosis()}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed e2e test also shows the shared Airflow's health and its log's end."""
    report = yield
    for name in ("airflow_server", "airflow2_server"):
        airflow = getattr(item, "funcargs", {}).get(name)
        if report.failed and call.when == "call" and airflow is not None:
            report.sections.append((f"airflow standalone ({name})", airflow.diagnosis()))
    return report


@pytest.fixture(params=["airflow3", "airflow2"])
def bench(request: pytest.FixtureRequest, etcd_server: Any, tmp_path: Path) -> Iterator[Bench]:
    """One test's world on Airflow 3, then on Airflow 2."""
    name = "airflow2_server" if request.param == "airflow2" else "airflow_server"
    yield from make_bench(request.getfixturevalue(name), etcd_server, tmp_path)


def make_bench(airflow_server: Any, etcd_server: Any, tmp_path: Path,
               namespace: str | None = None) -> Iterator[Bench]:
    """A Bench on that Airflow, its graph synced into `namespace` (default: a fresh one)."""
    repo = example_repo(tmp_path / "repo")
    etcd = EtcdSettings(endpoints=(etcd_server.endpoint,), prefix="e2e",
                        namespace=namespace or f"n{uuid.uuid4().hex[:10]}")
    with EtcdStore(etcd) as store:
        # synced "a day ago", so that every cycle of the test is newer than the graph
        result = sync(repo, "HEAD", "pipelines", store, source="e2e",
                      now=datetime.now(UTC) - timedelta(days=1))
        assert result.ok, result
    b = Bench(airflow_server, etcd, repo, tmp_path)
    try:
        yield b
    finally:
        b.stop()


_minute = [0]


def new_cycle() -> datetime:
    """A fresh logical date inside the window, never used before in this session."""
    _minute[0] += 1
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=12)
    return base + timedelta(minutes=_minute[0])
