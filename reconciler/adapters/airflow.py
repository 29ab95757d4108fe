"""The Airflow 3 REST client (API v2): the only module that talks HTTP to Airflow.

What it owns
------------
- Authentication: a JWT from `POST /auth/token` (answers 201 `{"access_token"}`), sent as
  `Authorization: Bearer`; or a static token from the settings. With a username and
  password, a 401 ("Token Expired") and a 403 "Invalid JWT token" (the API server's JWT
  secret changed: a restart without a fixed secret, another replica) fetch a new token
  once and repeat the request once. A static token is never refreshed.
- Token file: with `settings.token_file` (managed Airflow services rotate tokens), the
  token is read from the file at start and read again on a 401 or a 403 "Invalid JWT
  token"; the request is repeated once if the file now holds another token.
- Networks: `settings.ca` verifies Airflow's certificate against a CA bundle (the CLI takes
  RECONCILER_AIRFLOW_CA, else REQUESTS_CA_BUNDLE). Proxies only when asked: an explicit
  `settings.proxy`, or `settings.proxy_from_env` (HTTP(S)_PROXY and NO_PROXY). By default
  nothing of the environment is trusted (`trust_env = False`: no proxy, no netrc), so
  the bearer token never crosses a proxy the operator did not choose for Airflow.
- Transport: connect and read timeouts on every request; connection errors, timeouts and
  5xx answers are retried with capped exponential backoff and jitter (tenacity), at most
  `settings.retries` attempts and never past a total deadline; 4xx is never retried.
- Errors typed by what the caller does next: `AirflowUnavailable` (retry later),
  `AirflowAuthError` (needs a human: credentials or permissions), `AirflowNotFound` (the
  DAG or run is not in Airflow), `AirflowConflict` (another run holds the logical date),
  all under `AirflowError`. No message ever contains the password or a token.

Runs are returned as the API's own JSON dicts (they carry `dag_id`); `reconciler.core.state`
parses them (`DagRun.from_api`). Facts this relies on, checked on Airflow 3.3.2, are in
docs/airflow.md. Airflow 2 (API v1, basic auth) is its subclass in airflow_v1.py.

Retrying POSTs is safe here: a trigger carries a deterministic run id (a repeat answers 409
and is adopted) and a repeated clear of a run only queues it again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from reconciler.adapters.bounded_http import (
    WATCHDOG,
    BodyTooLarge,
    Expired,
    Watchdog,
    read_body,
    watch_session,
)
from reconciler.adapters.clock import SystemClock, Ticker
from reconciler.core.errors import NeedsHuman, ReconcilerError, RetryLater
from reconciler.core.safe_text import redact
from reconciler.core.settings import AirflowSettings
from reconciler.core.state import iso, parse_time

DEFAULT_DEADLINE = 30.0
"""Seconds one call may take in all, retries and backoff included, unless told otherwise:
a one-shot command must fail within seconds, not minutes."""

TASK_BATCH = 100
"""Runs per task-instance batch listing (its body names their DAGs and run ids)."""
BATCH_REFUSED = (400, 404, 405, 422)
"""What an Airflow without the batch form (or without its paging) answers it."""
CONNECT_TIMEOUT = 5.0
"""Upper bound of the TCP connect timeout: a refused connection fails at once anyway, a
black-holed address should not eat the whole read timeout."""

# The 403 detail of a JWT that does not verify (signed with another secret); an expired
# one answers 401 "Token Expired". Both are cured by a fresh token.
_INVALID_JWT = "Invalid JWT token"


class AirflowError(ReconcilerError):
    """Base of the client's errors: an answer the reconciler cannot use as it is."""

    dependency = "airflow"


class AirflowUnavailable(AirflowError, RetryLater):
    """Connection refused, timeout or 5xx after the retries: try again later.
    `no_answer`: the last attempt reached Airflow but no answer came in time."""

    def __init__(self, message: str, *, no_answer: bool = False) -> None:
        super().__init__(message)
        self.no_answer = no_answer


class AirflowAuthError(AirflowError, NeedsHuman):
    """401 after a fresh token, or 403: credentials or permissions need a human."""


class AirflowNotFound(AirflowError, NeedsHuman):
    """404: the DAG (or run) is not in Airflow."""


class AirflowDagAway(AirflowError, RetryLater):
    """A trigger answered 404 for a DAG this deployment has taken runs of from us: most
    likely its file is being parsed again (or its parse was killed for the timeout, which
    takes the DAG away until the next parse). Retried at the normal backoff a few times
    before it counts as `AirflowNotFound` (a human's)."""


class AirflowConflict(AirflowError, NeedsHuman):
    """409 that is not our own run: another run already holds that logical date (or our
    run id is taken by a run of another logical date). `existing` is that run, if found."""

    def __init__(self, message: str, existing: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.existing = existing


class AirflowRejected(AirflowError, NeedsHuman):
    """Any other answer that is not what the API gives: a 4xx, or a 200 that is not JSON
    (an SSO login page in front of the API, a wrong URL)."""

    status: int | None = None
    """The 4xx it answered (None: a 200 that was not what the API gives)."""


class AirflowAnswerTooLarge(AirflowRejected):
    """An answer over `settings.max_answer_bytes` (announced or counted as it streamed in):
    refused before it is held in memory. A listing asks again with smaller pages first."""

    def __init__(self, message: str, *, size: int = 0, announced: bool = False) -> None:
        super().__init__(message)
        self.size = size
        self.announced = announced


class AirflowRunawayListing(AirflowRejected):
    """A listing that does not advance: a page repeating an earlier one, a `total_entries`
    beyond `settings.max_pages` pages, more pages than that, or longer than
    `settings.listing_timeout` in all."""


class _Retryable(Exception):
    """One failed attempt that is worth repeating (connection, timeout, 5xx)."""

    def __init__(self, message: str, *, no_answer: bool = False) -> None:
        super().__init__(message)
        self.no_answer = no_answer


def _path(text: str) -> str:
    # Run ids hold ':' and '+' (reconciler__2025-06-01T00:00:00+00:00): encode everything.
    return quote(text, safe="")


def _with_userinfo(url: str, userinfo: str) -> str:
    """`url` with its `user:password@` replaced by `userinfo` (unchanged if it has none)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, userinfo + host, parts.path, parts.query, parts.fragment))


def _without_credentials(url: str) -> str:
    return _with_userinfo(url, "")


def redact_url(url: str) -> str:
    """The URL without `user:password@`: what messages and logs may show."""
    return _with_userinfo(url, "***@")


class _StopPast(stop_base):
    """Stop retrying once `deadline` seconds of `clock` have passed since `started`."""

    def __init__(self, clock: Ticker, started: float, deadline: float) -> None:
        self._clock, self._started, self._deadline = clock, started, deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock.monotonic() - self._started >= self._deadline


class AirflowClient:
    """Airflow 3 REST API v2. Thread-safe: one `requests.Session` per thread, so the
    executor's concurrent triggers do not share a connection pool's state; the token is
    shared (fetched under a lock)."""

    def __init__(self, settings: AirflowSettings, session: requests.Session | None = None,
                 *, backoff_initial: float = 0.5, backoff_max: float = 8.0,
                 deadline: float = DEFAULT_DEADLINE, clock: Ticker | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.settings = settings
        self.clock: Ticker = clock or SystemClock()
        """Every interval, deadline and wait of the client (the fault simulation injects
        its simulated clock; real time must not leak into a seed)."""
        self.watchdog = watchdog or WATCHDOG
        """Bounds each whole exchange (bounded_http.py)."""
        # Requests would turn `user:password@` in the URL into basic auth over our bearer
        # token: the URL is used without them (credentials come from the settings).
        self._url = _without_credentials(settings.url.rstrip("/"))
        self.base = redact_url(self._url)
        """The URL as messages show it: never with credentials."""
        self.batch_task_instances = True
        """Task instances of many runs in one listing (`task_instances_of`); off for an
        Airflow that refuses it."""
        self._shared_session = session
        self._local = threading.local()
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._token: str | None = settings.token
        self._file_token: str | None = None
        """The token last read from settings.token_file."""
        self._backoff = (backoff_initial, backoff_max)
        self.deadline = deadline
        self.last_contact: float | None = None
        """clock.monotonic() of the last HTTP answer of any kind (readiness)."""
        self.last_failure: tuple[float, str] | None = None
        """When (clock.monotonic()) and why the last call failed for want of Airflow."""
        self.sleep: Callable[[float], None] = self.clock.sleep
        """How retries wait (the clock's sleep unless a test sets another)."""
        self.request_count = 0
        """HTTP requests sent (attempts, token requests included): the loop's cost metric."""
        self.server_time: datetime | None = None
        """The API server's clock (`Date` header, 1 s resolution) at the last answer: a
        watermark for `updated_at_gte` that does not depend on our clock."""
        self._server_time_at = 0.0
        """clock.monotonic() when `server_time` was read."""

    # --- transport --------------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        if self._shared_session is not None:
            return self._shared_session
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = watch_session(requests.Session())
            # Never through a proxy taken from the environment unless asked: Airflow is
            # usually internal, and HTTP(S)_PROXY in a container must not see our token.
            session.trust_env = False
            configure_session(session, self.settings, self._url)
            self._local.session = session
        return session

    @contextlib.contextmanager
    def deadline_of(self, seconds: float) -> Iterator[None]:
        """Calls made in this block (by this thread) give up after `seconds` in all,
        retries included: the executor keeps every call inside the leader's lease."""
        previous = getattr(self._local, "deadline", None)
        self._local.deadline = max(0.1, seconds)
        try:
            yield
        finally:
            self._local.deadline = previous

    def _deadline(self) -> float:
        override = getattr(self._local, "deadline", None)
        return self.deadline if override is None else min(self.deadline, override)

    def _count(self) -> None:
        with self._lock:
            self.request_count += 1

    def _redact(self, text: str) -> str:
        """Defence in depth: an answer echoing the request (a 422) must not leak a secret."""
        return redact(text, (self.settings.password, self.settings.token, self._token,
                             self._file_token))

    def _who(self) -> str:
        if self.settings.token_file and not self.settings.token:
            return f"the token in {self.settings.token_file} at {self.base}"
        if self.settings.username and not self.settings.token:
            return f"user {self.settings.username!r} at {self.base}"
        return f"the token (RECONCILER_AIRFLOW_TOKEN) at {self.base}"

    def _read_token_file(self) -> str:
        path = self.settings.token_file
        assert path is not None
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise AirflowAuthError(f"cannot read the Airflow token file {path}: "
                                   f"{exc.strerror or exc}") from None
        if not token:
            raise AirflowAuthError(f"the Airflow token file {path} is empty")
        self._file_token = token
        return token

    def _fetch_token(self) -> str:
        s = self.settings
        if s.token:
            return s.token
        if s.token_file:
            return self._read_token_file()
        if not s.username or s.password is None:
            raise AirflowAuthError(
                f"no Airflow credentials for {self.base}: set RECONCILER_AIRFLOW_USERNAME and "
                "RECONCILER_AIRFLOW_PASSWORD (or RECONCILER_AIRFLOW_TOKEN)")
        response = self._send("POST", "/auth/token", auth=False,
                              json={"username": s.username, "password": s.password})
        if response.status_code in (401, 403):
            raise AirflowAuthError(
                f"Airflow at {self.base} refused the password of user {s.username!r} "
                f"(HTTP {response.status_code}); check RECONCILER_AIRFLOW_USERNAME and "
                "RECONCILER_AIRFLOW_PASSWORD")
        if response.status_code == 404:
            raise AirflowNotFound(
                f"{self.base}/auth/token does not exist: is {self.base} an Airflow 3 API "
                "server with the simple or FAB auth manager? (set RECONCILER_AIRFLOW_TOKEN "
                "for other auth managers)")
        if response.status_code >= 400:
            raise AirflowRejected(f"POST {self.base}/auth/token answered "
                               f"{response.status_code}: {self._detail(response)}")
        try:
            return str(response.json()["access_token"])
        except (ValueError, KeyError, TypeError):
            raise AirflowRejected(f"POST {self.base}/auth/token answered {response.status_code} "
                               "without an access_token") from None

    def _send(self, method: str, path: str, *, auth: bool = True, retry: bool = True,
              **kwargs: Any) -> requests.Response:
        """One request with retries on connection errors, timeouts and 5xx."""
        headers = {}
        if auth:
            token = self._token
            if token is None:
                # Before the retry loop: the token request has its own retries and deadline.
                with self._token_lock:
                    if self._token is None:
                        self._token = self._fetch_token()
                    token = self._token
            headers["Authorization"] = f"Bearer {token}"
        started = self.clock.monotonic()
        deadline = self._deadline()

        def attempt() -> requests.Response:
            remaining = deadline - (self.clock.monotonic() - started)
            if remaining <= 0:
                raise _Retryable(self._no_answer(method, path, deadline), no_answer=True)
            # The read timeout never runs past the deadline: a hanging Airflow costs at
            # most `deadline` seconds in all, whatever settings.retries says.
            read = max(0.1, min(self.settings.timeout, remaining))
            timeout = (min(CONNECT_TIMEOUT, read), read)
            self._count()
            try:
                # The watchdog bounds the whole exchange: headers and body trickled a byte
                # at a time end at the deadline too (requests' timeout is per read).
                with self.watchdog.watch(remaining) as call:
                    try:
                        response = self.session.request(method, self._url + path,
                                                        headers=headers, timeout=timeout,
                                                        stream=True, **kwargs)
                        read_body(response, call, self.settings.max_answer_bytes)
                    except Expired:
                        raise _Retryable(self._no_answer(method, path, deadline),
                                         no_answer=True) from None
                    except requests.RequestException:
                        if call.expired:
                            raise _Retryable(self._no_answer(method, path, deadline),
                                             no_answer=True) from None
                        raise
            except BodyTooLarge as exc:
                raise AirflowAnswerTooLarge(
                    f"{method} {self.base}{path}: the answer is larger than "
                    f"{exc.limit:,} bytes ({'announced ' if exc.announced else ''}"
                    f"{exc.size:,}); raise RECONCILER_AIRFLOW_MAX_ANSWER_BYTES if it is "
                    "real", size=exc.size, announced=exc.announced) from None
            except requests.exceptions.SSLError as exc:
                # A certificate that does not verify needs a human, not a retry.
                raise AirflowRejected(
                    f"TLS with Airflow at {self.base} failed ({_ssl_reason(exc)}); give its "
                    "CA bundle with RECONCILER_AIRFLOW_CA (or REQUESTS_CA_BUNDLE)") from None
            except requests.Timeout as exc:
                raise _Retryable(f"{method} {self.base}{path} timed out after "
                                 f"{read:g} s",
                                 no_answer=not isinstance(exc, requests.ConnectTimeout)
                                 ) from None
            except requests.ConnectionError as exc:
                raise _Retryable(f"cannot connect to Airflow at {self.base} "
                                 f"({type(exc).__name__})") from None
            except (requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                # the answer broke off midway (an API server restarting): transient
                raise _Retryable(f"{method} {self.base}{path}: the answer broke off "
                                 f"({type(exc).__name__})") from None
            except requests.RequestException as exc:
                # InvalidURL, MissingSchema, ...: configuration, no retry can help
                raise AirflowRejected(f"cannot send {method} to {self.base}{path} "
                                   f"({type(exc).__name__}); check RECONCILER_AIRFLOW_URL"
                                   ) from None
            self._note_server_time(response)
            self.last_contact = self.clock.monotonic()
            if response.status_code >= 500:
                raise _Retryable(f"{method} {self.base}{path} answered "
                                 f"{response.status_code}: {self._detail(response)}")
            return response

        attempts = max(1, self.settings.retries) if retry else 1
        retrying = Retrying(
            stop=stop_any(stop_after_attempt(attempts), self._past(started, deadline)),
            sleep=self.sleep,
            # exponential, capped, plus up to `initial` of jitter (spreads replicas apart)
            wait=wait_exponential(multiplier=self._backoff[0], max=self._backoff[1])
            + wait_random(0, self._backoff[0]),
            retry=retry_if_exception_type(_Retryable), reraise=False)
        try:
            return retrying(attempt)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            message = self._redact(str(last))
            self.last_failure = (self.clock.monotonic(), message)
            raise AirflowUnavailable(message, no_answer=getattr(last, "no_answer", False)
                                     ) from None

    def _past(self, started: float, deadline: float) -> stop_base:
        """tenacity's stop_after_delay, on the client's clock (tenacity reads the real
        one)."""
        return _StopPast(self.clock, started, deadline)

    def _no_answer(self, method: str, path: str, deadline: float) -> str:
        return f"{method} {self.base}{path}: no whole answer within {deadline:g} s"

    def _note_server_time(self, response: requests.Response) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        # A malformed Date header only costs the server-side watermark.
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            self.server_time = parsedate_to_datetime(date).astimezone(UTC)
            self._server_time_at = self.clock.monotonic()

    def server_now(self) -> datetime | None:
        """Airflow's clock now, as its last `Date` header said, moved on by the client's
        monotonic clock since (None before any answer with a Date). The header is
        truncated to the second, so this is up to a second early: the safe side for a
        watermark."""
        if self.server_time is None:
            return None
        return self.server_time + timedelta(
            seconds=self.clock.monotonic() - self._server_time_at)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`_send` plus authentication: one token refresh, then 401/403 are errors."""
        response = self._send(method, path, **kwargs)
        if self._stale_token(response) and not self.settings.token:
            if self.settings.token_file:
                # A rotated token: read the file again; the same token is not sent twice.
                with self._token_lock:
                    sent, self._token = self._token, None
                    fresh = self._fetch_token()
                    self._token = fresh
                if fresh != sent:
                    response = self._send(method, path, **kwargs)
            else:
                self._token = None  # expired or signed with an old secret: one fresh token
                response = self._send(method, path, **kwargs)
        if response.status_code == 401:
            if self.settings.token:
                what = "set a fresh RECONCILER_AIRFLOW_TOKEN"
            elif self.settings.token_file:
                what = (f"the file was read again and holds no newer token; write a valid "
                        f"one to {self.settings.token_file}")
            else:
                what = ("a freshly issued token was refused too; check the API server's "
                        "[api_auth] JWT settings")
            raise AirflowAuthError(f"Airflow refused {self._who()} (HTTP 401: "
                                   f"{self._detail(response)}); {what}")
        if response.status_code == 403:
            if self._detail(response) == _INVALID_JWT:
                raise AirflowAuthError(f"Airflow did not accept the JWT of {self._who()} "
                                       "(HTTP 403: Invalid JWT token); set a token issued by "
                                       "this Airflow")
            raise AirflowAuthError(
                f"{self._who()} may not {method} {path} (HTTP 403); give it a role that can "
                "read DAGs and read, trigger and clear DAG runs (Airflow role 'User', or "
                "'user' with the simple auth manager)")
        return response

    @staticmethod
    def _stale_token(response: requests.Response) -> bool:
        if response.status_code == 401:
            return True
        return response.status_code == 403 and _detail_of(response) == _INVALID_JWT

    def _json(self, method: str, path: str, *, not_found: str | None = None,
              **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 404:
            raise AirflowNotFound(not_found or f"{method} {path}: not found in Airflow at "
                                               f"{self.base} ({self._detail(response)})")
        if response.status_code >= 400:
            rejected = AirflowRejected(f"{method} {self.base}{path} answered "
                                       f"{response.status_code}: {self._detail(response)}")
            rejected.status = response.status_code
            raise rejected
        try:
            return response.json() if response.content else {}
        except ValueError:
            raise AirflowRejected(f"{method} {self.base}{path} answered {response.status_code} "
                               "with a body that is not JSON: is this the Airflow API?") from None

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """`_json` where the API answers one object: anything else (`null`, a list, a
        string) is AirflowRejected, never a TypeError in the caller."""
        data = self._json(method, path, **kwargs)
        if not isinstance(data, dict):
            raise AirflowRejected(f"{method} {self.base}{path} answered a "
                                  f"{type(data).__name__}, not an object: is this the "
                                  "Airflow API?")
        return data

    def _detail(self, response: requests.Response) -> str:
        return self._redact(_detail_of(response))

    # --- the API ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /api/v2/monitor/health` (no auth): per component `{"status": "healthy"}`."""
        return self._object("GET", "/api/v2/monitor/health", auth=False)

    def list_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None,
                  page_size: int | None = None) -> list[dict[str, Any]]:
        """Every run matching the filters (all pages), as the API's dicts, oldest id first;
        `iter_runs` gives the same runs page by page without holding them all."""
        return list(self.iter_runs(dag_ids, updated_at_gte=updated_at_gte,
                                   logical_date_gte=logical_date_gte,
                                   logical_date_lte=logical_date_lte, page_size=page_size))

    def iter_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None,
                  page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """The runs of `list_runs`, one page at a time (`page_size`, default the settings'
        `page_size`, runs per request; the server may serve fewer).

        With `updated_at_gte` (the incremental pass): `GET /api/v2/dags/~/dagRuns`, the only
        form that filters on `updated_at`, with `dag_ids` applied here; one request when
        nothing changed. Without it but with `dag_ids` (a full relist):
        `POST /api/v2/dags/~/dagRuns/list`, which filters by DAG in Airflow, so the runs of
        unrelated DAGs never cross the wire. Pages are ordered by `id`, which new runs only
        extend, so a run created during the listing is not skipped.
        """
        size = self._page_size(page_size)
        # A set is taken as it is: the quiet pass asks with the graph's 50,000 ids, and
        # copying or sorting them cost more than its one request.
        keep = (None if dag_ids is None
                else dag_ids if isinstance(dag_ids, set | frozenset) else set(dag_ids))
        if keep is not None and not keep:
            return
        dates = {name: iso(value) for name, value in (("logical_date_gte", logical_date_gte),
                                                      ("logical_date_lte", logical_date_lte))
                 if value is not None}
        if keep is not None and updated_at_gte is None:
            pages = self._pages("POST", "/api/v2/dags/~/dagRuns/list", "dag_runs", size,
                                body={"dag_ids": sorted(keep), "order_by": "id", **dates},
                                what="run list")
        else:
            if updated_at_gte is not None:
                dates["updated_at_gte"] = iso(updated_at_gte)
            pages = self._pages("GET", "/api/v2/dags/~/dagRuns", "dag_runs", size,
                                params={"order_by": "id", **dates}, what="run list")
        for runs in pages:
            for run in runs:
                if isinstance(run, dict) and (keep is None or run.get("dag_id") in keep):
                    yield run

    def _page_size(self, page_size: int | None) -> int:
        """`page_size`, or the settings' when None: what every listing asks for a page."""
        size = self.settings.page_size if page_size is None else page_size
        if size < 1:
            # Airflow answers `limit=0` with an empty page, not with its default size.
            raise ValueError(f"page_size must be at least 1, got {size}")
        return size

    def _pages(self, method: str, path: str, field: str, page_size: int, *,
               params: Mapping[str, Any] | None = None, body: Mapping[str, Any] | None = None,
               not_found: str | None = None, what: str = "list") -> Iterator[list[Any]]:
        """Every page of an offset-paged listing, each as the list under `field`.

        GET takes `offset`/`limit`; the batch POST `page_offset`/`page_limit` in its body.
        The server caps `limit` at `[api] maximum_page_limit` without saying so, so the
        offset advances by what a page held and `total_entries`, not a short page, ends
        the listing.

        Bounded (`AirflowRunawayListing`): at most `settings.max_pages` pages (a
        `total_entries` that needs more is refused on the first page), at most
        `settings.listing_timeout` seconds in all, and a page that repeats an earlier one
        (a server that ignores the offset) ends it at once. A page over
        `settings.max_answer_bytes` (runs with a huge conf) is asked again in smaller
        pages, down to one item, before the listing gives up."""
        s = self.settings
        offset = 0
        pages = 0
        seen: set[tuple[Any, ...]] = set()
        started = self.clock.monotonic()
        while True:
            if self.clock.monotonic() - started > s.listing_timeout:
                raise AirflowRunawayListing(
                    f"the {what} from {self.base} took more than {s.listing_timeout:g} s "
                    f"({pages} pages, {offset} entries); raise "
                    "RECONCILER_AIRFLOW_LISTING_TIMEOUT if Airflow is that slow")
            try:
                if body is not None:
                    page = self._json(method, path, not_found=not_found,
                                      json={**body, "page_offset": offset,
                                            "page_limit": page_size})
                else:
                    page = self._json(method, path, not_found=not_found,
                                      params={**(params or {}), "limit": page_size,
                                              "offset": offset})
            except AirflowAnswerTooLarge:
                if page_size <= 1:
                    raise
                page_size = max(1, page_size // 4)
                continue
            if not isinstance(page, dict):
                raise AirflowRejected(f"the {what} from {self.base} is not an object: is this "
                                      "the Airflow API?")
            items = page.get(field) or []
            if not isinstance(items, list):
                raise AirflowRejected(f"the {what} from {self.base} has no list of {field}: "
                                      "is this the Airflow API?")
            total = page.get("total_entries")
            try:
                total = int(total or 0)
            except (TypeError, ValueError):
                raise AirflowRejected(f"the {what} from {self.base} has a total_entries that "
                                      f"is not a number ({str(total)[:40]!r})") from None
            pages += 1
            if items:
                if pages == 1 and total > offset and \
                        -(-total // len(items)) > s.max_pages:
                    raise AirflowRunawayListing(
                        f"the {what} from {self.base} claims {total:,} entries: more than "
                        f"{s.max_pages:,} pages of {len(items)}; raise "
                        "RECONCILER_AIRFLOW_MAX_PAGES if that is real")
                mark = (_identity(items[0]), _identity(items[-1]), len(items))
                if mark in seen:
                    raise AirflowRunawayListing(
                        f"the {what} from {self.base} does not advance: the page at offset "
                        f"{offset} repeats an earlier page (the server ignores the offset?)")
                seen.add(mark)
            yield items
            offset += len(items)
            if not items or offset >= total:
                return
            if pages >= s.max_pages:
                raise AirflowRunawayListing(
                    f"the {what} from {self.base} goes on past {s.max_pages:,} pages "
                    f"({offset:,} of {total:,} entries); raise RECONCILER_AIRFLOW_MAX_PAGES "
                    "if that is real")

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """One run, or None when Airflow has no such run (or no such DAG: both are 404)."""
        try:
            return self._object("GET", f"/api/v2/dags/{_path(dag_id)}/dagRuns/"
                                       f"{_path(run_id)}")
        except AirflowNotFound:
            return None

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the run, queued: `(run, True)`. If this very run exists already (409, a
        repeated or retried trigger): `(run, False)`, adopted.

        Airflow 3 answers the same 409 when another run id holds the logical date (unique
        `(dag_id, logical_date)`); that is `AirflowConflict` naming the other run.
        """
        if logical_date.tzinfo is None:
            raise ValueError(f"logical_date must be timezone-aware, got {logical_date!r}")
        body = {"dag_run_id": run_id, "logical_date": iso(logical_date), "conf": dict(conf)}
        response = self._request("POST", f"/api/v2/dags/{_path(dag_id)}/dagRuns", json=body)
        if response.status_code == 409:
            return self._adopt(dag_id, run_id, logical_date), False
        if response.status_code == 404:
            raise AirflowNotFound(f"DAG {dag_id!r} is not in Airflow at {self.base}: is the DAG "
                                  "file deployed, parsed without import errors and not stale?")
        if response.status_code >= 400:
            raise AirflowRejected(f"trigger of DAG {dag_id!r} run {run_id!r} answered "
                               f"{response.status_code}: {self._detail(response)}")
        try:
            return dict(response.json()), True
        except (ValueError, TypeError):
            raise AirflowRejected(f"trigger of DAG {dag_id!r} run {run_id!r} answered "
                               f"{response.status_code} with a body that is not a run"
                               ) from None

    def _adopt(self, dag_id: str, run_id: str, logical_date: datetime) -> dict[str, Any]:
        existing = self.get_run(dag_id, run_id)
        if existing is not None:
            if parse_time(existing.get("logical_date")) == logical_date.astimezone(UTC):
                return existing
            raise AirflowConflict(
                f"DAG {dag_id!r} already has run {run_id!r} with logical date "
                f"{existing.get('logical_date')}, not {iso(logical_date)}; that run was not "
                "made by the reconciler: delete or rename it", existing)
        holders = self.list_runs([dag_id], logical_date_gte=logical_date)
        other = next((r for r in holders
                      if parse_time(r.get("logical_date")) == logical_date.astimezone(UTC)),
                     None)
        named = f" (run {other['dag_run_id']!r})" if other else ""
        raise AirflowConflict(
            f"DAG {dag_id!r} already has another run for logical date {iso(logical_date)}"
            f"{named}, so run {run_id!r} cannot be created (Airflow allows one run per "
            "logical date)", other)

    def clear(self, dag_id: str, run_id: str, *,
              cleared_end: datetime | None = None) -> tuple[dict[str, Any], bool]:
        """Re-run a finished run (same run id, all tasks cleared), at most once.

        `POST .../clear` is not idempotent: a second one re-runs the run again. So it is
        never retried blindly. When an attempt fails (5xx, dropped connection, timeout:
        it may have taken effect), the run is read first; if it has restarted (queued or
        running, or an end date other than `cleared_end`, the one this clear was decided
        on) the clear took effect and is not sent again.

        A POST that got no answer at all (a read timeout: the API server may still be
        working on it and apply it later) is never sent again within this call, even
        when the run reads as not restarted yet: the AirflowUnavailable (`no_answer`)
        leaves the outcome unconfirmed. The caller keeps the intent with `cleared_end`,
        and a later pass reads the run first and clears once only if it never restarted.

        Returns `(run, True)` when this call's POST answered, `(run, False)` when an
        earlier attempt (or a clear before this call: a retry after a crash) had
        already restarted it. `dry_run` must be sent: it defaults to true.
        """
        path = f"/api/v2/dags/{_path(dag_id)}/dagRuns/{_path(run_id)}/clear"
        missing = f"run {run_id!r} of DAG {dag_id!r} is not in Airflow at {self.base}"
        started = self.clock.monotonic()
        deadline = self._deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._object("POST", path, json={"dry_run": False}, retry=False,
                                    not_found=missing), True
            except AirflowUnavailable as exc:
                unanswered = exc
                if not exc.no_answer and (attempt >= max(1, self.settings.retries) or
                                          self.clock.monotonic() - started >= deadline):
                    raise
            # The answer is lost: look before sending it again.
            left = deadline - (self.clock.monotonic() - started)
            if left <= 0:
                raise unanswered
            with self.deadline_of(max(0.1, left)):
                run = self.get_run(dag_id, run_id)
            if run is None:
                raise AirflowNotFound(missing)
            if restarted(run, cleared_end):
                return run, False
            if unanswered.no_answer:
                # Still in flight, perhaps: a second POST could re-run the run twice.
                raise AirflowUnavailable(
                    f"{unanswered}; the clear of run {run_id!r} of DAG {dag_id!r} is "
                    "unconfirmed (not sent again: it may still take effect)",
                    no_answer=True) from None
            self.sleep(min(self._backoff[1], self._backoff[0] * 2 ** (attempt - 1)))

    def task_instances(self, dag_id: str, run_id: str,
                       page_size: int | None = None) -> list[dict[str, Any]]:
        """Every task instance of one run (mapped ones: one per map index), all pages of
        `page_size` (default the settings'; Airflow caps it at `[api] maximum_page_limit`
        and the pages follow what it served): `task_id`, `map_index`, `state`, ..."""
        path = f"/api/v2/dags/{_path(dag_id)}/dagRuns/{_path(run_id)}/taskInstances"
        missing = f"run {run_id!r} of DAG {dag_id!r} is not in Airflow at {self.base}"
        return [t for page in self._pages("GET", path, "task_instances",
                                          self._page_size(page_size),
                                          not_found=missing, what="task list")
                for t in page if isinstance(t, dict)]

    def task_instances_of(self, runs: Iterable[tuple[str, str]], page_size: int | None = None
                          ) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every task instance of each of `runs` ((dag_id, run_id) pairs), in one batch
        listing per `TASK_BATCH` runs (`POST /api/v2/dags/~/dagRuns/~/taskInstances/list`,
        `dag_ids` x `dag_run_ids`, all pages) instead of one request per run: a hundred
        roots ending together cost one request, not a hundred. Airflow filters the two
        lists apart, so what it adds (another DAG's run of the same id) is dropped here; a
        run with no task instances maps to []. An Airflow that refuses the batch form
        (Airflow 2 before 2.10 has no paging in it) is asked run by run from then on."""
        wanted = sorted(set(runs))
        out: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in wanted}
        if not self.batch_task_instances:
            for dag_id, run_id in wanted:
                with contextlib.suppress(AirflowNotFound):  # gone since: nothing to wait for
                    out[(dag_id, run_id)] = self.task_instances(dag_id, run_id, page_size)
            return out
        path = "/api/v2/dags/~/dagRuns/~/taskInstances/list"
        for start in range(0, len(wanted), TASK_BATCH):
            chunk = wanted[start:start + TASK_BATCH]
            body = {"dag_ids": sorted({d for d, _ in chunk}),
                    "dag_run_ids": sorted({r for _, r in chunk})}
            try:
                for page in self._pages("POST", path, "task_instances",
                                        self._page_size(page_size), body=body,
                                        what="task instance batch"):
                    for ti in page:
                        if isinstance(ti, dict):
                            key = (str(ti.get("dag_id")), str(ti.get("dag_run_id")))
                            if key in out:
                                out[key].append(ti)
            except (AirflowNotFound, AirflowRejected) as exc:
                if start or getattr(exc, "status", 404) not in BATCH_REFUSED:
                    raise
                self.batch_task_instances = False  # this Airflow has no such batch
                return self.task_instances_of(wanted, page_size)
        return out

    def list_dags(self, page_size: int | None = None) -> list[dict[str, Any]]:
        """Every DAG Airflow knows (`GET /api/v2/dags`, all pages as `task_instances`):
        `dag_id`, `is_paused`, `timetable_summary` (null or "None" when it has no
        schedule), `is_stale`, ..."""
        return [d for page in self._pages("GET", "/api/v2/dags", "dags",
                                          self._page_size(page_size),
                                          what="DAG list")
                for d in page if isinstance(d, dict)]

    def unpause(self, dag_id: str) -> dict[str, Any]:
        """`PATCH /api/v2/dags/{dag_id}` `{"is_paused": false}`; answers the DAG."""
        return self._object(
            "PATCH", f"/api/v2/dags/{_path(dag_id)}", json={"is_paused": False},
            not_found=f"DAG {dag_id!r} is not in Airflow at {self.base}: is the DAG file "
                      "deployed and parsed?")


def _identity(item: Any) -> tuple[Any, ...]:
    """What tells one listed item from another (a run, a task instance, a DAG)."""
    if not isinstance(item, dict):
        return (repr(item)[:200],)
    return tuple(str(item.get(k)) for k in ("dag_id", "dag_run_id", "task_id", "map_index",
                                            "logical_date", "id"))


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    for known in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "hostname mismatch"):
        if known in text:
            return known.lower().replace("_", " ")
    return type(exc).__name__


def configure_session(session: requests.Session, settings: AirflowSettings, url: str) -> None:
    """TLS verification and proxies of one session, from the settings only (trust_env
    stays off: the environment is read only with `proxy_from_env`)."""
    if settings.ca:
        session.verify = settings.ca
    if settings.proxy:
        session.proxies = {"http": settings.proxy, "https": settings.proxy}
    elif settings.proxy_from_env:
        # HTTP(S)_PROXY / ALL_PROXY, minus NO_PROXY for this URL's host
        session.proxies = dict(requests.utils.get_environ_proxies(url))


def restarted(run: Mapping[str, Any], cleared_end: datetime | None) -> bool:
    """Whether a run was re-run since it ended at `cleared_end`: queued or running
    again, or finished with another end date. Airflow resets `end_date` on clear."""
    if run.get("state") in ("queued", "running"):
        return True
    end = parse_time(run.get("end_date"))
    return cleared_end is not None and end != cleared_end.astimezone(UTC)


def _detail_of(response: requests.Response) -> str:
    """The `detail` of an error answer, short. Airflow's 409/500 details are dicts."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    if isinstance(detail, dict):
        detail = detail.get("reason") or detail.get("message") or detail
    return str(detail)[:300]
