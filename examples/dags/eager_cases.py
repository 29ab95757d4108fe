"""DAGs with the shapes the eager path must judge right (tests/e2e/test_eager_real.py):
a task that fails once and is retried, mapped tasks, a branch that skips a task, and a
setup/teardown pair. They are not in the example graph; nothing triggers them but tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

try:
    from airflow.sdk import DAG, get_current_context, task
except ImportError:  # Airflow 2
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.decorators import task  # type: ignore[no-redef]
    from airflow.operators.python import get_current_context  # type: ignore[no-redef]

COMMON = {"schedule": None, "start_date": datetime(2025, 1, 1, tzinfo=UTC), "catchup": False,
          "is_paused_upon_creation": False, "tags": ["reconciler-eager-cases"]}

with DAG(dag_id="eager_retry", **COMMON):  # type: ignore[arg-type]

    @task(retries=1, retry_delay=timedelta(seconds=3))
    def flaky() -> None:
        if get_current_context()["ti"].try_number < 2:
            raise RuntimeError("first try fails on purpose")

    flaky()

with DAG(dag_id="eager_mapped", **COMMON):  # type: ignore[arg-type]

    @task
    def square(x: int) -> int:
        return x * x

    square.expand(x=[1, 2, 3])

with DAG(dag_id="eager_branch", **COMMON):  # type: ignore[arg-type]

    @task.branch
    def choose() -> str:
        return "taken"

    @task
    def taken() -> None:
        pass

    @task
    def not_taken() -> None:
        pass

    choose() >> [taken(), not_taken()]

with DAG(dag_id="eager_teardown", **COMMON):  # type: ignore[arg-type]

    @task
    def create() -> None:
        pass

    @task
    def work() -> None:
        import time

        time.sleep(1)

    @task
    def delete() -> None:
        import time

        time.sleep(1)

    made = create()
    made >> work() >> delete().as_teardown(setups=made)
