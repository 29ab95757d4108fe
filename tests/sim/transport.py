"""The wire between a replica's AirflowClient and the fake Airflow, in-process.

`SimSession` is the `requests.Session` the real `AirflowClient` is given: each request is
prepared as requests would send it, handed to the fake Airflow's own request handler (no
socket, no thread), and its answer parsed back into a `requests.Response`, with a `Date`
header from Airflow's simulated clock. So the client's real code (auth, retries, paging,
error mapping) runs against Airflow's real answers and against faults injected here,
deterministically:

- `500`, `503`: a server error, nothing done;
- `503-after`: the request took effect, then the answer was a 503;
- `lost`: the request took effect, the answer never came (a read timeout);
- `delayed`: the answer did not come in time (read timeout) and the request takes effect
  later, at the next step of the simulation (a slow API server still working on it);
- `trickled`: the answer comes, slowly: it costs simulated seconds;
- `duplicated`: the request arrived twice (a retrying proxy); the second answer is given;
- `409`: the request took effect, the answer was a 409 (a retry of a request that took
  effect: Airflow's "Unique constraint violation");
- `malformed`: the request took effect, the answer is 200 with a body that is not what
  the API gives (not JSON, a list, a run without an id, a listing without a list);
- `html`: 200 with an SSO sign-in page (a proxy in front), nothing done;
- `oversized`: the answer carries megabytes of padding;
- `paging`: a listing page that lies: it repeats the first page, drops an entry, or
  claims fewer or more entries than there are;
- `expired-token`: every token expires just before the request (401, then a new one).

Which request gets which fault is drawn from a hash of (seed, step, replica, route, the
request's index among the same ones of that step), never from the order threads run in.
A request to a replica that was killed raises `Killed`.

With several deployments each replica has one session per deployment (its fleet's client
of that deployment), to that deployment's fake; the faults above are drawn per deployment
too. And a deployment can fail as a whole for a while (faults.py `deployment-down`,
`deployment-auth`), the others answering: every request to it is refused (connection
refused), answered 503, hangs past the client's timeout, or its credentials are refused
(401, 403; the token endpoint too).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
from collections.abc import Callable
from email.message import Message
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import requests
from requests.structures import CaseInsensitiveDict

if TYPE_CHECKING:
    from tests.sim.world import Replica, World

AIRFLOW_FAULTS = ("500", "503", "503-after", "lost", "delayed", "trickled", "duplicated",
                  "409", "malformed", "html", "oversized", "paging", "expired-token")
WRITE_ONLY = {"409", "duplicated"}
"""Faults that only make sense on a write (trigger or clear)."""
LIST_ONLY = {"paging"}

MAX_SAME_LISTING = 200
"""Requests of one listing route by one replica in one step before the simulation calls
the listing runaway (a page that never advances loops forever)."""


class Killed(BaseException):
    """The replica was killed (-9): nothing of it may run on. Not an Exception, so no
    `except Exception` of the code under test can swallow it."""


class Runaway(BaseException):
    """A replica kept sending the same listing request: it would never end."""


def stable_random(*parts: object) -> random.Random:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class _Handler:
    """What the fake's handler reads and writes of a BaseHTTPRequestHandler."""

    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        message = Message()
        for name, value in headers.items():
            message[name] = value
        message["Content-Length"] = str(len(body))
        self.headers = message
        self.rfile = io.BytesIO(body)
        self.wfile = io.BytesIO()
        self.status = 0
        self.reply_headers: dict[str, str] = {}

    def send_response(self, status: int) -> None:
        self.status = status

    def send_header(self, name: str, value: str) -> None:
        self.reply_headers[name] = value

    def end_headers(self) -> None:
        pass


def route_of(method: str, path: str) -> str:
    """The request's route, spelled as API v2's whatever the generation (a v1 trigger is
    TRIGGER too): the faults and the history name one set of routes."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        parts = ["api", "v2", *parts[2:]]
    if parts[:3] == ["api", "v2", "dags"] and len(parts) >= 4 and parts[3] != "~":
        names = {3: "{dag_id}", 5: "{run_id}"}
        parts = [names.get(i, p) for i, p in enumerate(parts)]
    return f"{method} /{'/'.join(parts)}"


TRIGGER = "POST /api/v2/dags/{dag_id}/dagRuns"
CLEAR = "POST /api/v2/dags/{dag_id}/dagRuns/{run_id}/clear"
TASKS = "GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
TASKS_BATCH = "POST /api/v2/dags/~/dagRuns/~/taskInstances/list"
LISTINGS = {"GET /api/v2/dags/~/dagRuns", "POST /api/v2/dags/~/dagRuns/list"}


class SimSession(requests.Session):
    def __init__(self, world: World, replica: Replica, deployment: str = "") -> None:
        super().__init__()
        self.trust_env = False
        self.world = world
        self.replica = replica
        self.deployment = deployment
        self.generation = world.generation_of(deployment)
        self.fake = world.fake_of(deployment)
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, str], int] = {}
        self._stuck: set[tuple[int, str, str]] = set()
        """Listings whose pages stopped advancing (paging fault `repeat`), this step."""

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        method = method.decode() if isinstance(method, bytes) else method
        url = url.decode() if isinstance(url, bytes) else url
        if self.replica.dead:
            raise Killed(self.replica.holder)
        # The session's own auth too: the v1 client sets basic auth on its session.
        prepared = requests.Request(method, url, headers=kwargs.get("headers"),
                                    json=kwargs.get("json"), params=kwargs.get("params"),
                                    data=kwargs.get("data"),
                                    auth=kwargs.get("auth") or self.auth).prepare()
        path = prepared.path_url
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode()
        headers = {k: str(v) for k, v in prepared.headers.items()
                   if k.lower() != "content-length"}
        route = route_of(method, path)
        step = self.world.step
        # Keyed by the path (which names the DAG and run), not by the order of the calls:
        # the executor's threads send a fan-out in any order.
        where = self.world.relative(unquote(path.split("?")[0]))
        with self._lock:
            n = self._seen.get((step, where), 0)
            self._seen[(step, where)] = n + 1
        if route in LISTINGS and n > MAX_SAME_LISTING:
            raise Runaway(f"{self.replica.holder}: {n} requests of {route} in one step")
        is_write = route in (TRIGGER, CLEAR)
        # One deployment's session draws as one Airflow's did (a one-Airflow seed as ever).
        holder = (f"{self.replica.holder}@{self.deployment}" if self.deployment
                  else self.replica.holder)
        fault = self.world.faults.airflow_fault(holder, route, where, n, is_write, step)
        self.world.crash_point(self.replica, f"before {route}")
        down = self.world.down.get(self.deployment) if self.deployment else None
        if down is not None:
            response = self._down(down, path, url)
            self.world.crash_point(self.replica, f"after {route}")
            return response
        leader = self.world.leader_now() if is_write else None

        def deliver(dup: bool = False) -> requests.Response:
            return self._deliver(method, path, headers, body, route, url, dup, leader)

        if (step, route, self.replica.holder) in self._stuck and "offset=" in path:
            fault = "paging-stuck"
        if fault == "expired-token" and self.generation != "v2":
            fault = None  # basic auth (v1): no token to expire
        if fault is None or route == "POST /auth/token":
            response = deliver()
        else:
            response = self._faulty(fault, deliver, method, path, route, url, headers)
        self.world.crash_point(self.replica, f"after {route}")
        return response

    # --- faults -----------------------------------------------------------------------

    def _down(self, how: str, path: str, url: str) -> requests.Response:
        """A request to a deployment that is down, or refuses the credentials: it never
        reaches the fake."""
        world = self.world
        world.count_fault(f"deployment:{how}")
        if how == "refused":
            raise requests.ConnectionError(f"injected: connection refused by "
                                           f"{self.deployment} ({path})")
        if how == "hang":
            # The server accepted and never answered: the client waited its timeout out.
            world.time.advance(2.0)
            raise requests.ReadTimeout(f"injected: {self.deployment} never answered {path}")
        if how == "503":
            return self._answer(503, {"detail": "Service Unavailable"}, url)
        if how == "401":
            return self._answer(401, {"detail": "Invalid credentials"}, url)
        return self._answer(403, {"detail": "Forbidden"}, url)

    def _faulty(self, fault: str, deliver: Callable[..., requests.Response], method: str,
                path: str, route: str, url: str, headers: dict[str, str]
                ) -> requests.Response:
        world = self.world
        if fault != "paging-stuck":
            world.count_fault(f"airflow:{fault}")
        rng = stable_random(world.seed, world.step, world.relative(unquote(path)), fault)
        if fault in ("500", "503"):
            return self._answer(int(fault), {"detail": "injected failure"}, url)
        if fault == "html":
            return self._answer(200, b"<!DOCTYPE html><html><body><form>Sign in</form>"
                                     b"</body></html>", url, "text/html; charset=utf-8")
        if fault == "expired-token":
            self.fake.expire_tokens()
            return deliver()
        if fault == "delayed":
            world.later.append(deliver)
            raise requests.ReadTimeout(f"injected: no answer in time from {path}")
        response = deliver()
        if fault == "503-after":
            return self._answer(503, {"detail": "injected failure after effect"}, url)
        if fault == "lost":
            raise requests.ReadTimeout(f"injected: answer to {path} lost")
        if fault == "trickled":
            world.time.advance(rng.uniform(2.0, 40.0))
            return response
        if fault == "duplicated":
            return deliver(dup=True)
        if fault == "409":
            if self.generation != "v2":  # Airflow 2's problem JSON
                return self._answer(409, {"detail": "DAGRun already exists", "status": 409,
                                          "title": "Conflict", "type": "about:blank"}, url,
                                    "application/problem+json")
            return self._answer(409, {"detail": {"reason": "Unique constraint violation",
                                                 "statement": "hidden"}}, url)
        if fault == "malformed":
            choice = rng.choice([b"{\"dag_run_id\": null, \"state\": 3}", b"[]",
                                 b"{\"dag_runs\": {}, \"total_entries\": \"many\"}",
                                 b"{\"dag_run_id\": \"reconciler__", b"null",
                                 b"{\"dag_runs\": [17, \"x\"], \"total_entries\": 2}"])
            return self._answer(200, choice, url)
        if fault == "oversized":
            data = _json_of(response)
            if isinstance(data, dict):
                data["padding"] = "x" * (2 << 20)
                return self._answer(response.status_code, data, url)
            return response
        if fault in ("paging", "paging-stuck"):
            data = _json_of(response)
            if not isinstance(data, dict) or not isinstance(data.get("dag_runs"), list):
                return response
            runs = data["dag_runs"]
            how = ("repeat" if fault == "paging-stuck"
                   else rng.choice(["drop", "short-total", "long-total", "repeat"]))
            if how == "drop" and runs:
                data["dag_runs"] = runs[:-1]
            elif how == "short-total":
                data["total_entries"] = len(runs)
            elif how == "long-total":
                data["total_entries"] = int(data.get("total_entries") or 0) + 10 ** 9
            elif how == "repeat":
                self._stuck.add((world.step, route, self.replica.holder))
                first = self._deliver_first_page(path, url, headers)
                if first is not None:
                    data = first
                    data["total_entries"] = 10 ** 9
            return self._answer(response.status_code, data, url)
        return response

    def _deliver_first_page(self, path: str, url: str, headers: dict[str, str]
                            ) -> dict[str, Any] | None:
        """The first page of the same listing (its offset set back to 0), asked with the
        request's own credentials (a token, or v1's basic auth)."""
        if "offset=" not in path:
            return None
        base, _, query = path.partition("?")
        query = "&".join(p for p in query.split("&") if not p.startswith("offset="))
        response = self._deliver("GET", f"{base}?{query}&offset=0", headers,
                                 b"", route_of("GET", base), url, False, None)
        data = _json_of(response)
        return data if isinstance(data, dict) else None

    # --- the fake, in-process ---------------------------------------------------------

    def _deliver(self, method: str, path: str, headers: dict[str, str], body: bytes,
                 route: str, url: str, duplicate: bool, leader: str | None
                 ) -> requests.Response:
        world = self.world
        before = None
        if route == CLEAR:
            before = world.run_state_before_clear(path, self.deployment)
        handler = _Handler(path, headers, body)
        if route == TASKS:
            # The fake Airflow has no task instances: the simulation's scheduler has.
            parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
            handler.status, answer = world.task_instances(parts[3], parts[5],
                                                          self.deployment)
            handler.wfile.write(json.dumps(answer).encode())
        elif route == TASKS_BATCH:
            handler.status, answer = world.task_instance_batch(
                json.loads(body or b"{}"), self.deployment)
            handler.wfile.write(json.dumps(answer).encode())
        else:
            self.fake._serve(handler, method)  # type: ignore[arg-type]
        data = handler.wfile.getvalue()
        if route in (TRIGGER, CLEAR) and handler.status == 200:
            world.record_write(self.replica, route, path, body, data, duplicate, before,
                               leader, self.deployment)
        response = requests.Response()
        response.status_code = handler.status
        response.headers = CaseInsensitiveDict(handler.reply_headers)
        response.headers["Date"] = format_datetime(world.time.airflow(), usegmt=True)
        _stream(response, data)
        response.url = url
        response.encoding = "utf-8"
        return response

    def _answer(self, status: int, body: Any, url: str,
                content_type: str = "application/json") -> requests.Response:
        response = requests.Response()
        response.status_code = status
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response.headers = CaseInsensitiveDict({
            "Content-Type": content_type, "Content-Length": str(len(data)),
            "Date": format_datetime(self.world.time.airflow(), usegmt=True)})
        _stream(response, data)
        response.url = url
        response.encoding = "utf-8"
        return response


def _stream(response: requests.Response, data: bytes) -> None:
    """The body as requests gets it from urllib3 with `stream=True`: not read yet, a raw
    stream the client reads (and closes) itself, within its deadline and size bound."""
    response.raw = io.BytesIO(data)
    response._content = False
    response._content_consumed = False  # type: ignore[attr-defined]


def _json_of(response: requests.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None
