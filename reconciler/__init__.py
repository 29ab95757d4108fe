"""GitOps-managed dependencies between Apache Airflow DAGs, reconciled through etcd."""

__version__ = "0.1.0"
