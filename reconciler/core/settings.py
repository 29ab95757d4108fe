"""One settings tree: every knob is a field with a default; the CLI fills it from flags and
the environment variables fixed in DESIGN section 7. Code takes settings, never os.environ.
Secrets are excluded from repr so they are never printed or logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """'2d', '6h', '30m', '90s' or plain seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 6h, 2d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "reconciler"
    namespace: str = "default"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    """Seconds for one etcd request; a one-shot command gives up after trying every endpoint."""

    @property
    def root(self) -> str:
        """The key prefix of this namespace, e.g. ``/reconciler/default/``."""
        return f"/{self.prefix.strip('/')}/{self.namespace.strip('/')}/"


@dataclass(frozen=True)
class AirflowSettings:
    url: str = "http://localhost:8080"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    """Seconds for one HTTP request (connect and read)."""
    retries: int = 4
    ca: str | None = None
    """CA bundle (PEM file or folder) to verify Airflow's TLS certificate; None: the
    system's / certifi's roots. The CLI fills it from RECONCILER_AIRFLOW_CA, else
    REQUESTS_CA_BUNDLE."""
    proxy: str | None = None
    """An HTTP(S) proxy URL for every Airflow request. None (and not proxy_from_env):
    Airflow is reached directly, so the bearer token never crosses a proxy nobody asked for."""
    proxy_from_env: bool = False
    """Use HTTP_PROXY / HTTPS_PROXY / NO_PROXY of the environment (opt-in)."""
    token_file: str | None = None
    """A file holding the bearer token (managed Airflow services rotate it): read at start
    and again when Airflow answers 401."""
    page_size: int = 1000
    """Runs (task instances, DAGs) asked for per list request. Airflow's list endpoints
    silently serve at most `[api] maximum_page_limit` (default 100); set
    AIRFLOW__API__MAXIMUM_PAGE_LIMIT to at least this, or each request brings only 100 (the
    listing stays complete, just slower: a relist of 150,000 runs is 1,500 requests at 100,
    150 at 1000)."""
    api: str = "auto"
    """Which REST API to speak: "v2" (Airflow 3), "v1" (Airflow 2, basic auth), or "auto":
    asked of the server once at start (`/api/v2/version`, then `/api/v1/version`)."""

    max_answer_bytes: int = 64 * 1024 * 1024
    """The largest answer (one page of a listing) read from Airflow; a bigger one is
    refused before it is held (a listing asks again in smaller pages first)."""
    max_pages: int = 10_000
    """Pages one listing may take; a `total_entries` that needs more is refused at once."""
    listing_timeout: float = 120.0
    """Seconds one listing (all its pages) may take in all."""

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"--airflow-page-size must be at least 1, got {self.page_size}")
        if self.max_answer_bytes < 1024:
            raise ValueError("RECONCILER_AIRFLOW_MAX_ANSWER_BYTES must be at least 1024, got "
                             f"{self.max_answer_bytes}")
        if self.max_pages < 1:
            raise ValueError(f"RECONCILER_AIRFLOW_MAX_PAGES must be at least 1, got "
                             f"{self.max_pages}")
        if not self.listing_timeout > 0:
            raise ValueError("RECONCILER_AIRFLOW_LISTING_TIMEOUT must be above 0, got "
                             f"{self.listing_timeout:g}")

        if self.api not in ("auto", "v1", "v2"):
            raise ValueError(f"--airflow-api must be auto, v1 or v2, got {self.api!r}")


@dataclass(frozen=True)
class GitSettings:
    """Credentials of pull mode's remote, besides those in its URL. They reach git through
    the environment of each git process only (never the clone's config or a command line)."""

    username: str | None = None
    """Sent with the token; default: the URL's user, else `x-access-token`."""
    token: str | None = field(default=None, repr=False)
    """RECONCILER_GIT_TOKEN (never a flag)."""
    token_file: str | None = None
    """A file holding the token, read again at each fetch (rotated tokens)."""


@dataclass(frozen=True)
class LoopSettings:
    window: timedelta = timedelta(days=2)
    interval: float = 5.0
    relist_interval: float = 600.0
    lease_ttl: int = 10
    http_port: int = 9102
    """Port of /healthz, /readyz and /metrics (0 = off)."""
    http_host: str = "127.0.0.1"
    log_format: str = "text"
    concurrency: int = 8
    """The most Airflow calls of one pass in flight at once (a fan-out is one round trip,
    not N). The ceiling: the limit in use adapts below it to how Airflow answers
    (core/pacing.py), from 1 up; 1 makes it a hard cap."""
    call_deadline: float | None = None
    """Seconds one action's Airflow call may take in all, retries included. Default: half
    the lease, so an action that starts with enough lease ends while we still lead."""
    pull_interval: float = 30.0
    eager: bool = True
    """Count an upstream as succeeded once every task of its run is done (confirmed through
    the REST API after a task-level event), before Airflow closes the run."""
    stall_after: float | None = None
    """/healthz fails when no pass ended for this long. Default: 10 intervals, and a
    minute past the pass deadline."""
    pass_deadline: float = 180.0
    """A pass running longer than this is stuck: the leader gives up its lease (a standby
    takes over) and is not ready until a pass ends. Above the listing timeout, so a slow
    but advancing relist is not taken for a stuck one."""
    max_clock_skew: float = 30.0
    """Seconds our clock may differ from Airflow's (its Date header) before a warning, the
    gauge and `doctor` say so. The loop follows Airflow's clock either way."""

    def __post_init__(self) -> None:
        problems = []
        if not self.interval > 0:
            problems.append(f"--interval must be above 0 seconds, got {self.interval:g}")
        if not self.relist_interval > 0:
            problems.append(f"--relist-interval must be above 0, got {self.relist_interval:g}")
        if self.lease_ttl < 2:
            problems.append(f"--lease-ttl must be at least 2 seconds, got {self.lease_ttl}")
        if self.window <= timedelta(0):
            problems.append(f"--window must be above 0, got {self.window}")
        if self.concurrency < 1:
            problems.append(f"--concurrency must be at least 1, got {self.concurrency}")
        if not self.pull_interval > 0:
            problems.append(f"--pull-interval must be above 0, got {self.pull_interval:g}")
        if self.call_deadline is not None and not 0 < self.call_deadline < self.lease_ttl:
            problems.append(f"--airflow-deadline must be between 0 and the lease TTL "
                            f"({self.lease_ttl} s), got {self.call_deadline:g}")
        if not self.pass_deadline > self.lease_ttl:
            problems.append(f"--pass-deadline must be above the lease TTL ({self.lease_ttl} s), "
                            f"got {self.pass_deadline:g}")
        if not self.max_clock_skew > 0:
            problems.append(f"--max-clock-skew must be above 0, got {self.max_clock_skew:g}")
        if not 0 <= self.http_port < 65536:
            problems.append(f"--http-port must be 0-65535, got {self.http_port}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def action_deadline(self) -> float:
        # Half the lease: a renewal every third of it leaves at least two thirds, so an
        # action (deadline + margin) can start whenever the lease is healthy.
        return self.call_deadline if self.call_deadline is not None else self.lease_ttl / 2

    @property
    def liveness_timeout(self) -> float:
        if self.stall_after is not None:
            return self.stall_after
        return max(10 * self.interval, 120.0, self.pass_deadline + 60.0)


@dataclass(frozen=True)
class Settings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    airflow: AirflowSettings = field(default_factory=AirflowSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
