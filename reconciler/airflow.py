"""The Airflow 3 REST client (API v2): the only module that talks HTTP to Airflow.

Authentication: a JWT from `POST /auth/token` (fetched again once on a 401), or a static
token. Every request has connect and read timeouts; connection errors, timeouts and 5xx
answers are retried with capped exponential backoff and jitter (tenacity), 4xx never
(except the single 401 refresh). Errors are typed by what the caller does next:
AirflowUnavailable (retry later), AirflowAuthError (needs a human), AirflowNotFound,
AirflowConflict. No message contains the password or a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from reconciler.settings import AirflowSettings
from reconciler.state import iso

PAGE_SIZE = 100  # Airflow's default maximum page size ([api] maximum_page_limit)


class AirflowError(Exception):
    """Base of the client's errors."""


class AirflowUnavailable(AirflowError):
    """Connection refused, timeout or 5xx after the retries: try again later."""


class AirflowAuthError(AirflowError):
    """401 after a fresh token, or 403: credentials or permissions need a human."""


class AirflowNotFound(AirflowError):
    """404: the DAG (or run) is not in Airflow."""


class AirflowConflict(AirflowError):
    """409 that is not our own run: another run holds that logical date."""


class _Retryable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _path(text: str) -> str:
    # Run ids hold ':' and '+' (reconciler__2025-06-01T00:00:00+00:00): encode everything.
    return quote(text, safe="")


class AirflowClient:
    def __init__(self, settings: AirflowSettings, session: requests.Session | None = None,
                 *, backoff_initial: float = 0.5, backoff_max: float = 8.0) -> None:
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self.session = session or requests.Session()
        self.session.trust_env = False  # never through a proxy from the environment
        self._token: str | None = settings.token
        self.request_count = 0
        self._backoff = (backoff_initial, backoff_max)

    # --- transport --------------------------------------------------------------------------

    def _fetch_token(self) -> str:
        s = self.settings
        if s.token:
            return s.token
        if not s.username or s.password is None:
            raise AirflowAuthError(f"no Airflow credentials for {self.base}: set "
                                   "RECONCILER_AIRFLOW_USERNAME and RECONCILER_AIRFLOW_PASSWORD "
                                   "(or RECONCILER_AIRFLOW_TOKEN)")
        response = self._send("POST", "/auth/token",
                              json={"username": s.username, "password": s.password},
                              auth=False)
        if response.status_code in (401, 403):
            raise AirflowAuthError(f"Airflow at {self.base} refused the password of user "
                                   f"{s.username!r} (HTTP {response.status_code}); check "
                                   "RECONCILER_AIRFLOW_USERNAME/PASSWORD")
        if response.status_code >= 400:
            raise AirflowError(f"POST {self.base}/auth/token answered "
                               f"{response.status_code}: {_detail(response)}")
        return str(response.json()["access_token"])

    def _send(self, method: str, path: str, *, auth: bool = True,
              **kwargs: Any) -> requests.Response:
        """One request with retries on connection errors, timeouts and 5xx."""
        timeout = (min(5.0, self.settings.timeout), self.settings.timeout)

        def attempt() -> requests.Response:
            headers = {}
            if auth:
                if self._token is None:
                    self._token = self._fetch_token()
                headers["Authorization"] = f"Bearer {self._token}"
            self.request_count += 1
            try:
                response = self.session.request(method, self.base + path, headers=headers,
                                                timeout=timeout, **kwargs)
            except requests.Timeout:
                raise _Retryable(f"{method} {self.base}{path} timed out after "
                                 f"{self.settings.timeout:g} s") from None
            except requests.ConnectionError as exc:
                raise _Retryable(f"cannot connect to Airflow at {self.base} "
                                 f"({type(exc).__name__})") from None
            if response.status_code >= 500:
                raise _Retryable(f"{method} {self.base}{path} answered "
                                 f"{response.status_code}: {_detail(response)}")
            return response

        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.settings.retries)),
            wait=wait_exponential_jitter(multiplier=self._backoff[0], max=self._backoff[1],
                                        jitter=self._backoff[0]),
            retry=retry_if_exception_type(_Retryable), reraise=False)
        try:
            return retrying(attempt)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            message = last.message if isinstance(last, _Retryable) else str(last)
            raise AirflowUnavailable(message) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self._send(method, path, **kwargs)
        if response.status_code == 401 and not self.settings.token:
            self._token = None  # expired: one fresh token, one more try
            response = self._send(method, path, **kwargs)
        if response.status_code == 401:
            raise AirflowAuthError(f"Airflow at {self.base} refused the token of user "
                                   f"{self.settings.username!r} (HTTP 401)")
        if response.status_code == 403:
            raise AirflowAuthError(f"user {self.settings.username!r} may not {method} {path} "
                                   f"on {self.base} (HTTP 403); it needs a role that can "
                                   "read and trigger DAG runs")
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 404:
            raise AirflowNotFound(f"{method} {path}: not found in Airflow at {self.base} "
                                  f"({_detail(response)})")
        if response.status_code >= 400:
            raise AirflowError(f"{method} {path} answered {response.status_code}: "
                               f"{_detail(response)}")
        return response.json() if response.content else {}

    # --- the API ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return dict(self._json("GET", "/api/v2/monitor/health", auth=False))

    def list_runs(self, *, dag_ids: Iterable[str] | None = None,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  page_size: int = PAGE_SIZE) -> list[dict[str, Any]]:
        """Runs of all DAGs (filtered to `dag_ids` here), every page; one request when
        nothing changed since `updated_at_gte`."""
        wanted = set(dag_ids) if dag_ids is not None else None
        params: dict[str, Any] = {"limit": page_size, "order_by": "id"}
        if updated_at_gte is not None:
            params["updated_at_gte"] = iso(updated_at_gte)
        if logical_date_gte is not None:
            params["logical_date_gte"] = iso(logical_date_gte)
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._json("GET", "/api/v2/dags/~/dagRuns",
                              params={**params, "offset": offset})
            runs = page.get("dag_runs", [])
            out.extend(r for r in runs if wanted is None or r.get("dag_id") in wanted)
            offset += len(runs)
            if not runs or offset >= int(page.get("total_entries", 0)):
                return out

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        try:
            return dict(self._json("GET", f"/api/v2/dags/{_path(dag_id)}/dagRuns/"
                                          f"{_path(run_id)}"))
        except AirflowNotFound:
            return None

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the run; (run, True). If it exists already (409): (run, False)."""
        body = {"dag_run_id": run_id, "logical_date": iso(logical_date), "conf": dict(conf)}
        response = self._request("POST", f"/api/v2/dags/{_path(dag_id)}/dagRuns", json=body)
        if response.status_code == 409:
            existing = self.get_run(dag_id, run_id)
            if existing is None:
                raise AirflowConflict(f"{dag_id} already has another run for logical date "
                                      f"{iso(logical_date)} ({_detail(response)})")
            return existing, False
        if response.status_code == 404:
            raise AirflowNotFound(f"DAG {dag_id!r} is not in Airflow at {self.base}: is the "
                                  "DAG file deployed and parsed?")
        if response.status_code >= 400:
            raise AirflowError(f"trigger {dag_id} {run_id} answered {response.status_code}: "
                               f"{_detail(response)}")
        return dict(response.json()), True

    def clear(self, dag_id: str, run_id: str) -> Any:
        """Re-run a finished run (same run id, a new try)."""
        return self._json("POST", f"/api/v2/dags/{_path(dag_id)}/dagRuns/{_path(run_id)}/clear",
                          json={"dry_run": False})

    def unpause(self, dag_id: str) -> None:
        self._json("PATCH", f"/api/v2/dags/{_path(dag_id)}", json={"is_paused": False})


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return str(detail)[:300]
