"""Adapters to the outside world, each the only module that talks to its system:
`store` (etcd), `airflow` (the REST API), `sources` (directories and git trees)."""
