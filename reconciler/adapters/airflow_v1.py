"""The Airflow 2 REST client (API v1, basic auth), behind the same interface as the Airflow 3
client, so the loop's roles never ask which Airflow they talk to.

What it owns
------------
It is `AirflowClient` (reconciler/adapters/airflow.py) with Airflow 2's wire: the transport,
sessions, deadlines, retries, the error classes, paging, the lost-answer rule of `clear` and
the adoption of a 409 are the base class's, unchanged. What differs (DESIGN section 12,
checked on a real 2.11.2):

- Auth: HTTP basic auth with the user and password of the settings (set on each thread's
  session). `[api] auth_backends` must list `airflow.api.auth.backend.basic_auth`: Airflow
  2's default is the session backend only, which refuses every API client. A wrong
  password, an unknown user, no credentials and a missing permission all answer **403**
  (not 401), so a 403 is `AirflowAuthError` naming every cause. There is no token: a
  static token (RECONCILER_AIRFLOW_TOKEN) is refused with a message saying so.
- Paths: the resources the client uses have the same paths under `/api/v1` as under
  `/api/v2`, so the base class's requests are sent under `/api/v1` (`_json`, `_request`);
  health is `/api/v1/health`.
- The logical date is `execution_date`: sent so by `trigger` (what every 2.x takes) and in
  the listing filters (`execution_date_gte/_lte`); every run handed back also carries
  `logical_date` (a copy of `execution_date` where 2.x omits it). Times are RFC 3339 with a
  zone (a naive one answers 400).
- Listings: `GET /api/v1/dags/~/dagRuns` caps `limit` at `[api] maximum_page_limit`
  (default 100) and filters on `updated_at_gte` (the informer's incremental pass, as on
  v2: one request when nothing changed); `POST /api/v1/dags/~/dagRuns/list` takes
  `dag_ids` and an uncapped `page_limit` but ignores `updated_at_gte`, so it serves only
  the full relist's per-DAG listings, as on v2.
- Before 2.6 the run listing has no `updated_at_gte` (2.4 and 2.5 answer 400 to it): the
  informer's pass then lists what can have changed since the watermark in two GETs,
  the runs still `queued` or `running` (new, started, cleared) and those with `end_date`
  after it (ended, marked). The version comes from `detect`; a 400 naming the filter
  switches too (a version not told).
- Run JSON has no `queued_at` and no `updated_at`: the planner then judges a run by its
  start date (a cleared run restarts queued with `start_date` null, which `restarted`
  counts as restarted).
- Clear sends `{"dry_run": false}` as on v2 (v1's default is a dry run too).
- DAGs: `is_active` and `schedule_interval` become v2's `is_stale` and
  `timetable_summary`, so `doctor` and `status` read one shape.

`explain_refusal()` tells the three causes of a 403 apart for `doctor`, through the UI
login (which takes the same password): a refused password, basic auth missing from
`[api] auth_backends` (the password logs in and the session reads the API), or a role
without the permissions.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Set
from datetime import datetime
from typing import Any

import requests

from reconciler.adapters.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowNotFound,
    AirflowRejected,
    _path,
    configure_session,
)
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import iso

V1 = "/api/v1"
UPDATED_AT_FILTER = (2, 6)
"""The first Airflow with `updated_at_gte` on the run listing."""
TASK_BATCH_PAGING = (2, 10)
"""The first Airflow whose task-instance batch form takes `page_offset`/`page_limit`."""
BASIC_AUTH_BACKEND = "airflow.api.auth.backend.basic_auth"
"""What `[api] auth_backends` must list on Airflow 2 (AIRFLOW__API__AUTH_BACKENDS)."""
SET_BASIC_AUTH = ("AIRFLOW__API__AUTH_BACKENDS=airflow.api.auth.backend.basic_auth,"
                  "airflow.api.auth.backend.session")
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def v1_path(path: str) -> str:
    """The API v1 path of a v2 resource path (`/api/v2/dags/...` -> `/api/v1/dags/...`)."""
    if path.startswith("/api/v2/"):
        return V1 + path[len("/api/v2"):]
    return path


def run_v1(run: Mapping[str, Any]) -> dict[str, Any]:
    """A v1 run with `logical_date` beside `execution_date` (2.x before 2.2 lacks it)."""
    out = dict(run)
    if out.get("logical_date") is None and out.get("execution_date") is not None:
        out["logical_date"] = out["execution_date"]
    return out


def dag_v1(dag: Mapping[str, Any]) -> dict[str, Any]:
    """A v1 DAG in the v2 fields the reconciler reads: `is_stale`, `timetable_summary`."""
    out = dict(dag)
    if "is_stale" not in out and "is_active" in out:
        out["is_stale"] = not out["is_active"]
    if "timetable_summary" not in out:
        schedule = out.get("schedule_interval")
        if isinstance(schedule, dict):
            value = schedule.get("value")
            out["timetable_summary"] = (str(value) if value is not None
                                        else out.get("timetable_description") or "scheduled")
        else:
            out["timetable_summary"] = None if schedule is None else str(schedule)
    return out


def _release(version: str | None) -> tuple[int, int] | None:
    """(2, 11) of "2.11.2"; None when not told or not a release number."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


class AirflowV1Client(AirflowClient):
    """Airflow 2 REST API v1 with basic auth. Thread-safe as the base class is.
    `airflow_version`: the server's, as `detect` found it (None: assume 2.6 or later)."""

    generation = "v1"

    def __init__(self, settings: AirflowSettings, session: requests.Session | None = None,
                 *, airflow_version: str | None = None, **kwargs: Any) -> None:
        super().__init__(settings, session, **kwargs)
        release = _release(airflow_version)
        self.updated_at_filter = release is None or release >= UPDATED_AT_FILTER
        """The run listing filters on `updated_at` (2.6+); else `_changed_since`."""
        self.batch_task_instances = release is None or release >= TASK_BATCH_PAGING
        """The task-instance batch form takes `page_offset`/`page_limit` (2.10+); before,
        task instances are read run by run (an untold version finds out on its 400)."""

    @property
    def session(self) -> requests.Session:
        session = super().session
        s = self.settings
        if session.auth is None and s.username and s.password is not None:
            session.auth = (s.username, s.password)
        return session

    def _refused(self, method: str, path: str, response: requests.Response | None) -> str:
        status = response.status_code if response is not None else 403
        return (f"Airflow 2 at {self.base} refused {method} {path} for user "
                f"{self.settings.username!r} (HTTP {status}): check "
                "RECONCILER_AIRFLOW_USERNAME and RECONCILER_AIRFLOW_PASSWORD, that "
                f"[api] auth_backends lists {BASIC_AUTH_BACKEND} (AIRFLOW__API__AUTH_BACKENDS; "
                "the default, session only, refuses every API client), and that the user's "
                "role may read DAGs and read, trigger and clear DAG runs (role 'User')")

    def _request(self, method: str, path: str, *, auth: bool = True,
                 **kwargs: Any) -> requests.Response:
        """`_send` under /api/v1 with basic auth; 401 and 403 are `AirflowAuthError`."""
        s = self.settings
        if auth and (not s.username or s.password is None):
            what = ("a token (RECONCILER_AIRFLOW_TOKEN or _TOKEN_FILE) is for Airflow 3; "
                    if s.token or s.token_file else "")
            raise AirflowAuthError(
                f"no Airflow 2 credentials for {self.base}: {what}API v1 takes basic auth: "
                "set RECONCILER_AIRFLOW_USERNAME and RECONCILER_AIRFLOW_PASSWORD")
        path = v1_path(path)
        response = self._send(method, path, auth=False, **kwargs)
        if auth and response.status_code in (401, 403):
            raise AirflowAuthError(self._refused(method, path, response))
        return response

    def _json(self, method: str, path: str, *, not_found: str | None = None,
              **kwargs: Any) -> Any:
        # Error messages name the path that was sent.
        return super()._json(method, v1_path(path), not_found=not_found, **kwargs)

    def explain_refusal(self) -> str:
        """Why Airflow 2 answers 403 to these credentials, as one line saying what to do.

        Its UI login takes the same user and password: refused there too, the password is
        wrong; accepted, and the session then reads the API, Airflow lacks the basic auth
        backend (the exact setting is named); accepted but the API still refuses, the
        user's role lacks the permissions. Never the password."""
        s, base, user = self.settings, self.base, self.settings.username
        session = requests.Session()
        session.trust_env = False
        configure_session(session, s, self._url)
        timeout = (min(5.0, s.timeout), s.timeout)
        try:
            form = session.get(f"{self._url}/login/", timeout=timeout)
            token = _CSRF.search(form.text)
            login = session.post(f"{self._url}/login/", timeout=timeout, allow_redirects=False,
                                 data={"username": user or "", "password": s.password or "",
                                       **({"csrf_token": token.group(1)} if token else {})})
            logged_in = (login.status_code in (301, 302, 303)
                         and "/login" not in login.headers.get("Location", "/login"))
            api = (session.get(f"{self._url}{V1}/dags", params={"limit": 1}, timeout=timeout)
                   if logged_in else None)
        except requests.RequestException as exc:
            return (f"{self._refused('GET', f'{V1}/dags', None)} (the UI login could not "
                    f"tell which: {type(exc).__name__})")
        finally:
            session.close()
        if not logged_in:
            return (f"Airflow 2 at {base} refused the password of user {user!r}, on its API "
                    "(HTTP 403) and its UI login alike: check RECONCILER_AIRFLOW_USERNAME and "
                    "RECONCILER_AIRFLOW_PASSWORD")
        if api is not None and api.status_code == 200:
            return (f"Airflow 2 at {base} takes the password of user {user!r} but refuses "
                    f"basic auth on its REST API: [api] auth_backends lacks {BASIC_AUTH_BACKEND}"
                    f"; set {SET_BASIC_AUTH} and restart its webserver")
        return (f"user {user!r} logs in to Airflow 2 at {base} but may not read DAGs through "
                f"its REST API (HTTP {api.status_code if api is not None else '?'}): give it "
                "the role 'User' (read DAGs; read, trigger and clear DAG runs)")

    # --- the API ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /api/v1/health` (no auth): per component `{"status": "healthy"}`."""
        return self._object("GET", f"{V1}/health", auth=False)

    def iter_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None,
                  page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """As `AirflowClient.iter_runs`, on v1: with `updated_at_gte` the GET listing (the
        only one that filters on it), else with `dag_ids` the batch POST (filtered by DAG in
        Airflow, `page_limit` not capped); the logical date filters are `execution_date_*`."""
        size = self._page_size(page_size)
        keep = (None if dag_ids is None
                else dag_ids if isinstance(dag_ids, set | frozenset) else set(dag_ids))
        if keep is not None and not keep:
            return
        dates = {name: iso(value) for name, value in (("execution_date_gte", logical_date_gte),
                                                      ("execution_date_lte", logical_date_lte))
                 if value is not None}
        if updated_at_gte is not None and not self.updated_at_filter:
            yield from self._changed_since(keep, updated_at_gte, dates, size)
            return
        if keep is not None and updated_at_gte is None:
            pages = self._pages("POST", f"{V1}/dags/~/dagRuns/list", "dag_runs", size,
                                body={"dag_ids": sorted(keep), "order_by": "id", **dates},
                                what="run list")
        else:
            if updated_at_gte is not None:
                dates["updated_at_gte"] = iso(updated_at_gte)
            pages = self._pages("GET", f"{V1}/dags/~/dagRuns", "dag_runs", size,
                                params={"order_by": "id", **dates}, what="run list")
        try:
            first = next(pages, None)
        except AirflowRejected as exc:
            if updated_at_gte is None or "updated_at" not in str(exc):
                raise
            self.updated_at_filter = False  # an Airflow before 2.6 that did not say so
            dates.pop("updated_at_gte", None)
            yield from self._changed_since(keep, updated_at_gte, dates, size)
            return
        for runs in itertools.chain([first] if first is not None else [], pages):
            for run in runs:
                if isinstance(run, dict) and (keep is None or run.get("dag_id") in keep):
                    yield run_v1(run)

    def _changed_since(self, keep: Set[str] | None, since: datetime,
                       dates: Mapping[str, str], size: int) -> Iterator[dict[str, Any]]:
        """What stands in for `updated_at_gte` before 2.6: the runs not finished (new,
        started, cleared: queued or running) and those that ended since `since`, each
        once."""
        seen: set[tuple[Any, Any]] = set()
        for extra in ({"state": ["queued", "running"]}, {"end_date_gte": iso(since)}):
            for runs in self._pages("GET", f"{V1}/dags/~/dagRuns", "dag_runs", size,
                                    params={"order_by": "id", **dates, **extra},
                                    what="run list"):
                for run in runs:
                    if not isinstance(run, dict) or (keep is not None
                                                     and run.get("dag_id") not in keep):
                        continue
                    key = (run.get("dag_id"), run.get("dag_run_id"))
                    if key not in seen:
                        seen.add(key)
                        yield run_v1(run)

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        run = super().get_run(dag_id, run_id)
        return None if run is None else run_v1(run)

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """As `AirflowClient.trigger`: `(run, True)` when created, `(run, False)` when this
        very run exists (409, adopted); another run on the same execution date is
        `AirflowConflict`. The date goes as `execution_date`, which every 2.x takes."""
        if logical_date.tzinfo is None:
            raise ValueError(f"logical_date must be timezone-aware, got {logical_date!r}")
        body = {"dag_run_id": run_id, "execution_date": iso(logical_date), "conf": dict(conf)}
        response = self._request("POST", f"{V1}/dags/{_path(dag_id)}/dagRuns", json=body)
        if response.status_code == 409:
            return self._adopt(dag_id, run_id, logical_date), False
        if response.status_code == 404:
            raise AirflowNotFound(f"DAG {dag_id!r} is not in Airflow at {self.base}: is the DAG "
                                  "file deployed and parsed without import errors?")
        if response.status_code >= 400:
            raise AirflowRejected(f"trigger of DAG {dag_id!r} run {run_id!r} answered "
                                  f"{response.status_code}: {self._detail(response)}")
        try:
            return run_v1(response.json()), True
        except (ValueError, TypeError):
            raise AirflowRejected(f"trigger of DAG {dag_id!r} run {run_id!r} answered "
                                  f"{response.status_code} with a body that is not a run"
                                  ) from None

    def list_dags(self, page_size: int | None = None) -> list[dict[str, Any]]:
        """Every DAG Airflow knows, inactive ones included (`only_active=false`: v2 lists
        stale DAGs too), in v2's fields (`dag_v1`)."""
        return [dag_v1(d) for page in self._pages("GET", f"{V1}/dags", "dags",
                                                  self._page_size(page_size),
                                                  params={"only_active": "false"},
                                                  what="DAG list")
                for d in page if isinstance(d, dict)]
