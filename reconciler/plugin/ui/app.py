"""The FastAPI app Airflow 3 mounts in its API server (`fastapi_apps`, at /reconciler): the
two pages, their data, and the vendored scripts.

    GET /reconciler/                    the Dependencies page (nav item)
    GET /reconciler/dags/{dag_id}       one pipeline's page (the DAG tab)
    GET /reconciler/api/graph?cycle=    the whole graph, coloured by one cycle (JSON)
    GET /reconciler/api/dags/{dag_id}   one pipeline: neighbours, recent cycles (JSON)
    GET /reconciler/static/...          scripts, styles, Cytoscape.js (no CDN)

Airflow mounts plugin apps without its authentication, so every page and API route asks
for Airflow's own user itself, through Airflow's `get_user` (the bearer header, or the UI's
`_token` cookie: the iframe sends it): none is 401, an invalid token 403. The user sees
only the DAGs Airflow's auth manager lets them read (`filter_authorized_dag_ids` over the
graph's ids: no query of Airflow's database); another DAG's page is 403. etcd unreachable
is a 503 whose `detail` is the one line the page shows; Airflow's UI is not touched by it.
Airflow's modules are imported when a request comes, never at import: the plugin module
also loads in the scheduler and the workers.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from reconciler.plugin.ui import view
from reconciler.plugin.ui.reader import EtcdUnavailable, NotConfigured, Reader, UISettings

STATIC = Path(__file__).parent / "static"
URL_PREFIX = "/reconciler"


async def airflow_user(request: Request) -> Any:
    """Airflow's own user of this request (its `get_user`: bearer header or `_token`
    cookie); 401 without one."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    credentials = await bearer_scheme(request)
    return await get_user(request, None, credentials)


User = Annotated[Any, Depends(airflow_user)]


def readable_dags(user: Any, dag_ids: set[str]) -> set[str]:
    """The DAG ids of `dag_ids` that Airflow's auth manager lets `user` read."""
    from airflow.api_fastapi.app import get_auth_manager

    return set(get_auth_manager().filter_authorized_dag_ids(dag_ids=dag_ids, user=user,
                                                            method="GET"))


def create_app(settings: UISettings | None = None) -> FastAPI:
    """The app, reading its settings from the environment unless given."""
    reader = Reader(settings or UISettings.from_env())
    app = FastAPI(title="Reconciler", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "page.html").read_text()

    def render(request: Request, kind: str, dag_id: str = "") -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # where Airflow mounted us
        airflow = root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else ""
        out = (page.replace("{{kind}}", kind).replace("{{dag_id}}", html.escape(dag_id))
               .replace("{{root}}", html.escape(root)).replace("{{airflow}}",
                                                             html.escape(airflow)))
        return HTMLResponse(out, headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse)
    async def graph_page(request: Request, user: User) -> HTMLResponse:
        return render(request, "graph")

    @app.get("/dags/{dag_id}", response_class=HTMLResponse)
    async def dag_page(request: Request, dag_id: str, user: User) -> HTMLResponse:
        return render(request, "dag", dag_id)

    @app.get("/api/graph")
    async def graph_data(user: User, cycle: str | None = None) -> JSONResponse:
        return await run_in_threadpool(_answer, lambda: _graph(reader, user, cycle))

    @app.get("/api/dags/{dag_id}")
    async def dag_data(user: User, dag_id: str) -> JSONResponse:
        return await run_in_threadpool(_answer, lambda: _dag(reader, user, dag_id))

    return app


def _answer(build: Any) -> JSONResponse:
    try:
        return JSONResponse(build(), headers={"Cache-Control": "no-store"})
    except NotConfigured as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)
    except EtcdUnavailable as exc:
        return JSONResponse({"detail": f"The reconciler's etcd cannot be read: {exc}"},
                            status_code=503)


def _graph(reader: Reader, user: Any, cycle: str | None) -> dict[str, Any]:
    head, pipelines = reader.graph()
    readable = readable_dags(user, set(pipelines))
    cycles = reader.cycles()
    if cycle:
        cycle = cycle.replace(" ", "+")  # an unencoded "+00:00" in a hand-written URL
        if cycle not in cycles:
            raise HTTPException(404, f"no cycle {cycle} in etcd's mirror (the open cycles "
                                f"are {', '.join(cycles[:5]) or 'none'})")
    chosen = cycle or (cycles[0] if cycles else None)
    records = reader.observed(chosen) if chosen else {}
    return view.graph_view(head, pipelines, records, cycle=chosen, cycles=cycles,
                           suspended=reader.suspended(), beat=reader.heartbeat(),
                           readable=readable, links=reader.settings.links)


def _dag(reader: Reader, user: Any, dag_id: str) -> dict[str, Any]:
    # Asked before the graph is read: a user who may not read the DAG learns nothing.
    if not readable_dags(user, {dag_id}):
        raise HTTPException(403, f"you may not read {dag_id}")
    head, pipelines = reader.graph()
    if dag_id not in pipelines:
        raise HTTPException(404, f"{dag_id} is not in the reconciler's synced graph"
                            + (f" (commit {str(head['commit'])[:12]})" if head else
                               " (nothing synced yet)"))
    readable = readable_dags(user, set(pipelines))
    cycles = reader.cycles()[: reader.settings.cycles]
    current = reader.observed(cycles[0]) if cycles else {}
    return view.dag_view(dag_id, head, pipelines, reader.history(dag_id, cycles), current,
                         suspended=reader.suspended(), readable=readable,
                         links=reader.settings.links)
