"""Dummy pipeline of the example graph; its upstreams are in pipelines/06_pipeline.yaml.

Set {"fail": true} in the run's conf to make it fail (the end-to-end tests do)."""

from __future__ import annotations

import time
from datetime import datetime

from airflow.sdk import DAG, get_current_context, task

# Not scheduled: the reconciler triggers it when its upstreams are done (see pipelines/).
SCHEDULE = None

with DAG(
    dag_id="06_pipeline",
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
        return "06_pipeline"

    @task
    def load(name: str) -> None:
        conf = get_current_context()["dag_run"].conf or {}
        if conf.get("fail"):
            raise RuntimeError(f"{name}: failing on purpose (conf fail=true)")

    load(extract())
