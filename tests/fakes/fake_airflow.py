"""A small in-process fake of the Airflow 3 REST API, for fast loop tests.

It answers like Airflow 3.3.2 does where the reconciler depends on it (checked against a
real `airflow standalone`): POST /auth/token -> 201 {"access_token"}; trigger -> 200 with
the run, 409 for a duplicate run id and also for another run on the same logical date;
GET one run / 404; list /dags/~/dagRuns with limit (at most 100), offset, order_by,
logical_date_gte and updated_at_gte (runs carry no updated_at field); clear -> the run
back to queued with start and end dates reset and a new queued_at. The tests play the
scheduler with `set_state`. It never stands in for the real Airflow tier (tests/e2e).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

MAX_PAGE = 100


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z") if dt else None


def _parse(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


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
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seq: int = 0

    def to_api(self) -> dict[str, Any]:
        return {"dag_id": self.dag_id, "dag_run_id": self.run_id,
                "logical_date": _iso(self.logical_date), "queued_at": _iso(self.queued_at),
                "start_date": _iso(self.start_date), "end_date": _iso(self.end_date),
                "run_type": self.run_type, "state": self.state, "conf": self.conf,
                "run_after": _iso(self.logical_date or self.queued_at)}


class FakeAirflow:
    def __init__(self, dag_ids: list[str], *, username: str = "admin",
                 password: str = "secret-pw") -> None:
        self.dag_ids = set(dag_ids)
        self.username, self.password = username, password
        self._runs: dict[tuple[str, str], FakeRun] = {}
        self._lock = threading.RLock()
        self._seq = 0
        self.requests: Counter[str] = Counter()
        self.tokens: set[str] = set()
        self.faults: list[tuple[str, float]] = []  # ("500" | "401" | "hang", seconds)
        self.server: ThreadingHTTPServer | None = None

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeAirflow:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
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

    def add_run(self, dag_id: str, run_id: str, logical_date: datetime | None,
                state: str = "queued", **fields: Any) -> FakeRun:
        with self._lock:
            self._seq += 1
            run = FakeRun(dag_id, run_id, logical_date, state=state,
                          queued_at=fields.pop("queued_at", datetime.now(UTC)),
                          seq=self._seq, **fields)
            self._runs[(dag_id, run_id)] = run
            return run

    def set_state(self, dag_id: str, run_id: str, state: str) -> FakeRun:
        """Play the scheduler: running sets start_date; success/failed set end_date."""
        with self._lock:
            run = self._runs[(dag_id, run_id)]
            now = datetime.now(UTC)
            if state == "running" and run.start_date is None:
                run.start_date = now
            if state in ("success", "failed"):
                run.start_date = run.start_date or now
                run.end_date = now
            run.state = state
            run.updated_at = now
            return run

    def runs(self, dag_id: str | None = None) -> list[FakeRun]:
        with self._lock:
            return sorted((r for r in self._runs.values() if dag_id in (None, r.dag_id)),
                          key=lambda r: r.seq)

    def run(self, dag_id: str, run_id: str) -> FakeRun | None:
        return self._runs.get((dag_id, run_id))

    def finish_all(self, state: str = "success") -> int:
        """Every queued or running run ends (a whole scheduler loop at once)."""
        done = 0
        for run in self.runs():
            if run.state in ("queued", "running"):
                self.set_state(run.dag_id, run.run_id, "running")
                self.set_state(run.dag_id, run.run_id, state)
                done += 1
        return done

    # --- HTTP -------------------------------------------------------------------------

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}") if length else {}
        endpoint = f"{method} {'/'.join(parts[:3])}"
        self.requests[endpoint] += 1
        with self._lock:
            fault = self.faults.pop(0) if self.faults and parts[:1] != ["auth"] else None
        if fault is not None:
            kind, seconds = fault
            if kind == "hang":
                time.sleep(seconds)
            elif kind == "500":
                return self._reply(h, 500, {"detail": "injected failure"})
            elif kind == "401":
                self.tokens.clear()
        if parts == ["auth", "token"] and method == "POST":
            if body.get("username") == self.username and body.get("password") == self.password:
                token = f"tok-{len(self.tokens)}-{time.monotonic_ns()}"
                self.tokens.add(token)
                return self._reply(h, 201, {"access_token": token})
            return self._reply(h, 401, {"detail": "Invalid credentials"})
        if parts[:3] == ["api", "v2", "monitor"]:
            return self._reply(h, 200, {"metadatabase": {"status": "healthy"}})
        auth = h.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.tokens:
            return self._reply(h, 401, {"detail": "Not authenticated"})
        if parts[:2] != ["api", "v2"] or len(parts) < 4 or parts[2] != "dags":
            return self._reply(h, 404, {"detail": "Not Found"})
        dag_id = parts[3]
        rest = parts[4:]
        with self._lock:
            if method == "GET" and dag_id == "~" and rest == ["dagRuns"]:
                return self._reply(h, 200, self._list(parse_qs(url.query)))
            if dag_id not in self.dag_ids:
                return self._reply(h, 404, {"detail": f"The Dag with ID: `{dag_id}` was not found"})
            if method == "PATCH" and not rest:
                return self._reply(h, 200, {"dag_id": dag_id, "is_paused": False})
            if method == "POST" and rest == ["dagRuns"]:
                return self._trigger(h, dag_id, body)
            if len(rest) >= 2 and rest[0] == "dagRuns":
                run = self._runs.get((dag_id, rest[1]))
                if run is None:
                    return self._reply(h, 404, {"detail": "DagRun not found"})
                if method == "GET" and len(rest) == 2:
                    return self._reply(h, 200, run.to_api())
                if method == "POST" and rest[2:] == ["clear"]:
                    now = datetime.now(UTC)
                    run.state, run.start_date, run.end_date = "queued", None, None
                    run.queued_at = run.updated_at = now
                    return self._reply(h, 200, run.to_api())
        return self._reply(h, 404, {"detail": "Not Found"})

    def _trigger(self, h: BaseHTTPRequestHandler, dag_id: str, body: dict[str, Any]) -> None:
        run_id = body.get("dag_run_id") or f"manual__{datetime.now(UTC).isoformat()}"
        logical = _parse(body["logical_date"]) if body.get("logical_date") else None
        if (dag_id, run_id) in self._runs:
            return self._reply(h, 409, {"detail": f"DAG Run {run_id} already exists"})
        if logical is not None and any(r.dag_id == dag_id and r.logical_date == logical
                                       for r in self._runs.values()):
            return self._reply(h, 409, {"detail": {"reason": "Unique constraint violation"}})
        run = self.add_run(dag_id, run_id, logical, conf=body.get("conf") or {})
        return self._reply(h, 200, run.to_api())

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = min(int(query.get("limit", ["50"])[0]), MAX_PAGE)
        offset = int(query.get("offset", ["0"])[0])
        runs = sorted(self._runs.values(), key=lambda r: r.seq)
        if "updated_at_gte" in query:
            since = _parse(query["updated_at_gte"][0])
            runs = [r for r in runs if r.updated_at >= since]
        if "logical_date_gte" in query:
            since = _parse(query["logical_date_gte"][0])
            runs = [r for r in runs if r.logical_date is not None and r.logical_date >= since]
        return {"dag_runs": [r.to_api() for r in runs[offset:offset + limit]],
                "total_entries": len(runs)}
