"""The Airflow plugins, outside the four layers (they import nothing of them): the listener
plugin, and the UI plugin of Airflow 3 (`ui/`: FastAPI app, pages, vendored scripts; it
reads etcd through the listener plugin's JSON gateway client).

`reconciler_events` is standard library only so that it imports inside any Airflow; it is
registered through the `airflow.plugins` entry point
(`reconciler.plugin.reconciler_events:ReconcilerEventsPlugin`) and is byte-identical to the
drop-in `examples/plugins/reconciler_events.py`. Nothing here is imported by the rest of
the package.
"""
