"""The reconciler inside Airflow 3's UI: a "Dependencies" nav item (the whole graph) and a
"Reconciler" tab on each DAG's page (why it is not running), read from etcd.

    plugin.py   the AirflowPlugin (`fastapi_apps`, `external_views`), registered through
                the `airflow.plugins` entry point beside the listener plugin
    app.py      the FastAPI app mounted at /reconciler: pages, JSON, static files, and
                Airflow's own authentication and per-DAG authorization
    reader.py   etcd through the listener plugin's JSON gateway client (no etcd3, no gRPC)
    view.py     what the pages show, from the values read (pure)
    static/     page.html, ui.js, ui.css and the vendored Cytoscape.js

Like the listener plugin it imports nothing of the reconciler's layers: Airflow's venv has
FastAPI but not the reconciler's dependencies.
"""
