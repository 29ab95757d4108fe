"""Logging (text or JSON lines), Prometheus metrics, and the /healthz, /readyz, /metrics port.

The loop logs one line per action and per state change, never per poll; the metrics
count what a quiet pass must not do (Airflow requests, etcd writes) so it can be checked.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger("reconciler")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("reconciler")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def event(text: str, level: int = logging.INFO, *, exc_info: bool = False,
          **fields: Any) -> None:
    """One structured log line: `fields` become JSON keys or key=value pairs."""
    log.log(level, text, exc_info=exc_info, extra={"fields": fields})


class Metrics:
    """The reconciler's Prometheus metrics, in a registry of their own (tests make many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.passes = Counter("reconciler_passes", "Reconcile passes run", registry=r)
        self.pass_seconds = Histogram("reconciler_pass_seconds", "Duration of one pass",
                                      registry=r, buckets=(.005, .01, .05, .1, .5, 1, 5, 30))
        self.actions = Counter("reconciler_actions", "Actions taken on Airflow",
                               ["kind", "result"], registry=r)
        self.airflow_requests = Counter("reconciler_airflow_requests",
                                        "HTTP requests sent to Airflow", registry=r)
        self.etcd_writes = Counter("reconciler_etcd_writes", "Writes (puts, txns) sent to etcd",
                                   registry=r)
        self.errors = Counter("reconciler_errors", "Errors by dependency and class",
                              ["dependency", "kind"], registry=r)
        self.leader = Gauge("reconciler_is_leader", "1 while this replica holds the lease",
                            registry=r)
        self.ready = Gauge("reconciler_ready", "1 while etcd and Airflow are reachable",
                           registry=r)
        self.open_cycles = Gauge("reconciler_open_cycles", "Cycles inside the window",
                                 registry=r)
        self.waiting = Gauge("reconciler_pipelines_waiting",
                             "Pipeline x cycle pairs waiting or blocked", ["state"], registry=r)


class Health:
    """What /healthz and /readyz answer; the loop flips the flags."""

    def __init__(self) -> None:
        self.alive = True
        self.reasons: dict[str, str] = {}  # dependency -> why it is not ready
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and not self.reasons

    def set_unready(self, dependency: str, why: str) -> bool:
        """Returns True when this is a change (so the caller logs it once)."""
        changed = self.reasons.get(dependency) != why
        self.reasons[dependency] = why
        return changed

    def set_ready(self, dependency: str) -> bool:
        return self.reasons.pop(dependency, None) is not None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds must not flood the log


def serve_http(host: str, port: int, metrics: Metrics, health: Health
               ) -> tuple[WSGIServer, threading.Thread]:
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = health.alive
            body = b"ok\n" if ok else b"dead\n"
        elif path == "/readyz":
            ok = health.ready
            body = (b"ready\n" if ok else ("not ready: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(health.reasons.items())) + "\n").encode()
                if health.started else b"not ready: starting\n")
        else:
            return metrics_app(environ, start_response)
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
