"""Airflow DAG 04_pipeline of the example graph: not scheduled; the reconciler triggers it when
its upstreams (pipelines/04_pipeline.yaml) are done for the cycle."""

from common.example_dag import example_dag

dag = example_dag("04_pipeline")
