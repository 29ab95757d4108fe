"""Optional Airflow plugin: wake the reconciler the moment a DAG run finishes.

The reconciler works without it (it polls Airflow every --interval); with it, the
scheduler writes `events/<dag_id>/<run_id>` into etcd when a run ends, the reconciler's
etcd watch fires, and the downstream trigger follows within milliseconds instead of up to
one interval. It needs nothing from the reconciler's package: it speaks etcd's JSON
gateway with the standard library, with a short timeout, and never raises into Airflow.

Configure it in Airflow's environment:
    RECONCILER_EVENTS_ETCD_URL   e.g. http://127.0.0.1:2379 (unset: the plugin does nothing)
    RECONCILER_EVENTS_PREFIX     the reconciler's namespace root, default /reconciler/default/
    RECONCILER_EVENTS_TTL        seconds an event key lives, default 600
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.request

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1.0) as response:
        return json.loads(response.read() or b"{}")


def _notify(dag_run, state: str) -> None:
    base = os.environ.get("RECONCILER_EVENTS_ETCD_URL", "").rstrip("/")
    if not base:
        return
    prefix = os.environ.get("RECONCILER_EVENTS_PREFIX", "/reconciler/default/")
    ttl = int(os.environ.get("RECONCILER_EVENTS_TTL", "600"))
    key = f"{prefix.rstrip('/')}/events/{dag_run.dag_id}/{dag_run.run_id}"
    try:
        lease = _post(f"{base}/v3/lease/grant", {"TTL": ttl})
        _post(f"{base}/v3/kv/put", {"key": _b64(key), "value": _b64(state),
                                    "lease": lease.get("ID", "0")})
    except Exception as exc:  # a wake-up is an optimisation: never fail the scheduler
        log.warning("reconciler wake-up for %s not sent: %s", key, exc)


class _Listener:
    @hookimpl
    def on_dag_run_success(self, dag_run, msg: str) -> None:
        _notify(dag_run, "success")

    @hookimpl
    def on_dag_run_failed(self, dag_run, msg: str) -> None:
        _notify(dag_run, "failed")


class ReconcilerEventsPlugin(AirflowPlugin):
    name = "reconciler_events"
    listeners = [_Listener()]  # noqa: RUF012 (the AirflowPlugin API)

