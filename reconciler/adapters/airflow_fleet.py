"""Several Airflow deployments as one Airflow API, addressed by pipeline name.

The loop plans on pipeline names (docs/design.md section 13): a name is stable when a
pipeline moves, its `(deployment, dag_id)` is where it runs now. `AirflowFleet` is the one
place that knows the difference. It routes each call of a pipeline to its deployment's
client with the Airflow `dag_id`, and gives every answer back under the pipeline's name,
so the core, the ledger and the executor stay as they are.

Clients are made on first use, one per declared deployment (`connect`, which asks the
server its API generation and reads the credentials from where the declaration says). A
graph that declares nothing runs everything in the implicit `default` deployment, whose
client is the reconciler's own settings (RECONCILER_AIRFLOW_*): exactly as before.

A deployment that cannot be reached, or refuses the credentials, must hold back only its
own pipelines: the observer lists each deployment on its own (`groups`, `iter_runs_of`),
all at once, so it can go on with the others (observer.py).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from reconciler.core.errors import ConfigError
from reconciler.core.graph import DEFAULT_DEPLOYMENT, Deployment, Graph
from reconciler.core.settings import AirflowSettings

Connect = Callable[[Deployment], Any]
"""A client for a declared deployment (raises a ReconcilerError when it cannot make one:
DeploymentUnusable, or the AirflowUnavailable of a server that does not answer)."""


class DeploymentUnusable(ConfigError):
    """No client can be made for a deployment: it is not declared, or its credentials are
    not where its declaration says. A human must act; its message names the deployment.
    (A deployment that does not answer raises the client's own AirflowUnavailable.)"""

    def __init__(self, deployment: str, why: str) -> None:
        super().__init__(f"deployment {deployment}: {why}")
        self.deployment = deployment


class AirflowFleet:
    """The Airflow API of the loop (service/ports.py `AirflowApi`) over every deployment
    of the synced graph. Thread-safe as its clients are: routing tables are replaced
    whole (`configure`), never changed in place."""

    def __init__(self, default: Any, connect: Connect | None = None) -> None:
        self.default = default
        """The client of the reconciler's settings: the implicit `default` deployment."""
        self.connect = connect
        self._clients: dict[str, Any] = {DEFAULT_DEPLOYMENT: default}
        self._declared: dict[str, Deployment] = {}
        self._route: dict[str, tuple[str, str]] = {}
        """pipeline name -> (deployment, dag_id)"""
        self._names: dict[tuple[str, str], str] = {}
        """(deployment, dag_id) -> pipeline name"""
        self._graph: Graph | None = None
        self._in_use: tuple[str, ...] = ()
        self._seen_in: dict[tuple[str, str], tuple[str, str]] = {}
        """(name, run_id) -> (deployment, dag_id) of a moved pipeline's run listed in the
        deployment it left: a clear or a read of that run goes there."""
        self._lock = threading.Lock()
        self._retired_requests = 0
        self._alias_memo: dict[str, tuple[list[str], Graph | None, dict[str, str],
                                          frozenset[str]]] = {}
        self._groups_memo: tuple[frozenset[str], Graph | None, dict[str, list[str]]] | None \
            = None

    # --- routing ----------------------------------------------------------------------

    def configure(self, graph: Graph) -> None:
        """Route by this graph (a new synced head). A deployment whose declaration
        changed gets a new client on its next call."""
        if graph is self._graph:
            return
        route: dict[str, tuple[str, str]] = {}
        names: dict[tuple[str, str], str] = {}
        for name, pipeline in graph.pipelines.items():
            where = (graph.deployment_of(name), pipeline.dag_id)
            route[name] = where
            names[where] = name
        with self._lock:
            for old, declaration in self._declared.items():
                if graph.deployments.get(old) != declaration:
                    self._retire(old)
            self._declared = dict(graph.deployments)
            if not graph.deployments:
                self._clients[DEFAULT_DEPLOYMENT] = self.default
            elif DEFAULT_DEPLOYMENT not in graph.deployments and \
                    self._clients.get(DEFAULT_DEPLOYMENT) is self.default:
                # `default` is now a name like any other: no longer the settings' Airflow.
                self._retire(DEFAULT_DEPLOYMENT)
            self._route, self._names, self._graph = route, names, graph
            self._in_use = tuple(sorted({d for d, _ in route.values()}))

    def _retire(self, deployment: str) -> None:
        client = self._clients.pop(deployment, None)
        if client is not None:
            self._retired_requests += getattr(client, "request_count", 0)

    @property
    def declares(self) -> bool:
        """Whether the graph declares deployments (else all is the implicit default)."""
        return bool(self._declared)

    def where_run(self, name: str, run_id: str) -> tuple[str, str]:
        """(deployment, dag_id) of one run: where it was listed, if the pipeline moved
        since, else where the pipeline runs now."""
        return self._seen_in.get((name, run_id)) or self.where(name)

    def where(self, name: str) -> tuple[str, str]:
        """(deployment, dag_id) of a pipeline; a name not in the graph is a dag_id of the
        default deployment (`plan` on an older graph, a test's hand-made action)."""
        found = self._route.get(name)
        if found is not None:
            return found
        graph = self._graph
        default = graph.default_deployment if graph is not None else None
        return default or DEFAULT_DEPLOYMENT, name

    def name_of(self, deployment: str, dag_id: str) -> str | None:
        """The pipeline that is `dag_id` in `deployment`, if the graph has one."""
        name = self._names.get((deployment, dag_id))
        if name is None and not self._names and deployment == DEFAULT_DEPLOYMENT:
            return dag_id  # no graph yet: names are dag ids
        return name

    def deployment_names(self) -> list[str]:
        """Every deployment the graph runs pipelines in."""
        return list(self._in_use)

    def groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """`names` by the deployment each runs in. The observer asks with the same
        frozenset on every pass: its answer is kept for the graph (the lists are then the
        same objects, so `_aliases` keeps its own too)."""
        graph, memo = self._graph, self._groups_memo
        if memo is not None and memo[0] is names and memo[1] is graph:
            return memo[2]
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.where(name)[0], []).append(name)
        if isinstance(names, frozenset):
            self._groups_memo = (names, graph, out)
        return out

    def client(self, deployment: str) -> Any:
        """The deployment's client, made on first use."""
        with self._lock:
            found = self._clients.get(deployment)
            declaration = self._declared.get(deployment)
        if found is not None:
            return found
        if declaration is None or self.connect is None:
            raise DeploymentUnusable(deployment, "not declared in the synced graph's "
                                     "airflow-deployments/")
        made = self.connect(declaration)
        with self._lock:
            if self._declared.get(deployment) is declaration:
                return self._clients.setdefault(deployment, made)
        return made

    # --- the AirflowApi of the loop -----------------------------------------------------

    def _call(self, deployment: str, call: Callable[[Any], Any]) -> Any:
        # The client's own errors pass through unwrapped: their class decides retry,
        # backoff and readiness (core/errors.py); the observer names the deployment.
        return call(self.client(deployment))

    def _named(self, deployment: str, item: Any) -> Any:
        """An answer of `deployment` with the pipeline's name as its dag_id."""
        if isinstance(item, dict):
            name = self.name_of(deployment, str(item.get("dag_id")))
            if name is not None:
                item["dag_id"] = name
        return item

    @staticmethod
    def _as(name: str, item: Any) -> Any:
        """An answer about pipeline `name`'s run, under that name."""
        if isinstance(item, dict):
            item["dag_id"] = name
        return item

    def iter_runs_of(self, deployment: str, names: Iterable[str], *, moved: bool = False,
                     updated_at_gte: datetime | None = None,
                     logical_date_gte: datetime | None = None,
                     logical_date_lte: datetime | None = None) -> Iterator[dict[str, Any]]:
        """The runs of `names`, all in `deployment`, page by page when its client can.
        `moved`: the pipelines run elsewhere now and these are their earlier runs, which
        later calls of the same run are routed back to (`where_run`)."""
        aliases, ids = self._aliases(deployment, names)
        given = {"updated_at_gte": updated_at_gte, "logical_date_gte": logical_date_gte,
                 "logical_date_lte": logical_date_lte}
        filters = {k: v for k, v in given.items() if v is not None}
        client = self._call(deployment, lambda c: c)
        listing = (client.iter_runs(ids, **filters) if hasattr(client, "iter_runs")
                   else client.list_runs(sorted(ids), **filters))
        for item in listing:
            if not moved:
                yield self._named(deployment, item)
                continue
            dag_id = str(item.get("dag_id"))
            name = aliases.get(dag_id)
            if name is not None:
                item["dag_id"] = name
                self._seen_in[(name, str(item.get("dag_run_id")))] = (deployment, dag_id)
            yield item

    def _aliases(self, deployment: str, names: Iterable[str]
                 ) -> tuple[dict[str, str], frozenset[str]]:
        """dag_id -> name for `names`, and those dag_ids as a set (taken as it is by the
        client). The observer asks with the same list on every pass (one deployment's
        pipelines), so those are built once per graph, not per pass (50,000 lookups and
        a copy on a quiet pass)."""
        graph, memo = self._graph, self._alias_memo.get(deployment)
        if memo is not None and memo[0] is names and memo[1] is graph:
            return memo[2], memo[3]
        aliases = {self.where(n)[1]: n for n in names}
        ids = frozenset(aliases)
        if isinstance(names, list):  # a fresh iterable may be a one-off: not kept
            self._alias_memo[deployment] = (names, graph, aliases, ids)
        return aliases, ids

    def iter_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None) -> Iterator[dict[str, Any]]:
        given = {"updated_at_gte": updated_at_gte, "logical_date_gte": logical_date_gte,
                 "logical_date_lte": logical_date_lte}
        filters = {k: v for k, v in given.items() if v is not None}
        if dag_ids is None:  # every DAG's runs: of the default deployment only
            deployment = self.where("")[0]
            for item in self._call(deployment, lambda c: c.list_runs(None, **filters)):
                yield self._named(deployment, item)
            return
        for deployment, names in sorted(self.groups(dag_ids).items()):
            yield from self.iter_runs_of(deployment, names, updated_at_gte=updated_at_gte,
                                         logical_date_gte=logical_date_gte,
                                         logical_date_lte=logical_date_lte)

    def list_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None) -> list[dict[str, Any]]:
        return list(self.iter_runs(dag_ids, updated_at_gte=updated_at_gte,
                                   logical_date_gte=logical_date_gte,
                                   logical_date_lte=logical_date_lte))

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        deployment, real = self.where_run(dag_id, run_id)
        return self._as(dag_id, self._call(deployment, lambda c: c.get_run(real, run_id)))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        deployment, real = self.where_run(dag_id, run_id)
        result: list[dict[str, Any]] = self._call(
            deployment, lambda c: c.task_instances(real, run_id))
        return result

    def task_instances_of(self, runs: Iterable[tuple[str, str]]
                          ) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """`task_instances` of many runs: one batch per deployment, in deployment order
        (names in, names out)."""
        by_deployment: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}
        for name, run_id in runs:
            deployment, real = self.where_run(name, run_id)
            by_deployment.setdefault(deployment, {})[(real, run_id)] = (name, run_id)
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for deployment, names in sorted(by_deployment.items()):
            found: dict[tuple[str, str], list[dict[str, Any]]] = self._call(
                deployment, functools.partial(_task_instances_of, list(names)))
            out.update({names[key]: tis for key, tis in found.items() if key in names})
        return out

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        deployment, real = self.where(dag_id)
        raw, created = self._call(deployment,
                                  lambda c: c.trigger(real, run_id, logical_date, conf))
        return self._as(dag_id, raw), created

    def clear(self, dag_id: str, run_id: str, *,
              cleared_end: datetime | None = None) -> tuple[dict[str, Any], bool]:
        deployment, real = self.where_run(dag_id, run_id)
        raw, sent = self._call(deployment,
                               lambda c: c.clear(real, run_id, cleared_end=cleared_end))
        return self._as(dag_id, raw), sent

    def list_dags(self, page_size: int | None = None, *,
                  skip: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The DAGs of every deployment of the graph (but those in `skip`: known to be
        unreachable), a pipeline's under its name."""
        out: list[dict[str, Any]] = []
        skipped = set(skip)
        for deployment in self.deployment_names() or [self.where("")[0]]:
            if deployment in skipped:
                continue
            dags = self._call(deployment, lambda c: c.list_dags(page_size))
            out.extend(self._named(deployment, d) for d in dags)
        return out

    @contextlib.contextmanager
    def deadline_of(self, seconds: float) -> Iterator[None]:
        """Every client's calls in this block (this thread's) within `seconds`."""
        with self._lock:
            clients = list(self._clients.values())
        with contextlib.ExitStack() as stack:
            for client in clients:
                stack.enter_context(client.deadline_of(seconds))
            yield

    # --- clock, counters, readiness -------------------------------------------------------

    def _primary(self) -> Any:
        """The client whose clock dates the cycles: the default deployment's."""
        graph = self._graph
        name = (graph.default_deployment if graph is not None else None) or (
            self.deployment_names() or [DEFAULT_DEPLOYMENT])[0]
        with self._lock:
            return self._clients.get(name) or self._clients.get(DEFAULT_DEPLOYMENT) \
                or self.default

    def server_now(self) -> datetime | None:
        server_now = getattr(self._primary(), "server_now", None)
        return server_now() if server_now is not None else None

    def server_now_of(self, deployment: str) -> datetime | None:
        with self._lock:
            client = self._clients.get(deployment)
        server_now = getattr(client, "server_now", None)
        return server_now() if server_now is not None else None

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._primary().health()
        return result

    @property
    def request_count(self) -> int:
        with self._lock:
            clients = list(self._clients.values())
        return self._retired_requests + sum(getattr(c, "request_count", 0) for c in clients)

    def _contacts(self) -> list[tuple[float | None, tuple[float, str] | None]]:
        in_use = self._in_use
        with self._lock:
            clients = [c for d, c in self._clients.items() if d in in_use or not in_use]
        return [(getattr(c, "last_contact", None), getattr(c, "last_failure", None))
                for c in clients]

    @property
    def last_contact(self) -> float | None:
        times = [t for t, _ in self._contacts() if t is not None]
        return max(times) if times else None

    @property
    def last_failure(self) -> tuple[float, str] | None:
        """A failure only when every deployment's last call failed: one deployment down
        holds back its own pipelines, it does not make the replica unready."""
        contacts = self._contacts()
        failing = [f for t, f in contacts if f is not None and (t is None or f[0] >= t)]
        if not contacts or len(failing) < len(contacts):
            return None
        return max(failing)


# --- clients from declarations ------------------------------------------------------------

def settings_for(declaration: Deployment, base: AirflowSettings,
                 environ: Mapping[str, str]) -> AirflowSettings:
    """The reconciler's Airflow settings (timeouts, TLS, proxy, paging) with the
    declaration's URL, API and credentials, read from where it says. Raises
    DeploymentUnusable naming the variable or file, never a value."""
    auth = declaration.auth
    kind = declaration.auth_kind

    def env(key: str) -> str:
        value = environ.get(auth[key], "")
        if not value:
            raise DeploymentUnusable(declaration.name, f"{auth[key]} is not set (auth.{key} "
                                     f"of airflow-deployments/{declaration.name}.yaml)")
        return value

    def read(key: str) -> str:
        try:
            with open(auth[key], encoding="utf-8") as f:
                return f.read(64 * 1024).strip()
        except OSError as exc:
            raise DeploymentUnusable(declaration.name, f"cannot read {auth[key]} (auth.{key} "
                                     f"of airflow-deployments/{declaration.name}.yaml): "
                                     f"{exc.strerror}") from None

    username = password = token = token_file = None
    if kind == "password":
        username = auth.get("username") or env("username_env")
        password = env("password_env") if "password_env" in auth else read("password_file")
    elif kind == "token":
        if "token_env" in auth:
            token = env("token_env")
        else:
            token_file = auth["token_file"]
    return replace(base, url=declaration.url, api=declaration.api, username=username,
                   password=password, token=token, token_file=token_file)


def _task_instances_of(runs: list[tuple[str, str]], client: Any
                       ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return client.task_instances_of(runs)
