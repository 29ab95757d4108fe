"""The example graph as partitioned-asset DAGs (Airflow 3.2+), for benchmarks/bench_vs_assets.py.

The same shape as the reconciler's example DAGs (examples/dags: two short tasks, `extract`
sleeping 0.5 s, then `load`), but the dependencies live in DAG code, as Airflow's own
assets have them:

    a01_assets_init  (PartitionedAtRuntime: triggered through the API with a partition key)
      -> a02_assets, a03_assets, a04_assets, a05_assets   (each on asset a01)
      -> a06_assets                                       (on a02 & a03 & a04 & a05)
      -> a07_assets                                       (on a06)

Each DAG's `load` task emits its asset (`outlets`), so the event is sent when the work
ends; the partition key of the root run is carried down the chain (IdentityMapper, the
default), and the join waits for that same key from all four upstreams. This folder is not
in the playground's DAGs folder: only the benchmark copies it beside examples/dags.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from airflow.sdk import DAG, Asset, PartitionedAssetTimetable, PartitionedAtRuntime, task

UPSTREAMS: dict[str, list[str]] = {
    "a01_assets_init": [],
    "a02_assets": ["a01_assets_init"],
    "a03_assets": ["a01_assets_init"],
    "a04_assets": ["a01_assets_init"],
    "a05_assets": ["a01_assets_init"],
    "a06_assets": ["a02_assets", "a03_assets", "a04_assets", "a05_assets"],
    "a07_assets": ["a06_assets"],
}
ASSETS = {dag_id: Asset(name=f"bench_{dag_id}", uri=f"file://bench/{dag_id}")
          for dag_id in UPSTREAMS}


def _schedule(dag_id: str) -> PartitionedAtRuntime | PartitionedAssetTimetable:
    ups = UPSTREAMS[dag_id]
    if not ups:
        return PartitionedAtRuntime()
    condition = ASSETS[ups[0]]
    for up in ups[1:]:
        condition = condition & ASSETS[up]  # type: ignore[assignment]
    return PartitionedAssetTimetable(assets=condition)


def asset_dag(dag_id: str) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=_schedule(dag_id),
        start_date=datetime(2025, 1, 1, tzinfo=UTC),
        catchup=False,
        is_paused_upon_creation=False,
        tags=["reconciler-bench-assets"],
        max_active_runs=4,
        doc_md=__doc__,
    ) as dag:

        @task
        def extract() -> str:
            time.sleep(0.5)
            return dag_id

        @task(outlets=[ASSETS[dag_id]])
        def load(name: str) -> None:
            pass

        load(extract())
    return dag


for _dag_id in UPSTREAMS:
    globals()[_dag_id] = asset_dag(_dag_id)
