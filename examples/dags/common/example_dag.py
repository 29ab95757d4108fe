"""The shape shared by the seven dummy DAGs of the example graph (Airflow 3 style).

Each is two short tasks. A run whose conf has {"fail": true} fails on purpose (the
end-to-end tests use it). Dependencies between the DAGs are not here: they live in
pipelines/ and the reconciler triggers the DAGs; nothing in DAG code knows about it.
"""

from __future__ import annotations

import time
from datetime import datetime

from airflow.sdk import DAG, get_current_context, task


def example_dag(dag_id: str, schedule: str | None = None) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=datetime(2025, 1, 1),
        catchup=False,
        is_paused_upon_creation=False,
        tags=["reconciler-example"],
        max_active_runs=4,
    ) as dag:

        @task
        def extract() -> str:
            time.sleep(0.5)
            return dag_id

        @task
        def load(name: str) -> None:
            conf = get_current_context()["dag_run"].conf or {}
            if conf.get("fail"):
                raise RuntimeError(f"{name}: failing on purpose (conf fail=true)")

        load(extract())
    return dag
