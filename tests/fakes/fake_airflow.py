"""A small in-process fake of the Airflow 3 REST API (v2), for fast loop and client tests.

It answers like Airflow 3.3.2 where the reconciler depends on it; every status code, field
name and detail below was checked against a real `airflow standalone` (docs/airflow.md):

- `POST /auth/token` -> 201 `{"access_token"}`; wrong credentials 401 "Invalid credentials".
  No Authorization header -> 401 "Not authenticated"; an expired JWT -> 401 "Token
  Expired"; a JWT that does not verify (unknown, or signed with an old secret) -> 403
  "Invalid JWT token"; a role that may not do it -> 403 "Forbidden".
- trigger `POST /dags/{id}/dagRuns` -> 200 with the run, `queued`, `run_after` = now; 409
  with `{"detail": {"reason": "Unique constraint violation", ...}}` for a repeated run id
  AND for another run on the same logical date (unique `(dag_id, logical_date)`); 404 for
  an unknown DAG; 400 for a run id outside `^[A-Za-z0-9_.~:+-]+$`; 422 for a missing
  `logical_date` key or a naive one (`null` is allowed and makes a run without one).
- `GET /dags/~/dagRuns`: `limit` defaults to 50 and is capped, silently, at
  `maximum_page_limit` (`[api] maximum_page_limit`: 100 unless the fake is built with
  another, as AIRFLOW__API__MAXIMUM_PAGE_LIMIT would set it), `limit=0` answers an empty
  page, `offset`, `order_by` (an allow-list, `-` for descending, 400 otherwise),
  `updated_at_gte`, `logical_date_gte/_lte`; a naive timestamp answers 500 (it does on
  SQLite). Runs carry no `updated_at` field although the filter uses it.
- `POST /dags/~/dagRuns/list`: `dag_ids`, `logical_date_gte/_lte`, `order_by`,
  `page_offset`, `page_limit` (default 100, NOT capped); unknown keys (`updated_at_gte`)
  answer 422.
- clear `POST .../dagRuns/{run_id}/clear`: `dry_run` defaults to true (answers the task
  instances, changes nothing); with false the run answers `queued` with `start_date`,
  `end_date` null and a new `queued_at` (a `running` run stays `running`).
- task instances (`tis`, set by a test): `GET .../dagRuns/{run_id}/taskInstances` paged
  like the run listing, and `POST /dags/~/dagRuns/~/taskInstances/list` with `dag_ids`
  and `dag_run_ids` filtering apart and `page_offset`/`page_limit` (not capped).
- `GET /monitor/health` and `GET /version` without auth (and `/api/v1/...`: 404, removed
  in Airflow 3); `PATCH /dags/{id}` `{"is_paused"}`.

`updated_at` is kept on every change; times come from `now` (the real clock unless one is
injected: the fault simulation, tests/sim, runs the fake on a simulated clock and calls
its request handler in-process). Test-side controls: `add_run`, `advance` (the
scheduler), `finish_all`, `runs`, `run`, `expire_tokens`, `rotate_secret`, `add_user`; a
request counter per endpoint (`requests["GET /api/v2/dags/~/dagRuns"]`); faults for the
next requests (`fail_next(n, "500" | "503" | "hang" | "401" | "html", seconds)`, or only
for one endpoint with `route=`). It never stands in for the real Airflow tier (tests/e2e
runs the same behaviour against a real one).

For process-level tests, the fake can also play the scheduler and keep books:

- `auto_schedule(run_seconds=0.3, queue_seconds=0.1)` starts a background thread that, like
  Airflow's scheduler, starts a queued run `queue_seconds` after its `queued_at` and ends
  it `success` `run_seconds` after its start (a paused DAG's runs stay queued;
  `outcomes[dag_id] = "failed"` makes that DAG's runs fail). A cleared run goes round again.
- `schedule_root(logical_date=None)` creates the run the scheduler would for the root
  (`scheduled__<iso>`, run type `scheduled`, queued now; the logical date defaults to now,
  whole seconds).
- The books, per (dag_id, run_id): `created` (trigger POSTs that created the run: more than
  one is a duplicate trigger), `conflicts` (trigger POSTs answered 409: retries and
  adoptions, harmless), `clears` (each clear that took effect, with the state and end date
  it reset). `duplicate_triggers()`, `duplicate_clears()` (a clear that reset a run that had
  not finished since its last clear: it had already restarted) and `cycle_runs(cycle)` are
  what the fault tests assert on; `log` lists every request (monotonic time, route,
  status), e.g. for the failover benchmark's "first action".
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlparse

MAX_PAGE = 100  # [api] maximum_page_limit's default
TASK_BATCH_KEYS = {"dag_ids", "dag_run_ids", "task_ids", "state", "page_offset",
                   "page_limit", "order_by"}
"""What the fake's task-instance batch takes (Airflow's has more filters; extras: 422)."""
FALLBACK_PAGE = 50  # [api] fallback_page_limit
BATCH_PAGE = 100  # DAGRunsBatchBody.page_limit default
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.~:+-]+$")  # [scheduler] allowed_run_id_pattern
ORDER_BY = {"id", "state", "dag_id", "run_id", "dag_run_id", "logical_date", "run_after",
            "start_date", "end_date", "updated_at", "conf", "duration"}
BATCH_KEYS = {"page_offset", "page_limit", "dag_ids", "states", "run_after_gte",
              "run_after_gt", "run_after_lte", "run_after_lt", "logical_date_gte",
              "logical_date_gt", "logical_date_lte", "logical_date_lt", "start_date_gte",
              "start_date_gt", "start_date_lte", "start_date_lt", "end_date_gte",
              "end_date_gt", "end_date_lte", "end_date_lt", "duration_gte", "duration_gt",
              "duration_lte", "duration_lt", "conf_contains", "order_by"}
ROLES = ["viewer", "user", "op", "admin"]  # the simple auth manager's, in order
FAULTS = ("500", "503", "hang", "401", "html")
SSO_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
            b"<form action=\"/sso/login\" method=\"post\">Single sign-on</form></body></html>")


class Request(NamedTuple):
    """One request the fake answered (the log); `at` is time.monotonic() at its arrival."""

    at: float
    route: str
    dag_id: str | None
    run_id: str | None
    status: int


class Clear(NamedTuple):
    """A clear that took effect: what it reset."""

    at: datetime
    state_before: str
    end_date_before: datetime | None


def _iso(dt: datetime | None) -> str | None:
    # Airflow writes UTC with a "Z" and drops zero microseconds: 2026-01-01T00:00:00Z.
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z") if dt else None


class _BadTime(ValueError):
    pass


def _parse(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise _BadTime(text)
    return dt.astimezone(UTC)


def _unique_violation() -> dict[str, Any]:
    return {"detail": {"reason": "Unique constraint violation", "statement": "hidden",
                       "orig_error": "hidden",
                       "message": "Serious error when handling your request. Check logs for "
                                  "more details - you will find it in api server when you look "
                                  f"for ID {uuid.uuid4().hex[:8]}"}}


@dataclass
class FakeRun:
    dag_id: str
    run_id: str
    logical_date: datetime | None
    state: str = "queued"
    queued_at: datetime | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None
    run_type: str = "manual"
    conf: dict[str, Any] = field(default_factory=dict)
    run_after: datetime | None = None
    triggering_user_name: str | None = None
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seq: int = 0
    """The run's database id: the default order of every listing."""

    def to_api(self) -> dict[str, Any]:
        """The fields of Airflow 3.3.2's DAGRunResponse, in its order (no `updated_at`)."""
        duration = ((self.end_date - self.start_date).total_seconds()
                    if self.end_date and self.start_date else None)
        return {
            "dag_run_id": self.run_id, "dag_id": self.dag_id,
            "logical_date": _iso(self.logical_date), "queued_at": _iso(self.queued_at),
            "start_date": _iso(self.start_date), "end_date": _iso(self.end_date),
            "duration": duration,
            "data_interval_start": _iso(self.logical_date),
            "data_interval_end": _iso(self.logical_date),
            "run_after": _iso(self.run_after or self.queued_at or self.logical_date),
            "last_scheduling_decision": None, "run_type": self.run_type, "state": self.state,
            "triggered_by": "rest_api" if self.run_type == "manual" else None,
            "triggering_user_name": self.triggering_user_name, "conf": self.conf,
            "note": None, "dag_versions": [], "bundle_version": None,
            "dag_display_name": self.dag_id, "partition_key": None, "partition_date": None,
        }

    def sort_key(self, column: str) -> Any:
        value = {"id": self.seq, "dag_run_id": self.run_id, "run_id": self.run_id,
                 "conf": json.dumps(self.conf, sort_keys=True)}.get(column)
        if value is None and column not in ("id", "conf"):
            value = getattr(self, column, None)
            if column == "duration":
                value = self.to_api()["duration"]
        # None sorts first, like NULLs in SQLite's ascending order
        return (value is not None, value if value is not None else 0, self.seq)


class FakeAirflow:
    keep_alive = False
    """HTTP/1.1 connections kept alive, as Airflow's API server does (the benchmarks)."""

    def __init__(self, dag_ids: list[str], *, username: str = "admin",
                 password: str = "secret-pw", maximum_page_limit: int = MAX_PAGE,
                 now: Callable[[], datetime] | None = None) -> None:
        self.dag_ids = set(dag_ids)
        self._now: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
        """Airflow's clock: the real one unless injected (the fault simulation gives it a
        simulated clock, skewed from the reconciler's)."""
        self.maximum_page_limit = maximum_page_limit
        """`[api] maximum_page_limit`: the most runs a GET list page holds, whatever
        `limit` asked for (the answer does not say it was capped)."""
        self.paused: dict[str, bool] = dict.fromkeys(dag_ids, False)
        self.username, self.password = username, password
        self.users: dict[str, tuple[str, str]] = {username: (password, "admin")}
        self._runs: dict[tuple[str, str], FakeRun] = {}
        self._lock = threading.RLock()
        self._seq = 0
        self.requests: Counter[str] = Counter()
        """Requests per endpoint, e.g. `requests["POST /api/v2/dags/{dag_id}/dagRuns"]`."""
        self.tokens: dict[str, str] = {}  # live token -> username
        self._expired: set[str] = set()
        self.faults: list[tuple[str, float]] = []
        """Faults for the next requests (token requests excepted), in order: ("500", 0),
        ("503", 0), ("hang", seconds: answer only after that long), ("401", 0: the token
        expires) or ("html", 0: 200 with an HTML sign-in page, as an SSO proxy answers)."""
        self.routed_faults: list[tuple[str, str, float]] = []
        """(route, kind, seconds): like `faults`, for the next requests of that route only
        (e.g. "POST /api/v2/dags/{dag_id}/dagRuns/{run_id}/clear"); checked first."""
        self.server: ThreadingHTTPServer | None = None
        # the books (see the module docstring)
        self.created: Counter[tuple[str, str]] = Counter()
        self.conflicts: Counter[tuple[str, str]] = Counter()
        self.clears: dict[tuple[str, str], list[Clear]] = {}
        self.log: list[Request] = []
        self.outcomes: dict[str, str] = {}
        """dag_id -> "failed": the scheduler ends that DAG's runs failed."""
        self.before_reply: Callable[[Request], None] | None = None
        """Called with each API request (its answer's status) once it took effect, just
        before the answer is sent; it runs in the request's thread and may block."""
        self._scheduler: threading.Thread | None = None
        self._scheduling = threading.Event()
        self.stall_concurrent_writes = 0.0
        """Seconds a write (a POST or PATCH that changes something) waits before it is
        handled when it arrives while another write is in flight, as an Airflow 3 API
        server on SQLite waits out the database lock; it takes effect after. 0: off."""
        self.writes_in_flight = 0
        self.max_writes_in_flight = 0
        """The most writes ever handled at once."""
        self.stalled_writes = 0
        self.tis: dict[tuple[str, str], list[dict[str, Any]]] = {}
        """(dag_id, run_id) -> its task instances, as a test sets them (`task_id`,
        `map_index`, `state`, `end_date`): answered by `GET .../taskInstances` and by the
        batch `POST /dags/~/dagRuns/~/taskInstances/list`, with `dag_id` and
        `dag_run_id` added."""

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None, "FakeAirflow is not started"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeAirflow:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0 (one connection per request), unlike uvicorn's keep-alive: with
            # keep-alive, test_run_command's metrics test loses a race it has (it reads a
            # counter as soon as the fake holds the run, before the loop has counted it).
            # The benchmarks keep connections alive (`keep_alive`), as Airflow does.
            protocol_version = "HTTP/1.1" if fake.keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                if fake.keep_alive:  # headers and body are two writes: no Nagle delay
                    self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

            def do_PATCH(self) -> None:
                fake._serve(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A short poll interval: stop() (shutdown) waits up to one interval.
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-airflow", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_schedule()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> FakeAirflow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls ----------------------------------------------------------------

    def total_requests(self) -> int:
        return sum(self.requests.values())

    def add_user(self, username: str, password: str, role: str = "user") -> None:
        assert role in ROLES, role
        self.users[username] = (password, role)

    def fail_next(self, n: int, kind: str = "500", seconds: float = 0.0, *,
                  route: str | None = None) -> None:
        """The next `n` API requests fail: "500", "503", "hang" (for `seconds`), "401" or
        "html" (200 with an HTML page). With `route`, only requests of that route count,
        e.g. "POST /api/v2/dags/{dag_id}/dagRuns" (see `requests` for the spelling)."""
        assert kind in FAULTS, kind
        with self._lock:
            if route is None:
                self.faults.extend([(kind, seconds)] * n)
            else:
                self.routed_faults.extend([(route, kind, seconds)] * n)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self.routed_faults.clear()

    # --- the scheduler ----------------------------------------------------------------

    def auto_schedule(self, run_seconds: float = 0.3, queue_seconds: float = 0.1,
                      tick: float = 0.02) -> FakeAirflow:
        """Play Airflow's scheduler in a background thread until stop_schedule()/stop()."""
        self.stop_schedule()
        self._scheduling.clear()
        self._scheduler = threading.Thread(
            target=self._schedule_loop, args=(run_seconds, queue_seconds, tick),
            name="fake-airflow-scheduler", daemon=True)
        self._scheduler.start()
        return self

    def stop_schedule(self) -> None:
        if self._scheduler is not None:
            self._scheduling.set()
            self._scheduler.join(5)
            self._scheduler = None

    def _schedule_loop(self, run_seconds: float, queue_seconds: float, tick: float) -> None:
        started = timedelta(seconds=queue_seconds)
        runs_for = timedelta(seconds=run_seconds)
        while not self._scheduling.wait(tick):
            now = self._now()
            with self._lock:
                for run in list(self._runs.values()):
                    if self.paused.get(run.dag_id):
                        continue
                    if (run.state == "queued" and run.queued_at is not None
                            and now - run.queued_at >= started):
                        self.advance(run.dag_id, run.run_id, "running", at=now)
                    elif (run.state == "running" and run.start_date is not None
                            and now - run.start_date >= runs_for):
                        self.advance(run.dag_id, run.run_id,
                                     self.outcomes.get(run.dag_id, "success"), at=now)

    def schedule_root(self, logical_date: datetime | None = None,
                      dag_id: str = "01_pipeline_init") -> FakeRun:
        """The root's scheduled run, queued now, as Airflow's scheduler creates it."""
        now = self._now()
        logical = logical_date or now.replace(microsecond=0)
        return self.add_run(dag_id, f"scheduled__{logical.isoformat()}", logical,
                            run_type="scheduled", queued_at=now, run_after=now)

    # --- the books --------------------------------------------------------------------

    def duplicate_triggers(self) -> dict[tuple[str, str], int]:
        """(dag_id, run_id) -> how many trigger POSTs created it, where more than one."""
        with self._lock:
            return {key: n for key, n in self.created.items() if n > 1}

    def duplicate_clears(self) -> dict[tuple[str, str], list[Clear]]:
        """(dag_id, run_id) -> the clears that reset a run not finished since its previous
        clear (it had already restarted: the clear was repeated). A repeat that comes after
        the re-run finished looks like a fresh clear here: tests assert `clear_count` too."""
        with self._lock:
            return {key: [c for c in clears if c.state_before in ("queued", "running")]
                    for key, clears in self.clears.items()
                    if any(c.state_before in ("queued", "running") for c in clears)}

    def clear_count(self, dag_id: str, run_id: str) -> int:
        with self._lock:
            return len(self.clears.get((dag_id, run_id), []))

    def cycle_runs(self, cycle: datetime) -> dict[str, list[FakeRun]]:
        """dag_id -> its runs with that logical date."""
        out: dict[str, list[FakeRun]] = {}
        for run in self.runs():
            if run.logical_date == cycle:
                out.setdefault(run.dag_id, []).append(run)
        return out

    def first_request(self, route: str, after: float = 0.0) -> Request | None:
        """The earliest request of `route` that arrived at or after monotonic time `after`
        (by arrival, not by the order of the log)."""
        with self._lock:
            found = [r for r in self.log if r.route == route and r.at >= after]
        return min(found, key=lambda r: r.at, default=None)

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 "Token Expired" (the JWT's exp passed)."""
        with self._lock:
            self._expired.update(self.tokens)

    def rotate_secret(self) -> None:
        """Every token issued so far answers 403 "Invalid JWT token" (Airflow restarted
        with another JWT secret)."""
        with self._lock:
            self.tokens.clear()
            self._expired.clear()

    def add_run(self, dag_id: str, run_id: str, logical_date: datetime | None,
                state: str = "queued", **fields: Any) -> FakeRun:
        """A run as the scheduler (or anyone) would create it; no uniqueness checks."""
        with self._lock:
            self._seq += 1
            now = self._now()
            fields.setdefault("queued_at", now)
            fields.setdefault("run_after", fields["queued_at"])
            run = FakeRun(dag_id, run_id, logical_date, state=state, seq=self._seq,
                          updated_at=now, **fields)
            self._runs[(dag_id, run_id)] = run
            return run

    def advance(self, dag_id: str, run_id: str, state: str,
                at: datetime | None = None) -> FakeRun:
        """Play the scheduler: `running` sets start_date; `success`/`failed` set end_date
        (and start_date if it never ran); `queued` resets both. updated_at is bumped."""
        assert state in ("queued", "running", "success", "failed"), state
        with self._lock:
            run = self._runs[(dag_id, run_id)]
            now = at or self._now()
            if state == "queued":
                run.start_date = run.end_date = None
                run.queued_at = now
            if state == "running" and run.start_date is None:
                run.start_date = now
            if state in ("success", "failed"):
                run.start_date = run.start_date or now
                run.end_date = now
            run.state = state
            run.updated_at = self._now()
            return run

    set_state = advance  # the older name, kept for the loop tests

    def runs(self, dag_id: str | None = None) -> list[FakeRun]:
        with self._lock:
            return [r for r in self._runs.values() if dag_id in (None, r.dag_id)]

    def run(self, dag_id: str, run_id: str) -> FakeRun | None:
        with self._lock:
            return self._runs.get((dag_id, run_id))

    def finish_all(self, state: str = "success") -> int:
        """Every queued or running run ends (a whole scheduler loop at once)."""
        done = 0
        for run in self.runs():
            if run.state in ("queued", "running"):
                self.advance(run.dag_id, run.run_id, "running")
                self.advance(run.dag_id, run.run_id, state)
                done += 1
        return done

    # --- HTTP -------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        # Logged once answered (the status is known then), stamped with its arrival: two
        # handler threads may append out of order, the arrival times are not.
        arrived = time.monotonic()
        # A client that timed out has closed its socket: nothing to answer, no traceback.
        try:
            with contextlib.suppress(ConnectionError), self._counted_write(h, method):
                self._handle(h, method)
        finally:
            parts = [unquote(p) for p in urlparse(h.path).path.strip("/").split("/")]
            named = parts[:3] == ["api", "v2", "dags"] and len(parts) >= 4 and parts[3] != "~"
            with self._lock:
                self.log.append(Request(arrived, self._route(method, parts),
                                        parts[3] if named else None,
                                        parts[5] if named and len(parts) >= 6 else None,
                                        getattr(h, "_status", 0)))

    @contextlib.contextmanager
    def _counted_write(self, h: BaseHTTPRequestHandler, method: str) -> Iterator[None]:
        """Count the writes in flight; stall one that finds another (stall mode)."""
        path = urlparse(h.path).path
        if method == "GET" or path.endswith(("/auth/token", "/dagRuns/list", "/login")):
            yield
            return
        with self._lock:
            self.writes_in_flight += 1
            self.max_writes_in_flight = max(self.max_writes_in_flight, self.writes_in_flight)
            stall = self.stall_concurrent_writes if self.writes_in_flight > 1 else 0.0
            self.stalled_writes += bool(stall)
        try:
            if stall:
                time.sleep(stall)
            yield
        finally:
            with self._lock:
                self.writes_in_flight -= 1

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any,
               content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h._status = status  # type: ignore[attr-defined]  # for the log
        hook = self.before_reply
        if hook is not None and hasattr(h, "_request"):
            # The request has taken effect; the client has not heard yet (a test kills it
            # here: "crashed after the call, before recording the result").
            hook(h._request._replace(status=status))
        h.send_response(status)  # adds the Date header, as uvicorn does
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _route(method: str, parts: list[str]) -> str:
        # /api/v2/dags/{dag_id}/dagRuns/{run_id}/clear; "~" (all DAGs) is shown as it is
        if parts[:3] == ["api", "v2", "dags"] and len(parts) >= 4 and parts[3] != "~":
            names = {3: "{dag_id}", 5: "{run_id}"}
            parts = [names.get(i, p) for i, p in enumerate(parts)]
        return f"{method} /{'/'.join(parts)}"

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return self._reply(h, 422, {"detail": "body is not JSON"})
        self.requests[self._route(method, parts)] += 1
        named = parts[:3] == ["api", "v2", "dags"] and len(parts) >= 4 and parts[3] != "~"
        h._request = Request(time.monotonic(), self._route(method, parts),  # type: ignore[attr-defined]
                             parts[3] if named else None,
                             parts[5] if named and len(parts) >= 6 else None, 0)
        if parts == ["auth", "token"] and method == "POST":
            return self._token(h, body)
        route = self._route(method, parts)
        with self._lock:
            fault = None
            for i, (where, _kind, _seconds) in enumerate(self.routed_faults):
                if where == route:
                    fault = self.routed_faults.pop(i)[1:]
                    break
            if fault is None and self.faults:
                fault = self.faults.pop(0)
        if fault is not None:
            kind, seconds = fault
            if kind == "hang":
                time.sleep(seconds)
            elif kind in ("500", "503"):
                return self._reply(h, int(kind), {"detail": "injected failure"})
            elif kind == "html":
                return self._reply(h, 200, SSO_PAGE, "text/html; charset=utf-8")
            elif kind == "401":
                self.expire_tokens()
        if parts == ["api", "v2", "monitor", "health"] and method == "GET":
            healthy = {"status": "healthy"}
            return self._reply(h, 200, {"metadatabase": healthy, "scheduler": healthy,
                                        "triggerer": healthy, "dag_processor": healthy})
        # Both without auth, as on 3.3.2: the version (how a client tells 3 from 2), and
        # 404 for the API v1 that Airflow 3 removed.
        if parts == ["api", "v2", "version"] and method == "GET":
            return self._reply(h, 200, {"version": "3.3.2", "git_version": None})
        if parts[:2] == ["api", "v1"]:
            return self._reply(h, 404, {"error": "/api/v1 has been removed in Airflow 3, "
                                                 "please use its upgraded version /api/v2 "
                                                 "instead."})
        user = self._authenticate(h)
        if isinstance(user, tuple):
            return self._reply(h, *user)
        reads = method == "GET" or parts[3:] == ["~", "dagRuns", "list"]  # a POST that reads
        if not reads and self.users[user][1] == "viewer":
            return self._reply(h, 403, {"detail": "Forbidden"})
        if parts[:3] != ["api", "v2", "dags"]:
            return self._reply(h, 404, {"detail": "Not Found"})
        with self._lock:
            return self._dags(h, method, parts[3:], parse_qs(url.query), body, user)

    def _token(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        if not isinstance(body, dict) or not {"username", "password"} <= body.keys():
            return self._reply(h, 422, {"detail": [{"type": "missing", "msg": "Field required"}]})
        known = self.users.get(str(body["username"]))
        if known is None or known[0] != body["password"]:
            return self._reply(h, 401, {"detail": "Invalid credentials"})
        token = f"fake-jwt.{uuid.uuid4().hex}"
        with self._lock:
            self.tokens[token] = str(body["username"])
        return self._reply(h, 201, {"access_token": token})

    def _authenticate(self, h: BaseHTTPRequestHandler) -> str | tuple[int, dict[str, Any]]:
        header = h.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header.removeprefix("Bearer "):
            return 401, {"detail": "Not authenticated"}
        token = header.removeprefix("Bearer ")
        with self._lock:
            if token in self._expired:
                return 401, {"detail": "Token Expired"}
            if token not in self.tokens:
                return 403, {"detail": "Invalid JWT token"}
            return self.tokens[token]

    def _dags(self, h: BaseHTTPRequestHandler, method: str, rest: list[str],
              query: dict[str, list[str]], body: Any, user: str) -> None:
        if not rest and method == "GET":
            dags = [{"dag_id": d, "is_paused": self.paused[d]} for d in sorted(self.dag_ids)]
            return self._reply(h, 200, {"dags": dags, "total_entries": len(dags)})
        dag_id, rest = rest[0], rest[1:]
        if dag_id == "~" and rest == ["dagRuns"] and method == "GET":
            return self._list(h, query, None)
        if dag_id == "~" and rest == ["dagRuns", "list"] and method == "POST":
            return self._batch(h, body)
        if dag_id == "~" and rest == ["dagRuns", "~", "taskInstances", "list"] \
                and method == "POST":
            return self._task_batch(h, body)
        if not rest and method == "PATCH":
            if dag_id not in self.dag_ids:
                return self._reply(h, 404, {"detail": f"Dag with id: {dag_id} was not found"})
            self.paused[dag_id] = bool(body.get("is_paused"))
            return self._reply(h, 200, {"dag_id": dag_id, "is_paused": self.paused[dag_id]})
        if rest == ["dagRuns"] and method == "POST":
            return self._trigger(h, dag_id, body, user)
        if rest == ["dagRuns"] and method == "GET":
            if dag_id not in self.dag_ids:
                return self._reply(h, 404, {"detail": f"The Dag with ID: `{dag_id}` was not "
                                                      "found"})
            return self._list(h, query, dag_id)
        if len(rest) >= 2 and rest[0] == "dagRuns":
            run = self._runs.get((dag_id, rest[1]))
            if run is None:
                return self._reply(h, 404, {"detail": f"The DagRun with dag_id: `{dag_id}` and "
                                                      f"run_id: `{rest[1]}` was not found"})
            if method == "GET" and len(rest) == 2:
                return self._reply(h, 200, run.to_api())
            if method == "GET" and rest[2:] == ["taskInstances"]:
                # paged as Airflow does: `limit` capped at [api] maximum_page_limit
                tis = self._tis_of(dag_id, rest[1])
                limit = min(int(query.get("limit", ["50"])[0]), self.maximum_page_limit)
                offset = int(query.get("offset", ["0"])[0])
                return self._reply(h, 200, {"task_instances": tis[offset:offset + limit],
                                            "total_entries": len(tis)})
            if method == "POST" and rest[2:] == ["clear"]:
                return self._clear(h, run, body)
        return self._reply(h, 404, {"detail": "Not Found"})

    def _tis_of(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return [{**ti, "dag_id": dag_id, "dag_run_id": run_id}
                for ti in self.tis.get((dag_id, run_id), [])]

    def _task_batch(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        """`dag_ids` and `dag_run_ids` filter apart (Airflow's two IN clauses: every run
        of those ids in any of those DAGs); `page_offset`, `page_limit` (default 100, not
        capped)."""
        if not isinstance(body, dict) or set(body) - TASK_BATCH_KEYS:
            unknown = sorted(set(body) - TASK_BATCH_KEYS) if isinstance(body, dict) else []
            return self._reply(h, 422, {"detail": [{"type": "extra_forbidden",
                                                    "loc": ["body", *unknown[:1]],
                                                    "msg": "Extra inputs are not permitted"}]})
        dag_ids, run_ids = body.get("dag_ids"), body.get("dag_run_ids")
        with self._lock:
            keys = sorted(k for k in self._runs
                          if (dag_ids is None or k[0] in dag_ids)
                          and (run_ids is None or k[1] in run_ids))
            tis = [ti for k in keys for ti in self._tis_of(*k)]
        offset = int(body.get("page_offset") or 0)
        asked = body.get("page_limit")
        limit = 100 if asked is None else int(asked)
        return self._reply(h, 200, {"task_instances": tis[offset:offset + limit],
                                    "total_entries": len(tis)})

    def _trigger(self, h: BaseHTTPRequestHandler, dag_id: str, body: Any, user: str) -> None:
        if dag_id not in self.dag_ids:
            return self._reply(h, 404, {"detail": f"Dag with dag_id: '{dag_id}' not found"})
        if not isinstance(body, dict) or "logical_date" not in body:
            return self._reply(h, 422, {"detail": [{"type": "missing",
                                                    "loc": ["body", "logical_date"],
                                                    "msg": "Field required"}]})
        logical: datetime | None = None
        if body["logical_date"] is not None:
            try:
                logical = _parse(str(body["logical_date"]))
            except ValueError:
                return self._reply(h, 422, {"detail": [{"type": "timezone_aware",
                                                        "loc": ["body", "logical_date"],
                                                        "msg": "Input should have timezone "
                                                               "info"}]})
        now = self._now()
        run_id = body.get("dag_run_id") or f"manual__{now.isoformat()}"
        if not RUN_ID_PATTERN.match(run_id):
            return self._reply(h, 400, {"detail": f"The run_id provided '{run_id}' does not "
                                                  "match regex pattern "
                                                  f"'{RUN_ID_PATTERN.pattern}'"})
        taken = (dag_id, run_id) in self._runs or (logical is not None and any(
            r.dag_id == dag_id and r.logical_date == logical for r in self._runs.values()))
        if taken:
            self.conflicts[(dag_id, run_id)] += 1
            return self._reply(h, 409, _unique_violation())
        run = self.add_run(dag_id, run_id, logical, conf=body.get("conf") or {},
                           queued_at=now, run_after=now, triggering_user_name=user)
        self.created[(dag_id, run_id)] += 1
        return self._reply(h, 200, run.to_api())

    def _clear(self, h: BaseHTTPRequestHandler, run: FakeRun, body: Any) -> None:
        if body.get("dry_run", True):
            return self._reply(h, 200, {"task_instances": [], "total_entries": 0})
        now = self._now()
        self.clears.setdefault((run.dag_id, run.run_id), []).append(
            Clear(now, run.state, run.end_date))
        if run.state != "running":
            run.state, run.start_date = "queued", None
        run.end_date = None
        run.queued_at = run.updated_at = now
        return self._reply(h, 200, run.to_api())

    def _select(self, dag_ids: set[str] | None, ranges: dict[str, tuple[str, str]],
                order_by: str) -> list[FakeRun] | tuple[int, dict[str, Any]]:
        """Runs matching the filters, ordered; or an (error status, body)."""
        desc = order_by.startswith("-")
        column = order_by.removeprefix("-")
        if column not in ORDER_BY:
            return 400, {"detail": f"Ordering with '{column}' is disallowed or the attribute "
                                   "does not exist on the model"}
        try:
            bounds = {name: (op, _parse(value)) for name, (op, value) in ranges.items()}
        except _BadTime:
            # A naive timestamp reaches SQLite's comparison and fails there (real: 500).
            return 500, {"detail": {"reason": "Database error", "statement": "hidden",
                                    "orig_error": "hidden", "message": "Serious error"}}
        except ValueError as exc:
            return 422, {"detail": [{"type": "datetime_parsing", "msg": str(exc)}]}
        checks = [(name.rsplit("_", 1)[0], op, bound) for name, (op, bound) in bounds.items()]
        out = []
        for run in self._runs.values():
            if dag_ids is not None and run.dag_id not in dag_ids:
                continue
            ok = True
            for attribute, op, bound in checks:
                value = getattr(run, attribute)
                if value is None or (value < bound if op == "gte" else value > bound):
                    ok = False
                    break
            if ok:
                out.append(run)
        if column == "id":  # the common case, cheap even with 30,000 runs (bench_loop)
            return sorted(out, key=lambda r: r.seq, reverse=desc)
        return sorted(out, key=lambda r: r.sort_key(column), reverse=desc)

    def _list(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]],
              dag_id: str | None) -> None:
        try:
            limit = int(query.get("limit", [str(FALLBACK_PAGE)])[0])
            offset = int(query.get("offset", ["0"])[0])
        except ValueError:
            return self._reply(h, 422, {"detail": [{"type": "int_parsing"}]})
        if limit < 0 or offset < 0:
            return self._reply(h, 422, {"detail": [{"type": "greater_than_equal"}]})
        limit = min(limit, self.maximum_page_limit)
        ranges = {f"{col}_{op}": (op, query[f"{col}_{op}"][0])
                  for col in ("updated_at", "logical_date") for op in ("gte", "lte")
                  if f"{col}_{op}" in query}
        runs = self._select({dag_id} if dag_id else None, ranges,
                            query.get("order_by", ["id"])[0])
        if isinstance(runs, tuple):
            return self._reply(h, *runs)
        return self._reply(h, 200, {"dag_runs": [r.to_api() for r in runs[offset:offset + limit]],
                                    "total_entries": len(runs), "total_entries_limit": None,
                                    "next_cursor": None, "previous_cursor": None})

    def _batch(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        extra = set(body) - BATCH_KEYS if isinstance(body, dict) else {"<not an object>"}
        if extra:
            return self._reply(h, 422, {"detail": [{"type": "extra_forbidden",
                                                    "loc": ["body", k],
                                                    "msg": "Extra inputs are not permitted"}
                                                   for k in sorted(extra)]})
        limit = int(body.get("page_limit", BATCH_PAGE))  # not capped, unlike GET
        offset = int(body.get("page_offset", 0))
        ranges = {f"logical_date_{op}": (op, body[f"logical_date_{op}"])
                  for op in ("gte", "lte") if body.get(f"logical_date_{op}")}
        dag_ids = set(body["dag_ids"]) if body.get("dag_ids") is not None else None
        runs = self._select(dag_ids, ranges, body.get("order_by") or "id")
        if isinstance(runs, tuple):
            return self._reply(h, *runs)
        return self._reply(h, 200, {"dag_runs": [r.to_api() for r in runs[offset:offset + limit]],
                                    "total_entries": len(runs), "total_entries_limit": None,
                                    "next_cursor": None, "previous_cursor": None})
