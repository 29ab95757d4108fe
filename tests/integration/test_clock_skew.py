"""Time from the server: the informer's watermark and the window follow Airflow's clock
(its Date header), not this machine's. The loop's clock is moved hours and days ahead of
the fake Airflow's (which dates its runs and its Date header by the real clock) and every
hop still triggers on the next pass; the skew is a warning, a gauge and a `doctor`
finding. On each API generation: v2, v1 of Airflow 2.11, v1 of 2.5 (no updated_at
filter)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.adapters.airflow import AirflowClient
from reconciler.adapters.airflow_v1 import AirflowV1Client
from reconciler.adapters.clock import SystemClock
from reconciler.adapters.store import EtcdStore
from reconciler.cli import main
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import run_id_for
from reconciler.service.loop import Reconciler
from tests.fakes.fake_airflow import FakeAirflow
from tests.fakes.fake_airflow_v1 import FakeAirflowV1
from tests.fixtures.replicas import clean_env
from tests.helpers import EXAMPLE_DAGS

TIMESHIFT = Path(__file__).resolve().parents[1] / "timeshift"

CYCLE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
EXTRACTS = ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"]


class AheadClock(SystemClock):
    """This machine's clock, `ahead` in front of the real one (Airflow's)."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        return super().now() + self.ahead


@pytest.fixture
def store(example_store: EtcdStore) -> EtcdStore:
    """The example graph synced (tests/fixtures/etcd.py)."""
    return example_store


GENERATIONS = ["v2", "v1", "v1-2.5"]
"""API v2 (Airflow 3), v1 of Airflow 2.11, and v1 of 2.5, whose run listing has no
`updated_at` filter (the incremental listing asks by state and end date instead)."""


def made(cls: type[FakeAirflow], cls_v1: type[FakeAirflowV1], generation: str
         ) -> FakeAirflow:
    if generation == "v2":
        return cls(EXAMPLE_DAGS)
    return cls_v1(EXAMPLE_DAGS, version="2.5.3" if generation == "v1-2.5" else "2.11.2")


@pytest.fixture(params=GENERATIONS)
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAirflow]:
    with made(FakeAirflow, FakeAirflowV1, request.param) as f:
        f.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                  run_type="scheduled")
        f.finish_all()
        yield f


def loop(store: EtcdStore, fake: FakeAirflow, ahead: timedelta) -> Reconciler:
    settings = AirflowSettings(url=fake.url, username="admin", password="secret-pw",
                               timeout=2, retries=2)
    api = (AirflowV1Client(settings, backoff_initial=0.01, airflow_version=fake.version)
           if isinstance(fake, FakeAirflowV1)
           else AirflowClient(settings, backoff_initial=0.01))
    # relist_interval: an hour, so only the incremental listing can see a hop end
    return Reconciler(store, api, LoopSettings(interval=0.05, lease_ttl=6,
                                               relist_interval=3600),
                      holder="skewed", clock=AheadClock(ahead))


@pytest.mark.parametrize("ahead", [timedelta(hours=1), timedelta(days=3)],
                         ids=["1h-ahead", "3d-ahead"])
def test_a_clock_ahead_of_airflows_still_triggers_every_hop_on_the_next_pass(
        store: EtcdStore, fake: FakeAirflow, ahead: timedelta,
        caplog: pytest.LogCaptureFixture) -> None:
    r = loop(store, fake, ahead)
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        first = r.run_pass()
    # At +3 days the window (2 days) seen from our clock had closed this cycle already.
    assert sorted(a.dag_id for a in first.actions) == EXTRACTS
    fake.finish_all()
    # The next hop on the very next pass (an incremental listing, no relist): the
    # watermark is Airflow's clock, so runs that ended "before" our clock are seen.
    assert [a.dag_id for a in r.run_pass().actions] == ["06_pipeline"]
    fake.finish_all()
    assert [a.dag_id for a in r.run_pass().actions] == ["07_pipeline"]
    fake.finish_all()
    assert r.run_pass().actions == []
    for dag_id in EXAMPLE_DAGS[1:]:
        assert [run.run_id for run in fake.runs(dag_id)] == [run_id_for(CYCLE)]
    # Said once, as a warning, with the skew; and in the gauge.
    warnings = [rec for rec in caplog.records if "clock disagrees" in rec.getMessage()]
    assert len(warnings) == 1
    skew = getattr(warnings[0], "fields", {})["skew_seconds"]
    assert abs(skew - ahead.total_seconds()) < 5
    gauge = r.metrics.registry.get_sample_value("reconciler_clock_skew_seconds")
    assert gauge is not None
    assert abs(gauge - ahead.total_seconds()) < 5


def test_clocks_that_agree_say_nothing(store: EtcdStore, fake: FakeAirflow,
                                       caplog: pytest.LogCaptureFixture) -> None:
    r = loop(store, fake, timedelta(0))
    with caplog.at_level(logging.INFO, logger="reconciler"):
        assert sorted(a.dag_id for a in r.run_pass().actions) == EXTRACTS
    assert not [rec for rec in caplog.records if "clock" in rec.getMessage()]
    gauge = r.metrics.registry.get_sample_value("reconciler_clock_skew_seconds")
    assert gauge is not None
    assert abs(gauge) < 3


class SkewedFake(FakeAirflow):
    """A fake Airflow whose Date header is `behind` the real clock (its runs too)."""

    behind = timedelta(0)

    def _reply(self, h: Any, status: int, data: Any,
               content_type: str = "application/json") -> None:
        h.date_time_string = lambda timestamp=None: _http_date(datetime.now(UTC) - self.behind)
        super()._reply(h, status, data, content_type)


class SkewedFakeV1(SkewedFake, FakeAirflowV1):
    """The same, as Airflow 2 answers."""


def _http_date(when: datetime) -> str:
    from email.utils import format_datetime

    return format_datetime(when, usegmt=True)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_doctor_names_the_skew(store: EtcdStore, etcd_settings: EtcdSettings,
                               generation: str) -> None:
    with made(SkewedFake, SkewedFakeV1, generation) as fake:
        assert isinstance(fake, SkewedFake)
        fake.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                     run_type="scheduled")
        fake.finish_all()
        args = ["doctor", "--etcd-endpoints", ",".join(etcd_settings.endpoints),
                "--etcd-prefix", etcd_settings.prefix, "--namespace",
                etcd_settings.namespace, "--airflow-url", fake.url,
                "--airflow-username", "admin"]
        env = {"RECONCILER_AIRFLOW_PASSWORD": "secret-pw"}
        fine = CliRunner().invoke(main, args, env=env)
        assert "clock" not in fine.output, fine.output
        fake.behind = timedelta(hours=2)
        skewed = CliRunner().invoke(main, args, env=env)
        assert skewed.exit_code == 1, skewed.output
        assert "clock: this machine's clock is 2.0 h ahead of Airflow's" in skewed.output
        as_json = CliRunner().invoke(main, [*args, "--output", "json"], env=env)
        assert '"problem": "clock-skew"' in as_json.output


def test_plan_on_a_machine_three_days_ahead_still_sees_the_cycle(
        store: EtcdStore, fake: FakeAirflow, etcd_settings: EtcdSettings) -> None:
    # The probe's case: `plan` said "nothing to do (0 open cycles)" while a root run had
    # just finished. The command runs with its wall clock 3 days ahead of this process's
    # (tests/timeshift), the fake Airflow on this process's.
    shift = float(os.environ.get("TEST_CLOCK_SHIFT_DAYS") or 0) + 3
    env = clean_env(PYTHONPATH=os.pathsep.join([str(TIMESHIFT), *sys.path]),
                    TEST_CLOCK_SHIFT_DAYS=f"{shift:g}",
                    RECONCILER_ETCD_ENDPOINTS=",".join(etcd_settings.endpoints),
                    RECONCILER_ETCD_PREFIX=etcd_settings.prefix,
                    RECONCILER_NAMESPACE=etcd_settings.namespace,
                    RECONCILER_AIRFLOW_URL=fake.url, RECONCILER_AIRFLOW_USERNAME="admin",
                    RECONCILER_AIRFLOW_PASSWORD="secret-pw")
    out = subprocess.run([sys.executable, "-m", "reconciler", "plan", "--output", "json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    planned = sorted(a["dag_id"] for a in json.loads(out.stdout)["actions"])
    assert planned == EXTRACTS
    assert "clock disagrees with Airflow's by +259" in out.stderr  # +3 days, in seconds
