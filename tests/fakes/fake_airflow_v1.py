"""The fake Airflow as Airflow 2.11 answers: REST API v1 with basic auth, a translation layer
over the v2 fake (tests/fakes/fake_airflow.py), whose runs, scheduler, books, faults and
request log it shares unchanged.

A v1 request is rewritten into its v2 form and served by the v2 fake; the answer is
rewritten back. What differs, as checked on a real 2.11.2 standalone (DESIGN section 12):

- Paths under `/api/v1`; routes and the request counter spell them so
  (`requests["GET /api/v1/dags/~/dagRuns"]`; `api` holds the prefix for tests that run
  on both). `GET /api/v1/version` and `/api/v1/health` need no auth; `/api/v2/...` and
  `/auth/token` are 404 with an HTML body.
- Basic auth. A wrong password, an unknown user, no credentials, and any credentials
  while `basic_auth` is False (`[api] auth_backends` without basic auth: Airflow 2's
  default) all answer 403 `{"detail": null, "title": "Forbidden", ...}`; so does a
  viewer's write. The session backend is always on: the UI login (`GET /login/` with a
  CSRF token in the form, `POST /login/`: 302 to `/` with a session cookie, or back to
  `/login/` when the password is refused) gives a cookie the API takes.
- Errors are problem JSON (`detail`, `status`, `title`, `type`); validation errors are 400
  (v2 says 422); a 409 names the run id or the logical date.
- Trigger takes `execution_date` or `logical_date` (equal if both, else 400); neither: the
  run gets now; `null` or a time without a zone: 400.
- Run JSON: `execution_date` and `logical_date`, `external_trigger`, no `queued_at`, no
  `updated_at`, no `run_after`. DAG JSON: `is_active`, `schedule_interval`.
- `GET /api/v1/dags/~/dagRuns`: `limit` defaults to 100 (`fallback_page_limit`) and is
  capped at `maximum_page_limit`; `execution_date_gte/_lte`, `updated_at_gte/_lte`;
  `order_by` from v1's list. `POST /api/v1/dags/~/dagRuns/list` takes `execution_date_*`,
  an uncapped `page_limit`, and ignores `updated_at_gte` (it lists as if it were not
  there); other unknown keys answer 400.
- `version` before "2.6" (`FakeAirflowV1(..., version="2.5.3")`): the GET listing has no
  `updated_at_gte`/`_lte` and answers 400 to them, as connexion's strict validation does;
  its `state` (repeated) and `end_date_gte` filters work on every version.
- `POST /api/v1/dags/~/dagRuns/~/taskInstances/list` (the task-instance batch): before
  "2.10" its form has no `page_offset`/`page_limit` and answers 400 to them.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlparse

from tests.fakes.fake_airflow import FakeAirflow

VERSION = "2.11.2"
FALLBACK_PAGE_V1 = 100
ORDER_BY_V1 = {"id": "id", "state": "state", "dag_id": "dag_id",
               "execution_date": "logical_date", "dag_run_id": "dag_run_id",
               "start_date": "start_date", "end_date": "end_date", "updated_at": "updated_at"}
BATCH_KEYS_V1 = {"page_offset", "page_limit", "dag_ids", "states", "execution_date_gte",
                 "execution_date_lte", "start_date_gte", "start_date_lte", "end_date_gte",
                 "end_date_lte", "order_by"}
TASK_BATCH_KEYS_V1 = {"dag_ids", "dag_run_ids", "task_ids", "state", "pool", "queue",
                      "execution_date_gte", "execution_date_lte", "start_date_gte",
                      "start_date_lte", "end_date_gte", "end_date_lte", "duration_gte",
                      "duration_lte"}
"""The task-instance batch form of 2.x; 2.10 added `page_offset` and `page_limit`."""
NOT_FOUND_HTML = (b"<!DOCTYPE html><html><head><title>Airflow 404</title></head><body>"
                  b"<h1>Page cannot be found.</h1></body></html>")
_TITLES = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           500: "Internal Server Error", 503: "Service Unavailable"}


def api_of(fake: FakeAirflow) -> str:
    """The API prefix a fake serves: /api/v1 (this fake) or /api/v2."""
    return str(getattr(fake, "api", "/api/v2"))


def _problem(status: int, detail: Any) -> dict[str, Any]:
    return {"detail": detail, "status": status, "title": _TITLES.get(status, "Error"),
            "type": f"https://airflow.apache.org/docs/apache-airflow/{VERSION}/"
                    "stable-rest-api-ref.html#section/Errors"}


def _run_v1(run: dict[str, Any]) -> dict[str, Any]:
    """A v2 run as 2.11's DAGRun schema has it."""
    return {"conf": run.get("conf") or {}, "dag_id": run["dag_id"],
            "dag_run_id": run["dag_run_id"],
            "data_interval_end": run.get("data_interval_end"),
            "data_interval_start": run.get("data_interval_start"),
            "end_date": run.get("end_date"), "execution_date": run.get("logical_date"),
            "external_trigger": run.get("run_type") == "manual",
            "last_scheduling_decision": None, "logical_date": run.get("logical_date"),
            "note": None, "run_type": run.get("run_type"),
            "start_date": run.get("start_date"), "state": run.get("state")}


def _has_zone(text: str) -> bool:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        return False


class FakeAirflowV1(FakeAirflow):
    api = "/api/v1"

    def __init__(self, dag_ids: list[str], *, basic_auth: bool = True,
                 version: str = VERSION, **kwargs: Any) -> None:
        super().__init__(dag_ids, **kwargs)
        self.version = version
        major, minor = (int(x) for x in version.split(".")[:2])
        self.updated_at_filter = (major, minor) >= (2, 6)
        self.task_batch_paging = (major, minor) >= (2, 10)
        self._only: tuple[set[str] | None, datetime | None] = (None, None)
        self.basic_auth = basic_auth
        """`[api] auth_backends` lists basic auth (False: Airflow 2's default, session
        only: every API client gets 403)."""
        self.sessions: dict[str, str] = {}  # UI session cookie -> username
        self.no_access: set[str] = set()
        """Users who log in to the UI but whose role may not use the API (403 there)."""
        self._csrf = uuid.uuid4().hex

    # --- routes spelled as v1 ---------------------------------------------------------

    @staticmethod
    def _route(method: str, parts: list[str]) -> str:
        if parts[:2] == ["api", "v1"]:
            parts = ["api", "v2", *parts[2:]]
        return FakeAirflow._route(method, parts).replace(" /api/v2/", " /api/v1/", 1)

    # --- requests in, answers out -----------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["login"]:
            return self._login(h, method)
        if parts == ["api", "v1", "version"] and method == "GET":
            self.requests[f"GET {url.path}"] += 1
            return self._reply(h, 200, {"git_version": "", "version": self.version})
        if parts[:2] != ["api", "v1"]:
            self.requests[f"{method} {url.path}"] += 1  # /api/v2/..., /auth/token: no such
            return self._reply(h, 404, NOT_FOUND_HTML, "text/html; charset=utf-8")
        h._v1 = True  # type: ignore[attr-defined]  # answers are rewritten (_reply)
        if parts == ["api", "v1", "health"] and method == "GET":
            self.requests["GET /api/v1/health"] += 1
            healthy = {"status": "healthy"}
            return self._reply(h, 200, {"metadatabase": healthy, "scheduler": healthy,
                                        "triggerer": healthy,
                                        "dag_processor": {"status": None}})
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._reply(h, 400, _problem(400, "body is not JSON"))
        query = parse_qs(url.query)
        rest = parts[3:] if parts[2:3] == ["dags"] else None
        translated = self._to_v2(method, rest, query, body)
        if isinstance(translated, tuple) and isinstance(translated[0], int):
            self.requests[self._route(method, parts)] += 1
            return self._reply(h, translated[0], _problem(*translated))
        query, body = translated
        h.path = "/api/v2/" + "/".join(url.path.strip("/").split("/")[2:]) + (
            "?" + urlencode(query, doseq=True) if query else "")
        data = json.dumps(body).encode() if body is not None else b""
        h.rfile = io.BytesIO(data)
        del h.headers["Content-Length"]
        h.headers["Content-Length"] = str(len(data))
        return super()._handle(h, method)

    def _to_v2(self, method: str, rest: list[str] | None, query: dict[str, list[str]],
               body: Any) -> tuple[dict[str, list[str]], Any] | tuple[int, str]:
        """The v2 form of a v1 request (query, body), or (status, detail) to refuse it."""
        if rest is None:
            return query, body
        if rest[:2] == ["~", "dagRuns"] and len(rest) == 2 and method == "GET":
            if not self.updated_at_filter and {"updated_at_gte", "updated_at_lte"} & set(query):
                extra = ", ".join(sorted({"updated_at_gte", "updated_at_lte"} & set(query)))
                return 400, f"Extra query parameter(s) {extra} not in spec"
            query = {k.replace("execution_date_", "logical_date_"): v for k, v in query.items()}
            query.setdefault("limit", [str(FALLBACK_PAGE_V1)])
            order = query.get("order_by", ["id"])[0]
            column = order.removeprefix("-")
            if column not in ORDER_BY_V1:
                return 400, (f"Ordering with '{column}' is disallowed or the attribute does "
                             "not exist on the model")
            query["order_by"] = [order.replace(column, ORDER_BY_V1[column])]
            return query, body
        if rest == ["~", "dagRuns", "list"] and method == "POST":
            if not isinstance(body, dict):
                return 400, "the body is not an object"
            body = dict(body)
            body.pop("updated_at_gte", None)  # ignored by 2.x's batch form
            body.pop("updated_at_lte", None)
            unknown = set(body) - BATCH_KEYS_V1
            if unknown:
                return 400, str({k: ["Unknown field."] for k in sorted(unknown)})
            for op in ("gte", "lte"):
                if f"execution_date_{op}" in body:
                    body[f"logical_date_{op}"] = body.pop(f"execution_date_{op}")
            order = str(body.get("order_by") or "id")
            if order.removeprefix("-") not in ORDER_BY_V1:
                return 400, f"Ordering with '{order}' is disallowed"
            body["order_by"] = order.replace(order.removeprefix("-"),
                                             ORDER_BY_V1[order.removeprefix("-")])
            return query, body
        if rest == ["~", "dagRuns", "~", "taskInstances", "list"] and method == "POST":
            allowed = TASK_BATCH_KEYS_V1 | (
                {"page_offset", "page_limit"} if self.task_batch_paging else set())
            unknown = set(body) - allowed if isinstance(body, dict) else set()
            if unknown:
                return 400, str({k: ["Unknown field."] for k in sorted(unknown)})
            return query, body
        if len(rest) == 2 and rest[1] == "dagRuns" and method == "POST":
            return query, self._trigger_v2(body)
        if not rest and method == "GET":
            query.pop("only_active", None)
        return query, body

    def _list(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]],
              dag_id: str | None) -> None:
        # v1's `state` and `end_date_gte` filters, applied in _select (under the fake's lock)
        states = set(query.pop("state", [])) or None
        ended = query.pop("end_date_gte", [None])[0]
        try:
            self._only = (states, datetime.fromisoformat(ended.replace("Z", "+00:00"))
                          if ended else None)
        except ValueError:
            return self._reply(h, 400, _problem(400, f"'{ended}' is not a 'date-time'"))
        try:
            return super()._list(h, query, dag_id)
        finally:
            self._only = (None, None)

    def _select(self, dag_ids: set[str] | None, ranges: dict[str, tuple[str, str]],
                order_by: str) -> Any:
        runs = super()._select(dag_ids, ranges, order_by)
        states, ended = self._only
        if isinstance(runs, tuple) or (states is None and ended is None):
            return runs
        return [r for r in runs if (states is None or r.state in states) and
                (ended is None or (r.end_date is not None and r.end_date >= ended))]

    @staticmethod
    def _trigger_v2(body: Any) -> Any:
        if not isinstance(body, dict):
            return body
        body = dict(body)
        dates = {k: body.pop(k) for k in ("execution_date", "logical_date") if k in body}
        if len(set(map(str, dates.values()))) > 1:
            return {"invalid": "logical_date and execution_date differ"}
        if not dates:
            body["logical_date"] = datetime.now(UTC).isoformat()
            return body
        value = next(iter(dates.values()))
        if value is None or not isinstance(value, str) or not _has_zone(value):
            return {"invalid": f"'{value}' is not a 'date-time'"}
        body["logical_date"] = value
        return body

    def _trigger(self, h: BaseHTTPRequestHandler, dag_id: str, body: Any, user: str) -> None:
        if isinstance(body, dict) and "invalid" in body:
            return self._reply(h, 400, _problem(400, body["invalid"]))
        if isinstance(body, dict) and dag_id in self.dag_ids:
            taken = next((r for r in self.runs(dag_id) if r.run_id == body.get("dag_run_id")),
                         None)
            if taken is None and body.get("logical_date"):
                when = datetime.fromisoformat(str(body["logical_date"]).replace("Z", "+00:00"))
                holder = next((r for r in self.runs(dag_id) if r.logical_date == when), None)
                if holder is not None:
                    self.conflicts[(dag_id, str(body.get("dag_run_id")))] += 1
                    return self._reply(h, 409, _problem(
                        409, f"DAGRun with DAG ID: '{dag_id}' and DAGRun logical date: "
                             f"'{when.isoformat(sep=' ')}' already exists"))
            if taken is not None:
                self.conflicts[(dag_id, taken.run_id)] += 1
                return self._reply(h, 409, _problem(
                    409, f"DAGRun with DAG ID: '{dag_id}' and DAGRun ID: '{taken.run_id}' "
                         "already exists"))
        return super()._trigger(h, dag_id, body, user)

    def _login(self, h: BaseHTTPRequestHandler, method: str) -> None:
        self.requests[f"{method} /login/"] += 1
        if method == "GET":
            page = (f'<form method="post"><input id="csrf_token" name="csrf_token" '
                    f'type="hidden" value="{self._csrf}"></form>').encode()
            return self._reply(h, 200, page, "text/html; charset=utf-8")
        length = int(h.headers.get("Content-Length") or 0)
        form = parse_qs((h.rfile.read(length) if length else b"").decode())
        user, password = form.get("username", [""])[0], form.get("password", [""])[0]
        known = self.users.get(user)
        cookie = None
        if form.get("csrf_token", [""])[0] == self._csrf and known and known[0] == password:
            cookie = uuid.uuid4().hex
            self.sessions[cookie] = user
        h._status = 302  # type: ignore[attr-defined]  # for the log
        h.send_response(302)
        h.send_header("Location", "/" if cookie else "/login/")
        if cookie:
            h.send_header("Set-Cookie", f"session={cookie}; Path=/; HttpOnly")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _authenticate(self, h: BaseHTTPRequestHandler) -> str | tuple[int, dict[str, Any]]:
        refused = (403, {"detail": None})
        for part in h.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "session" and value in self.sessions:  # the session backend: always on
                user = self.sessions[value]
                return refused if user in self.no_access else user
        header = h.headers.get("Authorization", "")
        if not self.basic_auth or not header.startswith("Basic "):
            return refused
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return refused
        known = self.users.get(user)
        if known is None or known[0] != password or user in self.no_access:
            return refused
        return user

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any,
               content_type: str = "application/json") -> None:
        if getattr(h, "_v1", False) and isinstance(body, dict):
            status = 400 if status == 422 else 403 if status == 401 else status
            if status >= 400 and "title" not in body:
                detail = body.get("detail")
                body = _problem(status, detail if status != 403 else None)
            elif "dag_runs" in body:
                body = {"dag_runs": [_run_v1(r) for r in body["dag_runs"]],
                        "total_entries": body.get("total_entries")}
            elif "dag_run_id" in body:
                body = _run_v1(body)
            elif "dags" in body:
                body = {"dags": [{**d, "is_active": True, "schedule_interval": None,
                                  "timetable_description": "Never, external triggers only"}
                                 for d in body["dags"]],
                        "total_entries": body.get("total_entries")}
            content_type = ("application/problem+json" if status >= 400
                            else content_type)
        return super()._reply(h, status, body, content_type)
