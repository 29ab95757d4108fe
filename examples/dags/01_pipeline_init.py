"""Airflow DAG 01_pipeline_init, the root of the example graph: Airflow schedules it and
every run opens a cycle for the reconciler (every minute, so the playground shows cycles
coming; EXAMPLE_ROOT_SCHEDULE=none makes it manual-only for the end-to-end tests)."""

import os

from common.example_dag import example_dag

_schedule = os.environ.get("EXAMPLE_ROOT_SCHEDULE", "* * * * *")
dag = example_dag("01_pipeline_init", None if _schedule.lower() == "none" else _schedule)
