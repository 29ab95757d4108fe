"""A narrower user for the UI's browser tests, dropped into the plugins folder of the test's
own `airflow standalone` (tests/e2e/test_ui_airflow3.py copies it there).

`airflow standalone` forces Airflow's simple auth manager (it overrides [core]
auth_manager), whose every role reads every DAG; a real deployment restricts DAGs per user
(FAB's per-DAG permissions, Keycloak, ...). So this module, imported by Airflow where it
loads plugins, narrows the simple auth manager's DAG check: the user `narrow` may read only
the DAGs in RECONCILER_E2E_NARROW_DAGS. Airflow's own `/api/v2/dags` then answers that user
with those DAGs only (the test asserts it first); the reconciler's plugin must ask the auth
manager and never decide itself. Imported inside Airflow only (never collected by pytest).
"""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

_simple_is_authorized_dag = SimpleAuthManager.is_authorized_dag


def _narrowed(self: SimpleAuthManager, *, method: Any, user: Any, access_entity: Any = None,
              details: Any = None) -> bool:
    # No details: "may this user list DAGs at all" (yes); the list is then filtered DAG
    # by DAG through this same check.
    if user.get_name() == "narrow" and details is not None and details.id is not None:
        allowed = set(os.environ.get("RECONCILER_E2E_NARROW_DAGS", "").split(","))
        if details.id not in allowed:
            return False
    return bool(_simple_is_authorized_dag(self, method=method, user=user,
                                          access_entity=access_entity, details=details))


if getattr(SimpleAuthManager.is_authorized_dag, "__name__", "") != "_narrowed":
    SimpleAuthManager.is_authorized_dag = _narrowed  # type: ignore[method-assign]
