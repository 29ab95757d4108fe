"""Root of the example graph: every run opens a cycle for the reconciler.

Set {"fail": true} in the run's conf to make it fail (the end-to-end tests do)."""

from __future__ import annotations

import os
import time
from datetime import datetime

from airflow.sdk import DAG, get_current_context, task

# The root: Airflow schedules it (every minute here, so the playground shows cycles
# coming); EXAMPLE_ROOT_SCHEDULE=none makes it manual-only for the end-to-end tests.
_schedule = os.environ.get("EXAMPLE_ROOT_SCHEDULE", "* * * * *")
SCHEDULE = None if _schedule.lower() == "none" else _schedule

with DAG(
    dag_id="01_pipeline_init",
    schedule=SCHEDULE,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["reconciler-example"],
    max_active_runs=4,
):

    @task
    def extract() -> str:
        time.sleep(0.5)
        return "01_pipeline_init"

    @task
    def load(name: str) -> None:
        conf = get_current_context()["dag_run"].conf or {}
        if conf.get("fail"):
            raise RuntimeError(f"{name}: failing on purpose (conf fail=true)")

    load(extract())
