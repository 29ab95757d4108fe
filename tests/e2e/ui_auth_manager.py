"""An auth manager for the UI's browser tests, loaded by the test's own `airflow standalone`
(AIRFLOW__CORE__AUTH_MANAGER=ui_auth_manager.NarrowAuthManager, this folder on PYTHONPATH).

Airflow's simple auth manager lets every role read every DAG; a real deployment restricts
DAGs per user (FAB's per-DAG permissions, Keycloak, ...). This one is the simple auth
manager, except that the user `narrow` may read only the DAGs listed in
RECONCILER_E2E_NARROW_DAGS: the plugin must ask the auth manager, never decide itself.
Imported inside Airflow only (never collected by pytest).
"""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class NarrowAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None,
                          details: Any = None) -> bool:
        if user.get_name() == "narrow":
            allowed = set(os.environ.get("RECONCILER_E2E_NARROW_DAGS", "").split(","))
            if details is None or details.id not in allowed:
                return False
        return bool(super().is_authorized_dag(method=method, user=user,
                                              access_entity=access_entity, details=details))
