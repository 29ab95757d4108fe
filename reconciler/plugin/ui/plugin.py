"""The Airflow plugin of the UI (`reconciler.plugin.ui.plugin:ReconcilerUIPlugin`, entry
point `reconciler_ui`): Airflow 3's API server mounts its app and shows its two views.

A plugin of its own rather than fields of the listener plugin: that one is standard
library only and shipped byte for byte as a drop-in file (it runs in the scheduler and
in every task), while this one needs FastAPI. Where FastAPI or Airflow 3's plugin fields
are missing (Airflow 2, or outside Airflow) the module still imports and defines no plugin.
"""

from __future__ import annotations

from typing import Any, ClassVar

URL_PREFIX = "/reconciler"

EXTERNAL_VIEWS: list[dict[str, Any]] = [
    {"name": "Dependencies", "href": f"{URL_PREFIX}/", "destination": "nav",
     "url_route": "reconciler-dependencies", "nav_top_level": True,
     "icon": f"{URL_PREFIX}/static/icon.svg"},
    {"name": "Reconciler", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}", "destination": "dag",
     "url_route": "reconciler", "icon": f"{URL_PREFIX}/static/icon.svg"},
]
"""The nav item (the whole graph) and the DAG tab (one pipeline), rendered by Airflow's UI
in a frame; the UI puts the DAG's id in place of {DAG_ID}."""

try:
    from airflow.plugins_manager import AirflowPlugin
except ImportError:  # outside Airflow
    AirflowPlugin = None

try:
    from reconciler.plugin.ui.app import create_app
except ImportError:  # no FastAPI: Airflow 2
    create_app = None  # type: ignore[assignment]

if AirflowPlugin is not None and create_app is not None:
    class ReconcilerUIPlugin(AirflowPlugin):
        """The Dependencies view and the per-DAG Reconciler tab (Airflow 3.1+)."""

        name = "reconciler_ui"
        fastapi_apps: ClassVar[list[dict[str, Any]]] = [
            {"app": create_app(), "url_prefix": URL_PREFIX, "name": "Reconciler"}]
        external_views: ClassVar[list[dict[str, Any]]] = EXTERNAL_VIEWS
