"""Airflow DAG 01_pipeline_init, the root of the example graph: Airflow schedules it and
every run opens a cycle for the reconciler (every minute, so the playground shows cycles
coming; EXAMPLE_ROOT_SCHEDULE=none makes it manual-only for the end-to-end tests).

EXAMPLE_ROOT_PAUSED=true creates it paused: the playground unpauses it once the graph is
synced and Airflow's API server answers, so that its first run is a full cycle (a task
started before the API server listens fails, and a cycle opened before the sync is not
run by pipelines synced after it: backfill: false)."""

import os

from common.example_dag import example_dag

_schedule = os.environ.get("EXAMPLE_ROOT_SCHEDULE", "* * * * *")
dag = example_dag("01_pipeline_init", None if _schedule.lower() == "none" else _schedule,
                  paused=os.environ.get("EXAMPLE_ROOT_PAUSED", "").lower() == "true")
