"""The Airflow listener plugin, outside the four layers (it imports nothing of them).

`reconciler_events` is standard library only so that it imports inside any Airflow; it is
registered through the `airflow.plugins` entry point
(`reconciler.plugin.reconciler_events:ReconcilerEventsPlugin`) and is byte-identical to the
drop-in `examples/plugins/reconciler_events.py`. Nothing here is imported by the rest of
the package.
"""
