"""The shape shared by the seven dummy DAGs of the example graph (Airflow 3 style; the
same file runs on Airflow 2, which has no `airflow.sdk`).

Each is two short tasks (about 1.5 s from queued to success on a laptop). The run's conf
steers them, for tests and demos:

- `{"fail": true}`: the second task fails, so the run ends `failed`;
- `{"sleep": 5}`: the first task takes that many seconds, so the run stays `running`.

Dependencies between the DAGs are not here: they live in pipelines/ and the reconciler
triggers the DAGs; nothing in DAG code knows about it. (The folder `common/` is listed in
`.airflowignore`, so Airflow imports it from the DAG files only.)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

try:
    from airflow.sdk import DAG, get_current_context, task
except ImportError:  # Airflow 2
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.decorators import task  # type: ignore[no-redef]
    from airflow.operators.python import get_current_context  # type: ignore[no-redef]


def example_dag(dag_id: str, schedule: str | None = None, *, paused: bool = False) -> DAG:
    """`paused`: created paused (the playground's root, unpaused once all is ready)."""
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        # In the past, with catchup off: a scheduled DAG runs for the latest interval now.
        start_date=datetime(2025, 1, 1, tzinfo=UTC),
        catchup=False,
        is_paused_upon_creation=paused,  # else runs without a click in the UI
        tags=["reconciler-example"],
        max_active_runs=4,
        doc_md=__doc__,
    ) as dag:

        @task
        def extract() -> str:
            conf = get_current_context()["dag_run"].conf or {}
            time.sleep(float(conf.get("sleep", 0.5)))
            return dag_id

        @task
        def load(name: str) -> None:
            conf = get_current_context()["dag_run"].conf or {}
            if conf.get("fail"):
                raise RuntimeError(f"{name}: failing on purpose (conf fail=true)")

        load(extract())
    return dag
