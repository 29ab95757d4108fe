"""Logging (text or JSON lines), Prometheus metrics, and the /healthz, /readyz, /metrics port.

The loop logs one line per action and per state change, never per poll; the metrics
count what a quiet pass must not do (Airflow requests, etcd writes) so it can be checked.
A text log line is one line: values from outside are escaped (core.safe_text.printable);
a JSON line holds them exactly.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from reconciler.core.safe_text import printable

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

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A run id or an error text from outside stays on its line and in its order (a
        # newline, an ANSI escape, U+202E are escaped); a traceback below keeps its lines.
        record.message = printable(record.message)
        line = super().formatMessage(record)
        fields = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{printable(k)}={printable(v)}" for k, v in fields.items())
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
        self.clock_skew = Gauge("reconciler_clock_skew_seconds",
                                "Seconds this machine's clock is ahead of Airflow's (its "
                                "Date header; negative: behind)", registry=r)
        self.airflow_concurrency = Gauge("reconciler_airflow_concurrency_limit",
                                         "Airflow calls let in flight at once: adapts to "
                                         "Airflow's answers, at most --concurrency",
                                         registry=r)
        self.pass_running = Gauge("reconciler_pass_running_seconds",
                                  "Seconds the pass under way has been running (0 between "
                                  "passes)", registry=r)
        self.deployment_reachable = Gauge(
            "reconciler_deployment_reachable", "1 while the deployment's runs were listed on "
            "the last pass, 0 while it cannot be reached (its pipelines are held back); "
            "only when the graph declares deployments", ["deployment"], registry=r)


class Health:
    """What /healthz and /readyz answer.

    Alive: a pass ended (well or not) within `stall_after` seconds, so a loop stuck in a
    call without deadline shows. Ready: started, one pass went through, and no dependency
    is failing: each dependency's state comes from its last real contact (the runner
    reports it), so a standby that never calls Airflow does not claim Airflow works.
    """

    def __init__(self, *, stall_after: float = 120.0, pass_deadline: float | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.stall_after = stall_after
        self.pass_deadline = pass_deadline
        """A pass running longer than this is stuck: not ready (and the leader gives up
        its lease, see Leadership.stuck). None: never."""
        self.pass_started: float | None = None
        """monotonic() when the pass under way began; None between passes."""
        self._monotonic = monotonic
        self.started = False
        self.passed_once = False
        self.last_beat: float | None = None
        self.reasons: dict[str, str] = {}  # dependency -> why it is not ready
        self.leader = False

    def start(self) -> None:
        self.started = True
        self.last_beat = self._monotonic()

    def beat(self) -> None:
        self.last_beat = self._monotonic()

    def passed(self) -> None:
        self.passed_once = True

    def pass_began(self) -> None:
        self.pass_started = self._monotonic()

    def pass_ended(self) -> None:
        self.pass_started = None

    def running_for(self) -> float:
        """Seconds the pass under way has been running; 0 between passes."""
        started = self.pass_started
        return 0.0 if started is None else max(0.0, self._monotonic() - started)

    def stuck(self) -> str | None:
        """Why the pass under way counts as stuck, or None."""
        started, deadline = self.pass_started, self.pass_deadline
        if started is None or deadline is None:
            return None
        running = self._monotonic() - started
        if running <= deadline:
            return None
        return f"a pass has been running for {running:.0f} s (pass deadline {deadline:g} s)"

    @property
    def alive(self) -> bool:
        if not self.started or self.last_beat is None:
            return True  # starting: the first pass has its own deadlines
        return self._monotonic() - self.last_beat < self.stall_after

    @property
    def is_ready(self) -> bool:
        return self.started and self.passed_once and not self.reasons and self.stuck() is None

    def unready(self, dependency: str, why: str) -> bool:
        """Returns True when this is a change (so the caller logs it once)."""
        changed = self.reasons.get(dependency) != why
        self.reasons[dependency] = why
        return changed

    def ready(self, dependency: str) -> bool:
        return self.reasons.pop(dependency, None) is not None

    def describe(self) -> str:
        if not self.started:
            return "not ready: starting"
        stuck = self.stuck()
        if stuck is not None:
            return "not ready: " + "; ".join(
                [stuck] + [f"{k}: {v}" for k, v in sorted(self.reasons.items())])
        if not self.passed_once and not self.reasons:
            return "not ready: no pass has completed yet"
        if self.reasons:
            return "not ready: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return "ready (" + ("leader" if self.leader else "standby") + ")"


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
            stuck = health.stuck()
            body = ((f"ok ({stuck})\n" if stuck else "ok\n").encode() if ok else
                    f"stalled: no pass ended for {health.stall_after:g} s\n".encode())
        elif path == "/readyz":
            ok = health.is_ready
            body = (health.describe() + "\n").encode()
        else:
            return metrics_app(environ, start_response)
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
