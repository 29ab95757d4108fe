"""Airflow listener plugin: wake the reconciler the moment a run (or a task of it) ends.

The reconciler works without it (it polls Airflow every --interval); with it, Airflow writes
`events/<dag_id>/<run_id>` (`events/@<deployment>/<dag_id>/<run_id>` when this Airflow is
not the graph's default deployment: below) under the reconciler's namespace in etcd when a
DAG run ends (`on_dag_run_success/failed`, in the scheduler) and when a task instance ends
(`on_task_instance_success/failed/skipped`, where the task runs), the reconciler's etcd
watch fires, and the downstream trigger follows at once instead of up to one interval
later. The value is JSON: `{"kind": "run" | "task", "dag_id", "run_id", "task_id" (task
level), "map_index", "try_number", "state", "at"}`; the key lives `RECONCILER_EVENTS_TTL`
seconds (a lease).

Standard library only, so it imports inside any Airflow: it speaks etcd's JSON gateway
(the v3 HTTP API: `/v3/kv/put` with base64 keys, `/v3/lease/grant`, `/v3/kv/range`,
`/v3/auth/authenticate`). The same file is shipped twice, byte for byte (a test keeps
them equal): in the wheel as `reconciler.plugin.reconciler_events` (registered through the
`airflow.plugins` entry point: `pip install airflow-dag-reconciler[airflow-plugin]`), and
as the drop-in `examples/plugins/reconciler_events.py` for `$AIRFLOW_HOME/plugins`. Use
one of the two, not both.

It never blocks Airflow: a hook only puts the event into a bounded queue and returns; one
background thread per process sends. The thread never dies of an error: a failed write, an
unreadable graph blob or a bug is logged in one line (once per change) and retried with
capped backoff, and a thread that ended anyway is started again by the next event. When
etcd is slow or down the queue fills and new events are dropped and counted (one warning a
minute at most); once etcd (or the graph) has failed for `RECONCILER_EVENTS_DOWN_AFTER`
seconds, events are refused at once (`submit` says so) until a probe reads etcd again.
HTTP timeouts are short. A task process flushes what it queued when it exits, for at most
`RECONCILER_EVENTS_FLUSH_TIMEOUT` seconds, and not at all while the sender is down. It
never raises into Airflow.

It writes only for DAGs of the synced graph: the thread reads `desired/head` and the graph
blob it names (`desired/graphs/<commit>`, gzip JSON `{"pipelines": {name: {"dag_id", ...}},
"deployments": {name: {..., "default"}}}`), caches what it lets this plugin write and reads
it again every `RECONCILER_EVENTS_GRAPH_REFRESH` seconds (a large graph is a manifest and
numbered parts `desired/graphs/<commit>/<n>`: joined, checked).

Deployments (docs/design.md, section 13): one graph may span several Airflows. This plugin
is deployment `RECONCILER_DEPLOYMENT` (unset: the graph's default deployment) and writes
only for the dag_ids of that deployment's pipelines (a DAG with the same dag_id in another
deployment is not this Airflow's business). A graph without `deployments` has one, the
implicit `default`: every pipeline, as before. The default deployment's plugin (unset, or
naming the graph's default: the declared one with `"default": true`, `default` when none is
declared) writes `events/<dag_id>/<run_id>`, byte for byte as before; any other deployment
D's writes `events/@<D>/<dag_id>/<run_id>`, with the dag_id as Airflow knows it (not the
pipeline's name: the reconciler maps (D, dag_id) back to it). A deployment the graph does
not have (or, unset, a graph that declares no default) writes nothing and says so in one
warning line per graph. A value that is not a deployment name (letters, digits, _ -, at
most 63) disables the plugin, in one warning line when it is loaded.

Configuration, the reconciler's own variables (unset RECONCILER_ETCD_ENDPOINTS: the plugin
does nothing):

    RECONCILER_ETCD_ENDPOINTS   host:port[,host:port] (or http(s)://host:port); in order,
                                failing over to the next
    RECONCILER_ETCD_PREFIX, RECONCILER_NAMESPACE        default reconciler, default
    RECONCILER_ETCD_USER, RECONCILER_ETCD_PASSWORD      etcd auth (a token per process)
    RECONCILER_ETCD_CA, RECONCILER_ETCD_CERT, RECONCILER_ETCD_KEY   TLS (https to etcd)
    RECONCILER_DEPLOYMENT       the deployment this Airflow is (a name of the graph's
                                `deployments`); unset: the default deployment

and its own: RECONCILER_EVENTS_TTL (600 s), RECONCILER_EVENTS_TIMEOUT (1 s per HTTP
request), RECONCILER_EVENTS_QUEUE (1000 events), RECONCILER_EVENTS_GRAPH_REFRESH (30 s),
RECONCILER_EVENTS_TASKS (true: task-level events too), RECONCILER_EVENTS_FLUSH_TIMEOUT
(2 s), RECONCILER_EVENTS_DOWN_AFTER (10 s), RECONCILER_EVENTS_RETRY_MAX (5 s, the longest
wait between retries). Older names still read: RECONCILER_EVENTS_ETCD_URL (one endpoint URL) and
RECONCILER_EVENTS_PREFIX (the namespace root, e.g. /reconciler/default/).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import gzip
import hashlib
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("reconciler.plugin")

DEFAULT_DEPLOYMENT = "default"
"""The implicit deployment of a graph that declares none (core/graph.py)."""

DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
"""A deployment's name (schemas/deployment.schema.json), for RECONCILER_DEPLOYMENT."""

PARTS_MAGIC = b"reconciler-parts/1\n"
"""The first bytes of a graph value that is a manifest of parts (adapters/store.py)."""

_STOP: dict[str, Any] = {}
"""Put into the queue by stop(): the thread ends."""

DROP_LOG_INTERVAL = 60.0
"""Seconds between two warnings about dropped events (the counter counts every one)."""


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Config:
    endpoints: tuple[str, ...]
    """Base URLs, e.g. ``http://127.0.0.1:2379``, in the order they are tried."""
    root: str = "/reconciler/default/"
    user: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    ttl: int = 600
    timeout: float = 1.0
    queue_size: int = 1000
    graph_refresh: float = 30.0
    tasks: bool = True
    flush_timeout: float = 2.0
    down_after: float = 10.0
    """Seconds of failing etcd (or an unreadable graph) after which events are refused."""
    retry_max: float = 5.0
    """The longest wait between two retries."""
    deployment: str | None = None
    """The deployment this Airflow is (RECONCILER_DEPLOYMENT); None: the default one."""

    def __repr__(self) -> str:  # never the password
        return (f"Config(endpoints={self.endpoints!r}, root={self.root!r}, "
                f"user={self.user!r}, tls={self.tls}, deployment={self.deployment!r})")

    @property
    def problem(self) -> str | None:
        """Why the listener cannot run with these settings (then it is disabled), or None."""
        if self.deployment is not None and not DEPLOYMENT_NAME.fullmatch(self.deployment):
            return (f"RECONCILER_DEPLOYMENT={self.deployment[:80]!r} is not a deployment "
                    f"name (letters, digits, _ and -, at most 63)")
        return None

    @property
    def tls(self) -> bool:
        return any(e.startswith("https://") for e in self.endpoints)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config | None:
        """The settings from the environment; None when no etcd endpoint is configured."""
        env = os.environ if env is None else env
        ca, cert = env.get("RECONCILER_ETCD_CA") or None, env.get("RECONCILER_ETCD_CERT") or None
        raw = env.get("RECONCILER_ETCD_ENDPOINTS") or env.get("RECONCILER_EVENTS_ETCD_URL") or ""
        endpoints = tuple(_endpoint_url(e, tls=bool(ca or cert))
                          for e in raw.split(",") if e.strip())
        if not endpoints:
            return None
        root = env.get("RECONCILER_EVENTS_PREFIX") or (
            f"/{env.get('RECONCILER_ETCD_PREFIX', 'reconciler').strip('/')}/"
            f"{env.get('RECONCILER_NAMESPACE', 'default').strip('/')}/")
        return cls(
            endpoints=endpoints, root="/" + root.strip("/") + "/",
            user=env.get("RECONCILER_ETCD_USER") or None,
            password=env.get("RECONCILER_ETCD_PASSWORD"),
            ca=ca, cert=cert, key=env.get("RECONCILER_ETCD_KEY") or None,
            ttl=int(env.get("RECONCILER_EVENTS_TTL", "600")),
            timeout=float(env.get("RECONCILER_EVENTS_TIMEOUT", "1")),
            queue_size=int(env.get("RECONCILER_EVENTS_QUEUE", "1000")),
            graph_refresh=float(env.get("RECONCILER_EVENTS_GRAPH_REFRESH", "30")),
            tasks=_flag(env.get("RECONCILER_EVENTS_TASKS", "true")),
            flush_timeout=float(env.get("RECONCILER_EVENTS_FLUSH_TIMEOUT", "2")),
            down_after=float(env.get("RECONCILER_EVENTS_DOWN_AFTER", "10")),
            retry_max=float(env.get("RECONCILER_EVENTS_RETRY_MAX", "5")),
            deployment=env.get("RECONCILER_DEPLOYMENT") or None)


def _endpoint_url(text: str, *, tls: bool) -> str:
    text = text.strip().rstrip("/")
    if text.startswith(("http://", "https://")):
        return text
    return f"{'https' if tls else 'http'}://{text}"


class GatewayError(Exception):
    """etcd's JSON gateway could not be used (unreachable, refused, bad answer)."""


class Gateway:
    """A minimal client of etcd's v3 JSON gateway: range, put, lease grant, with auth and
    TLS, failing over between endpoints. Never through a proxy of the environment."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._current = 0
        self._token: str | None = None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if config.tls:
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def _ssl_context(self) -> ssl.SSLContext:
        c = self.config
        context = ssl.create_default_context(cafile=c.ca)
        if c.cert:
            context.load_cert_chain(c.cert, c.key)
        return context

    def _send(self, base: str, path: str, body: Mapping[str, Any], token: str | None) -> Any:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        if token:
            request.add_header("Authorization", token)
        with self._opener.open(request, timeout=self.config.timeout) as response:
            return json.loads(response.read() or b"{}")

    def call(self, path: str, body: Mapping[str, Any], *, auth: bool = True) -> Any:
        """POST `body` to `path` on the first endpoint that answers; one new token on a 401."""
        endpoints = self.config.endpoints
        last = "no endpoint"
        for step in range(len(endpoints)):
            index = (self._current + step) % len(endpoints)
            base = endpoints[index]
            try:
                token = self._auth_token(base) if auth else None
                try:
                    answer = self._send(base, path, body, token)
                except urllib.error.HTTPError as exc:
                    if exc.code != 401 or not token:
                        raise
                    self._token = None  # expired (etcd's simple tokens do): one new one
                    answer = self._send(base, path, body, self._auth_token(base))
                self._current = index
                return answer
            except urllib.error.HTTPError as exc:
                detail = exc.read(300).decode(errors="replace")
                raise GatewayError(f"etcd at {base} answered {exc.code} to {path}: "
                                   f"{detail}") from None
            except (OSError, ValueError) as exc:  # refused, timeout, TLS, not JSON
                last = f"{base}: {exc}"
        raise GatewayError(f"etcd unreachable ({last})")

    def _auth_token(self, base: str) -> str | None:
        c = self.config
        if c.user is None:
            return None
        if self._token is None:
            try:
                answer = self._send(base, "/v3/auth/authenticate",
                                    {"name": c.user, "password": c.password or ""}, None)
            except urllib.error.HTTPError as exc:
                raise GatewayError(f"etcd at {base} refused user {c.user!r} "
                                   f"(HTTP {exc.code})") from None
            self._token = str(answer.get("token") or "") or None
        return self._token

    def get(self, key: str) -> bytes | None:
        answer = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def range(self, key: str, range_end: str | None = None, *, keys_only: bool = False,
              limit: int = 0) -> list[tuple[str, bytes]]:
        """The (key, value) pairs of [key, range_end) in key order (the UI's reads; values
        empty with `keys_only`); at most `limit` of them (0: all)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if keys_only:
            body["keys_only"] = True
        if limit:
            body["limit"] = limit
        answer = self.call("/v3/kv/range", body)
        return [(base64.b64decode(kv.get("key", "")).decode(errors="replace"),
                 base64.b64decode(kv.get("value", ""))) for kv in answer.get("kvs") or []]

    def grant(self, ttl: int) -> str:
        return str(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def put(self, key: str, value: bytes, lease: str | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self.call("/v3/kv/put", body)


class GraphUnreadable(ValueError):
    """The synced head or graph blob cannot be decoded (truncated, not gzip, not a graph)."""


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (its last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode(errors="surrogateescape")


def graph_dag_ids(gateway: Gateway, root: str) -> frozenset[str]:
    """The pipelines of the graph `desired/head` names: the keys of its `pipelines` map,
    their names, which are their DAG ids in a graph without deployments (empty when
    nothing is synced). What this plugin writes for: event_scope.

    Raises GatewayError (etcd) or GraphUnreadable (whatever is wrong with the stored
    values: a truncated gzip, a bad deflate stream, JSON that is not a graph)."""
    return frozenset(read_graph(gateway, root)[1])


def read_head(gateway: Gateway, root: str) -> dict[str, Any] | None:
    """The head record `desired/head` holds (None when nothing is synced); GraphUnreadable
    when it is not one."""
    head_raw = gateway.get(f"{root}desired/head")
    if head_raw is None:
        return None
    try:
        head = json.loads(head_raw)
        commit = head["commit"]
    except (ValueError, TypeError, KeyError) as exc:
        raise GraphUnreadable(f"desired/head is not a head record ({_why(exc)})") from None
    if not isinstance(commit, str) or not commit:
        raise GraphUnreadable(f"desired/head names no commit ({commit!r})")
    return dict(head)


def read_graph(gateway: Gateway, root: str, head: dict[str, Any] | None = None,
               ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The head record and the pipelines ({dag_id: pipeline}) of the graph it names:
    (None, {}) when nothing is synced. `head`: one already read.

    Raises GatewayError (etcd) or GraphUnreadable (whatever is wrong with the stored
    values: a truncated gzip, a bad deflate stream, JSON that is not a graph)."""
    head, graph = read_graph_document(gateway, root, head)
    return head, graph["pipelines"]


def read_graph_document(gateway: Gateway, root: str, head: dict[str, Any] | None = None,
                        ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The head record and the whole graph it names, `pipelines` ({name: pipeline}, each
    a dict) and `deployments` ({name: declaration}, {} when the graph declares none):
    (None, an empty graph) when nothing is synced. Raises what read_graph raises."""
    head = read_head(gateway, root) if head is None else head
    if head is None:
        return None, {"pipelines": {}, "deployments": {}}
    commit = head["commit"]
    blob = gateway.get(f"{root}desired/graphs/{commit}")
    if blob is None:
        return head, {"pipelines": {}, "deployments": {}}
    if blob.startswith(PARTS_MAGIC):  # a large graph: a manifest and numbered parts
        try:
            manifest = json.loads(blob[len(PARTS_MAGIC):])
            count = int(manifest["parts"])
        except (ValueError, TypeError, KeyError) as exc:
            raise GraphUnreadable(f"the manifest of the graph of {commit} is unreadable "
                                  f"({_why(exc)})") from None
        parts = [gateway.get(f"{root}desired/graphs/{commit}/{n:06d}") for n in range(count)]
        if any(p is None for p in parts):
            raise GraphUnreadable(f"a part of the graph of {commit} is missing")
        blob = b"".join(p for p in parts if p is not None)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        if manifest.get("digest") and manifest["digest"] != digest:
            raise GraphUnreadable(f"the parts of the graph of {commit} do not match its digest")
    try:
        graph = json.loads(gzip.decompress(blob))
    except (OSError, EOFError, zlib.error, ValueError) as exc:  # BadGzipFile is an OSError
        raise GraphUnreadable(f"the graph of {commit} is not gzip JSON ({_why(exc)})") from None
    pipelines = graph.get("pipelines") if isinstance(graph, dict) else None
    if not isinstance(pipelines, dict):
        raise GraphUnreadable(f"the graph of {commit} is not a graph (no pipelines mapping)")
    deployments = graph.get("deployments") or {}
    if not isinstance(deployments, dict):
        raise GraphUnreadable(f"the graph of {commit} is not a graph (its deployments are "
                              f"not a mapping)")
    return head, {
        "pipelines": {str(d): p if isinstance(p, dict) else {} for d, p in pipelines.items()},
        "deployments": {str(d): v if isinstance(v, dict) else {}
                        for d, v in deployments.items()}}


@dataclass(frozen=True)
class Scope:
    """What this plugin writes while one graph is synced: events of `dag_ids` only (the
    DAG ids of this deployment's pipelines, as Airflow knows them), under
    `<root><prefix><dag_id>/<run_id>`. `problem`: why nothing is written (logged once per
    graph)."""

    dag_ids: frozenset[str]
    prefix: str = "events/"
    problem: str | None = None


def event_scope(graph: Mapping[str, Any], deployment: str | None,
                commit: str | None = None) -> Scope:
    """The scope of the plugin of `deployment` (None: RECONCILER_DEPLOYMENT unset, the
    default deployment) in `graph` (as read_graph_document returns it).

    A graph without deployments has one, the implicit DEFAULT_DEPLOYMENT: every pipeline
    is in it, its dag_id is its name. With deployments, the default is the declared one
    with `"default": true` (maybe none), and a pipeline's deployment is its resolved
    `deployment` (missing: the default). The default deployment's plugin writes
    `events/<dag_id>/<run_id>`; deployment D's, `events/@<D>/<dag_id>/<run_id>`. A
    deployment the graph does not have (or, unset, a graph without a default) writes
    nothing."""
    pipelines: Mapping[str, Any] = graph.get("pipelines") or {}
    declared: Mapping[str, Any] = graph.get("deployments") or {}
    if declared:
        default = next((name for name, d in sorted(declared.items())
                        if isinstance(d, dict) and d.get("default") is True), None)
    else:
        default = DEFAULT_DEPLOYMENT
    mine = default if deployment is None else deployment
    where = f"the graph of {commit}" if commit else "the synced graph"
    if mine is None:
        return Scope(frozenset(), problem=(
            f"RECONCILER_DEPLOYMENT is unset and {where} declares no default deployment: "
            f"no events are written (set it to the deployment this Airflow is, one of "
            f"{', '.join(sorted(declared))})"))
    if mine not in (declared or {DEFAULT_DEPLOYMENT: {}}):
        known = ", ".join(sorted(declared)) if declared else \
            f"none declared, only the implicit {DEFAULT_DEPLOYMENT!r}"
        return Scope(frozenset(), problem=(
            f"RECONCILER_DEPLOYMENT={mine!r} is not a deployment of {where} ({known}): no "
            f"events are written"))
    dag_ids = set()
    for name, pipeline in pipelines.items():
        dag_id = pipeline.get("dag_id")
        dag_id = dag_id if isinstance(dag_id, str) and dag_id else name
        if (pipeline.get("deployment") or default) == mine:
            dag_ids.add(dag_id)
    return Scope(frozenset(dag_ids), "events/" if mine == default else f"events/@{mine}/")


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _BadEvent(Exception):
    """An event without the fields a key is made of: dropped, never retried."""


class Sender:
    """The bounded queue and its one sender thread (started on the first event, again in
    a forked child, and again should it ever have ended). `submit` never blocks and says
    whether the event can be sent; `flush` waits a bounded time.

    The thread never dies of an error: a failed write, an unreadable graph or a bug is
    logged in one line (once per change) and retried with capped backoff. An event is
    retried for at most `down_after` seconds; once etcd (or the graph) has failed for that
    long the sender is down: `submit` refuses events at once (False, counted) and `flush`
    does not wait, while the thread probes etcd with backoff and takes events again as soon
    as a read succeeds."""

    def __init__(self, config: Config, gateway: Gateway | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.gateway = gateway or Gateway(config)
        self.clock = clock
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A forked child (a task process) has no sender thread and maybe a lock that
            # the parent's thread held: it starts afresh.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=self.config.queue_size)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.dropped = 0
        """Events refused by submit (queue full, sender down or not running)."""
        self.sent = 0
        self.skipped = 0
        """Events of DAGs that are not in the synced graph."""
        self.failed = 0
        """Events taken from the queue that could not be written (given up)."""
        self.restarts = 0
        """Times the thread was found ended and started again."""
        self._last_drop_log: float | None = None
        self._last_error: str | None = None
        self._scope: Scope | None = None
        """What the graph read last lets this plugin write (None: not read yet)."""
        self._scope_at = 0.0
        self._lease: tuple[str, float] | None = None
        self._failing_since: float | None = None
        """clock() of the first failure since the last success (None: working)."""
        self._failures = 0
        self._pending: dict[str, Any] | None = None
        """The event the thread is retrying, and since when."""
        self._pending_since = 0.0
        self._atexit_registered = False
        self._exit_flushed = False

    # --- the hook side: never blocks ----------------------------------------------------

    @property
    def alive(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    @property
    def down(self) -> bool:
        """etcd (or the graph) has failed for at least `down_after` seconds."""
        since = self._failing_since
        return since is not None and self.clock() - since >= self.config.down_after

    def submit(self, event: dict[str, Any]) -> bool:
        """Queue one event; True when it is queued to be sent. False (counted, logged at
        most once a minute, never blocking) when it cannot be: the sender is stopped or
        cannot start its thread, etcd or the graph has failed for `down_after` seconds, or
        the queue is full."""
        if not self._ensure_thread():
            self._drop("the sender thread is not running")
            return False
        if self.down:
            self._drop(f"etcd at {','.join(self.config.endpoints)} failing for "
                       f"{self.clock() - (self._failing_since or 0):.0f} s: {self._last_error}")
            return False
        try:
            self.queue.put_nowait(event)
            return True
        except queue.Full:
            self._drop(f"queue of {self.config.queue_size} full: etcd at "
                       f"{','.join(self.config.endpoints)} slow or down")
            return False

    def _drop(self, why: str) -> None:
        with self.lock:
            self.dropped += 1
            now = self.clock()
            if self._last_drop_log is not None and \
                    now - self._last_drop_log < DROP_LOG_INTERVAL:
                return
            self._last_drop_log = now
            dropped = self.dropped
        log.warning("reconciler events: %d dropped so far (%s); the reconciler still polls "
                    "Airflow", dropped, why)

    def _ensure_thread(self) -> bool:
        """Start the thread if it is not running (first event, a forked child, or a thread
        that ended); False when stopped or when no thread can be started."""
        if self.alive:
            return True
        with self.lock:
            if self.alive:
                return True
            if self.stopping.is_set():
                return False
            if self.thread is not None:
                self.restarts += 1
                log.warning("reconciler events: the sender thread had ended; started again")
            thread = threading.Thread(target=self._run, name="reconciler-events", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread": out of threads
                self.thread = None
                self._note_error(f"cannot start the sender thread: {_why(exc)}")
                return False
            self.thread = thread
            if not self._atexit_registered:
                # Registered in this process (after a fork: after Airflow's atexit reset).
                atexit.register(self._flush_at_exit)
                self._atexit_registered = True
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was handled, at most `timeout` seconds (default:
        the config's flush timeout), and not at all while nothing can move (the thread is
        not running, or the sender is down). True when the queue is empty."""
        deadline = time.monotonic() + (self.config.flush_timeout if timeout is None
                                       else timeout)
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            if not self.alive or self.down:
                break
            time.sleep(0.01)
        return not self.queue.unfinished_tasks

    def _flush_at_exit(self) -> None:
        # Once per process, however often it was registered: a task never waits longer
        # than one flush timeout at exit.
        if not self._exit_flushed:
            self._exit_flushed = True
            self.flush()

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_STOP)  # wakes the thread now, not at its next timeout
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    # --- the thread side ----------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                if not self._step():
                    return
            except Exception as exc:  # a bug must not end the thread: log, back off, go on
                self._retry_later(f"unexpected {_why(exc)}")

    def _step(self) -> bool:
        """One event, one retry or one idle round; False once told to stop."""
        if self._pending is None:
            try:
                event = self.queue.get(timeout=self._idle_timeout())
            except queue.Empty:
                self._idle()
                return True
            if event is _STOP:
                self.queue.task_done()
                return False
            if self.down:  # refused by submit from now on; drained without waiting
                self._finish(failed=True)
                return True
            self._pending, self._pending_since = event, self.clock()
        try:
            self._send(self._pending)
        except (GatewayError, GraphUnreadable) as exc:
            self._retry_later(str(exc))
            return True
        except _BadEvent as exc:
            self._note_error(str(exc))
            self._finish(failed=True)
            return True
        self._finish()
        return True

    def _retry_later(self, message: str) -> None:
        """Log the failure (once per change), give the event up once it has been retried
        for `down_after` seconds (the reconciler still polls Airflow), back off."""
        self._fail(message)
        if self._pending is not None and (
                self.down or self.clock() - self._pending_since >= self.config.down_after):
            self._finish(failed=True)
        self._backoff()

    def _finish(self, *, failed: bool = False) -> None:
        if failed:
            self.failed += 1
        self._pending = None
        self.queue.task_done()

    def _idle_timeout(self) -> float:
        if self._failing_since is not None:
            return self._delay()  # the next probe
        return min(1.0, self.config.graph_refresh)

    def _idle(self) -> None:
        if self._failing_since is not None:
            self._probe()
        elif self._scope is not None and self._graph_stale():
            self._refresh_graph()

    def _probe(self) -> None:
        """While failing: one read of the graph; events are taken again once it works."""
        try:
            self._read_scope()
        except (GatewayError, GraphUnreadable) as exc:
            self._fail(str(exc))
            return
        self._ok()

    def _delay(self) -> float:
        return min(self.config.retry_max, 0.05 * 2 ** min(self._failures, 16))

    def _backoff(self) -> None:
        self.stopping.wait(self._delay())

    def _fail(self, message: str) -> None:
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = self.clock()
        self._note_error(message)

    def _ok(self) -> None:
        if self._failing_since is not None:
            log.info("reconciler events: etcd works again")
            self._last_error = None
        self._failing_since = None
        self._failures = 0

    def _graph_stale(self) -> bool:
        return self.clock() - self._scope_at >= self.config.graph_refresh

    def _read_scope(self) -> Scope:
        """Read the graph and keep what it lets this plugin write; a problem (this
        deployment is not in it) is logged once per graph, never per event."""
        head, graph = read_graph_document(self.gateway, self.config.root)
        if head is None or not (graph["pipelines"] or graph["deployments"]):
            scope = Scope(frozenset())  # nothing synced (yet): nothing to say
        else:
            scope = event_scope(graph, self.config.deployment, head["commit"])
        previous = self._scope.problem if self._scope is not None else None
        if scope.problem is not None and scope.problem != previous:
            self._note_error(scope.problem)
        self._scope, self._scope_at = scope, self.clock()
        return scope

    def _refresh_graph(self) -> Scope:
        """What the graph lets this plugin write, read again. An unreadable graph keeps
        the last one read (logged once); without any, GatewayError or GraphUnreadable is
        raised."""
        try:
            return self._read_scope()
        except (GatewayError, GraphUnreadable) as exc:
            if self._scope is None:
                raise
            self._note_error(f"cannot read the graph; the last one read is used: {exc}")
        self._scope_at = self.clock()
        return self._scope

    def handle(self, event: dict[str, Any]) -> bool:
        """One attempt to write one event if its DAG is in the graph: True when written,
        False when skipped or failed (counted, logged once per change)."""
        try:
            return self._send(event)
        except (GatewayError, GraphUnreadable, _BadEvent) as exc:
            self.failed += 1
            if isinstance(exc, _BadEvent):
                self._note_error(str(exc))
            else:
                self._fail(str(exc))
            return False

    def _send(self, event: dict[str, Any]) -> bool:
        """Write one event; False when its DAG is not one of this deployment's in the
        graph. Raises GatewayError or GraphUnreadable (retried) and _BadEvent (not)."""
        try:
            dag_id, run_id = str(event["dag_id"]), str(event["run_id"])
        except (KeyError, TypeError) as exc:
            raise _BadEvent(f"an event without dag_id and run_id was dropped ({_why(exc)})"
                            ) from None
        scope = self._scope if self._scope is not None and not self._graph_stale() \
            else self._refresh_graph()
        if dag_id not in scope.dag_ids or "/" in dag_id or "/" in run_id:
            self.skipped += 1
            return False
        key = f"{self.config.root}{scope.prefix}{dag_id}/{run_id}"
        try:
            self.gateway.put(key, json.dumps(event, sort_keys=True).encode(), self._lease_id())
        except GatewayError:
            self._lease = None
            raise
        self.sent += 1
        self._ok()
        return True

    def _lease_id(self) -> str:
        """One lease for many events: a new one when half of its TTL is gone, so an
        event key lives between TTL/2 and TTL and a busy scheduler grants few leases."""
        now = self.clock()
        if self._lease is None or now - self._lease[1] >= self.config.ttl / 2:
            self._lease = (self.gateway.grant(self.config.ttl), now)
        return self._lease[0]

    def _note_error(self, message: str) -> None:
        message = " ".join(message.split())  # one line, whatever etcd answered
        if message != self._last_error:  # once per change, not per event
            log.warning("reconciler events: %s", message)
        self._last_error = message


# --- the Airflow side ------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).isoformat()


def run_event(dag_run: Any, state: str) -> dict[str, Any]:
    return {"kind": "run", "dag_id": dag_run.dag_id, "run_id": dag_run.run_id,
            "state": state, "at": _now()}


def task_event(task_instance: Any, state: str) -> dict[str, Any]:
    return {"kind": "task", "dag_id": task_instance.dag_id, "run_id": task_instance.run_id,
            "task_id": task_instance.task_id,
            "map_index": getattr(task_instance, "map_index", -1),
            "try_number": getattr(task_instance, "try_number", None),
            "state": state, "at": _now()}


_sender: Sender | None = None
_sender_lock = threading.Lock()
_disabled: str | None = None
"""Why the plugin does nothing in this process: a bad setting (logged once, at load)."""


def load_config(env: Mapping[str, str] | None = None) -> Config | None:
    """The settings (Config.from_env), or None when not configured or when a setting is
    bad: then the plugin is disabled in this process, said in one warning line, once."""
    global _disabled
    if _disabled is not None:
        return None
    try:
        config = Config.from_env(env)
        problem = config.problem if config is not None else None
    except ValueError as exc:  # a number that is none
        config, problem = None, f"a setting is not a number ({_why(exc)})"
    if problem is not None:
        _disabled = " ".join(problem.split())
        log.warning("reconciler events: the plugin is disabled: %s", _disabled)
        return None
    return config


def sender() -> Sender | None:
    """The process's sender, made on first use from the environment (None: not set up,
    or disabled by a bad setting)."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                config = load_config()
                if config is None:
                    return None
                _sender = Sender(config)
    return _sender


with contextlib.suppress(Exception):  # at load: a bad setting is said now, in one line
    load_config()


def _emit(make: Callable[[], dict[str, Any]], *, task: bool = False,
          flush: bool = False) -> None:
    try:
        s = sender()
        if s is not None and (s.config.tasks or not task):
            s.submit(make())
            if flush:
                s.flush()
    except Exception as exc:  # a wake-up is an optimisation: never fail Airflow
        log.warning("reconciler events: event not queued: %s", exc)


def _hookimpl(fn: Callable[..., None]) -> Callable[..., None]:
    return fn


# Airflow 2 and 3 alike: `hookimpl` from airflow.listeners (2.x has no airflow.sdk; nothing
# here imports it). Airflow passes hook arguments by name and each hook below takes only
# the ones every version has (pluggy refuses an argument the running version's spec
# lacks, e.g. `error` of on_task_instance_failed before 2.10), so one file serves 2.5+
# and 3.x (2.3 and 2.4: task hooks only).
try:
    from airflow import __version__ as _airflow_version
    from airflow.listeners import hookimpl as _airflow_hookimpl
    from airflow.plugins_manager import AirflowPlugin as _AirflowPlugin
except ImportError:  # outside Airflow: the sender alone (tests, tools)
    _airflow_hookimpl, _AirflowPlugin, _airflow_version = _hookimpl, None, ""

FLUSH_IN_TASK_HOOKS = str(_airflow_version).startswith("2.")
"""Airflow 2 runs a task in a forked process that ends with os._exit(): atexit (where the
queue is flushed on Airflow 3) never runs there, so a task hook waits for its own event to
be sent, at most RECONCILER_EVENTS_FLUSH_TIMEOUT seconds (milliseconds with etcd up)."""


class Listener:
    """The hooks. Each only queues an event: never blocks (on Airflow 2 a task hook waits
    a bounded time for its event to be sent: FLUSH_IN_TASK_HOOKS), never raises.

    Airflow 2: the task hooks exist from 2.3, the dag-run hooks from 2.5 (before that
    only task events are written); `on_task_instance_skipped` is Airflow 3's (an unknown
    hook is never called). An EmptyOperator task fires no task hook on 2.x: the scheduler
    marks it done without running it."""

    @_airflow_hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        _emit(lambda: run_event(dag_run, "success"))

    @_airflow_hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        _emit(lambda: run_event(dag_run, "failed"))

    @_airflow_hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        _emit(lambda: task_event(task_instance, "success"), task=True,
              flush=FLUSH_IN_TASK_HOOKS)

    @_airflow_hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any,
                                error: Any = None) -> None:
        # `error` has a default, so pluggy neither checks nor passes it: 2.3-2.9 lack it.
        _emit(lambda: task_event(task_instance, "failed"), task=True,
              flush=FLUSH_IN_TASK_HOOKS)

    @_airflow_hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        _emit(lambda: task_event(task_instance, "skipped"), task=True)


listener = Listener()

if _AirflowPlugin is not None:
    # Built with type() so the module also imports without Airflow; Airflow finds it
    # among the module's attributes (a drop-in) or through the entry point.
    ReconcilerEventsPlugin = type("ReconcilerEventsPlugin", (_AirflowPlugin,), {
        "name": "reconciler_events",
        "listeners": [listener],
        "__doc__": "Writes run and task ends of the synced graph's DAGs into etcd.",
    })
