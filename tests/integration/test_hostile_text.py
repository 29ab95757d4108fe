"""Run ids from Airflow holding a newline, U+202E or an ANSI escape, end to end: `plan`,
`status` and the loop's text log show them escaped on one line (core.safe_text.printable);
`--output json` and the JSON log keep them exact."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.service.observability import JsonFormatter, TextFormatter
from reconciler.service.sync import sync
from tests.helpers import EXAMPLE_DAGS, example_repo
from tests.integration.test_operate import CYCLE, ScheduledFake, airflow_env, cli, loop

HOSTILE = "manual__x\nERROR forged\u202eevil\x1b[31mred"
SHOWN = "manual__x\\nERROR forged\\u202eevil\\x1b[31mred"


def test_plan_status_and_the_text_log_escape_a_hostile_run_id(
        etcd_settings: EtcdSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EtcdStore(etcd_settings) as store, ScheduledFake(EXAMPLE_DAGS) as fake:
        assert sync(example_repo(tmp_path / "repo"), "HEAD", "pipelines", store,
                    source="test", now=datetime.now(UTC) - timedelta(days=60)).ok
        root_end = CYCLE + timedelta(minutes=10)
        fake.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                     run_type="scheduled", state="success", start_date=CYCLE,
                     end_date=root_end)
        # a manual run of 02 that started before its upstream ended: the plan clears it
        fake.add_run("02_pipeline", HOSTILE, CYCLE, run_type="manual", state="success",
                     start_date=CYCLE + timedelta(minutes=1),
                     end_date=CYCLE + timedelta(minutes=2))
        plan = cli(etcd_settings, "plan", **airflow_env(fake))
        assert plan.exit_code == 0, plan.output
        assert f"run {SHOWN}: " in plan.output
        assert "\u202e" not in plan.output
        assert "\x1b" not in plan.output
        assert not any(line.startswith("ERROR") for line in plan.output.splitlines())
        data = json.loads(cli(etcd_settings, "plan", "-o", "json", **airflow_env(fake)).output)
        assert HOSTILE in {a["run_id"] for a in data["actions"]}

        caplog.set_level(logging.INFO, logger="reconciler")
        loop(store, fake).run_pass()
        lines = [TextFormatter().format(r) for r in caplog.records]
        mentions = [line for line in lines if SHOWN in line]
        assert mentions  # the action on that run was logged, escaped
        assert all("\n" not in line and "\u202e" not in line for line in lines)
        exact = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
        assert HOSTILE in {d.get("run_id") for d in exact}  # JSON: the exact run id

        status = cli(etcd_settings, "status")
        assert status.exit_code == 0, status.output
        assert "\u202e" not in status.output
        assert "\x1b" not in status.output
        assert not any(line.startswith("ERROR") for line in status.output.splitlines())
