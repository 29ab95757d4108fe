"""`run` (the loop, the container's entrypoint) and `plan` (dry run); `status` and the
other operator commands are in operate_cmds.py.

Every option has an environment variable; times accept durations (`30s`, `5m`, `2d`) or
plain seconds. Settings that cannot work (an interval of 0, a lease under 2 s, a user
without a password) exit 2 at start with one line, before anything connects.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from reconciler.cli.app import fail, handle_errors, main, nothing_synced
from reconciler.cli.options import etcd_options, output_option
from reconciler.core.errors import ReconcilerError
from reconciler.core.safe_text import printable
from reconciler.core.settings import (
    AirflowSettings,
    EtcdSettings,
    GitSettings,
    LoopSettings,
    parse_duration,
)
from reconciler.core.state import LedgerEntry, Plan, iso
from reconciler.core.words import counted

STOP_GRACE = 8.0
"""Seconds `run` waits, after SIGTERM, for the pass under way to end before it exits
anyway (the leader key is released at once, on another thread)."""

ONE_SHOT_DEADLINE = 8.0
"""Seconds a one-shot command (plan, status) gives each Airflow call, retries included:
against a hung Airflow it answers within about 10 s."""


def _read_secret_file(path: str | None, option: str) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        fail(f"{option} {path}: not a UTF-8 text file")
    except OSError as exc:
        fail(f"{option} {path}: cannot read it ({exc.strerror})")


def _seconds(_ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
    """A duration (`30s`, `5m`, `1h`) or plain seconds -> seconds."""
    if value is None:
        return None
    try:
        return parse_duration(str(value)).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def airflow_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--airflow-* options (and their environment variables) -> one `airflow` kwarg."""

    @functools.wraps(func)
    def wrapper(*args: Any, airflow_url: str, airflow_username: str | None,
                airflow_password_file: str | None, airflow_timeout: float,
                airflow_ca: str | None, airflow_proxy: str | None,
                airflow_proxy_from_env: bool, airflow_token_file: str | None,
                airflow_page_size: int, airflow_max_answer_bytes: int,
                airflow_max_pages: int, airflow_listing_timeout: float, airflow_api: str,
                **kwargs: Any) -> Any:
        password = (_read_secret_file(airflow_password_file, "--airflow-password-file")
                    or os.environ.get("RECONCILER_AIRFLOW_PASSWORD") or None)
        token = os.environ.get("RECONCILER_AIRFLOW_TOKEN") or None
        if not airflow_timeout > 0:
            fail(f"--airflow-timeout must be above 0 seconds, got {airflow_timeout:g}")
        try:
            kwargs["airflow"] = AirflowSettings(
                url=airflow_url.rstrip("/"), username=airflow_username, password=password,
                token=token, timeout=airflow_timeout,
                # the variable requests itself would read, when ours is not set
                ca=airflow_ca or os.environ.get("REQUESTS_CA_BUNDLE") or None,
                proxy=airflow_proxy or None, proxy_from_env=airflow_proxy_from_env,
                token_file=airflow_token_file or None, page_size=airflow_page_size,
                max_answer_bytes=airflow_max_answer_bytes, max_pages=airflow_max_pages,
                listing_timeout=airflow_listing_timeout, api=airflow_api)
        except ValueError as exc:
            fail(str(exc))
        return func(*args, **kwargs)

    options = [
        click.option("--airflow-url", envvar="RECONCILER_AIRFLOW_URL",
                     default="http://localhost:8080", show_default=True,
                     help="Airflow 3 API server [RECONCILER_AIRFLOW_URL]."),
        click.option("--airflow-username", envvar="RECONCILER_AIRFLOW_USERNAME",
                     help="User for /auth/token [RECONCILER_AIRFLOW_USERNAME]; its password "
                     "comes from RECONCILER_AIRFLOW_PASSWORD (or a static token from "
                     "RECONCILER_AIRFLOW_TOKEN), never from a flag."),
        click.option("--airflow-password-file", envvar="RECONCILER_AIRFLOW_PASSWORD_FILE",
                     type=click.Path(dir_okay=False),
                     help="Read the Airflow password from this file "
                     "[RECONCILER_AIRFLOW_PASSWORD_FILE]."),
        click.option("--airflow-timeout", envvar="RECONCILER_AIRFLOW_TIMEOUT", default="10",
                     callback=_seconds, show_default=True,
                     help="Seconds for one Airflow request [RECONCILER_AIRFLOW_TIMEOUT]."),
        click.option("--airflow-ca", envvar="RECONCILER_AIRFLOW_CA",
                     type=click.Path(exists=True),
                     help="CA bundle to verify Airflow's TLS certificate "
                     "[RECONCILER_AIRFLOW_CA, else REQUESTS_CA_BUNDLE]."),
        click.option("--airflow-proxy", envvar="RECONCILER_AIRFLOW_PROXY",
                     help="HTTP(S) proxy URL for Airflow requests [RECONCILER_AIRFLOW_PROXY]; "
                     "default: none, Airflow is reached directly."),
        click.option("--airflow-proxy-from-env/--no-airflow-proxy-from-env",
                     envvar="RECONCILER_AIRFLOW_PROXY_FROM_ENV", default=False,
                     help="Use HTTP(S)_PROXY and NO_PROXY for Airflow requests (the bearer "
                     "token then crosses that proxy) [RECONCILER_AIRFLOW_PROXY_FROM_ENV]."),
        click.option("--airflow-token-file", envvar="RECONCILER_AIRFLOW_TOKEN_FILE",
                     type=click.Path(dir_okay=False),
                     help="Read the bearer token from this file, again on a 401 (rotated "
                     "tokens) [RECONCILER_AIRFLOW_TOKEN_FILE]."),
        click.option("--airflow-page-size", envvar="RECONCILER_AIRFLOW_PAGE_SIZE",
                     type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Runs (task instances, DAGs) asked for per list request; Airflow "
                     "serves at most its [api] maximum_page_limit (default 100): set "
                     "AIRFLOW__API__MAXIMUM_PAGE_LIMIT to match "
                     "[RECONCILER_AIRFLOW_PAGE_SIZE]."),
        click.option("--airflow-max-answer-bytes", envvar="RECONCILER_AIRFLOW_MAX_ANSWER_BYTES",
                     type=click.IntRange(min=1024), default=64 * 1024 * 1024,
                     show_default=True, help="The largest answer (one page) read from "
                     "Airflow; a larger page is asked again in smaller pages, a larger "
                     "single item is an error [RECONCILER_AIRFLOW_MAX_ANSWER_BYTES]."),
        click.option("--airflow-max-pages", envvar="RECONCILER_AIRFLOW_MAX_PAGES",
                     type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="Pages one listing may take [RECONCILER_AIRFLOW_MAX_PAGES]."),
        click.option("--airflow-listing-timeout", envvar="RECONCILER_AIRFLOW_LISTING_TIMEOUT",
                     default="120", callback=_seconds, show_default=True,
                     help="Seconds one listing (all its pages) may take "
                     "[RECONCILER_AIRFLOW_LISTING_TIMEOUT]."),
        click.option("--airflow-api", envvar="RECONCILER_AIRFLOW_API",
                     type=click.Choice(["auto", "v1", "v2"]), default="auto",
                     show_default=True,
                     help="REST API: v2 (Airflow 3), v1 (Airflow 2, basic auth), or auto: "
                     "asked of the server once at start [RECONCILER_AIRFLOW_API]."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def loop_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Window, interval and the other knobs of the loop -> one `loop` kwarg."""

    @functools.wraps(func)
    def wrapper(*args: Any, window: timedelta, interval: float, relist_interval: float,
                lease_ttl: float, http_host: str, http_port: int, log_format: str,
                concurrency: int, airflow_deadline: float | None, eager: bool,
                pass_deadline: float, max_clock_skew: float, **kwargs: Any) -> Any:
        try:
            kwargs["loop"] = LoopSettings(
                window=window, interval=interval, relist_interval=relist_interval,
                lease_ttl=int(lease_ttl), http_host=http_host, http_port=http_port,
                log_format=log_format, concurrency=concurrency,
                call_deadline=airflow_deadline, eager=eager,
                pull_interval=kwargs.get("pull_interval") or 30.0,
                pass_deadline=pass_deadline, max_clock_skew=max_clock_skew)
        except ValueError as exc:
            fail(str(exc))
        return func(*args, **kwargs)

    options = [
        click.option("--window", envvar="RECONCILER_WINDOW", default="2d", show_default=True,
                     callback=_duration, help="Lookback: a cycle is open while its root run "
                     "was queued, started or ended this recently [RECONCILER_WINDOW]."),
        click.option("--interval", envvar="RECONCILER_INTERVAL", default="5",
                     callback=_seconds, show_default=True,
                     help="Seconds between passes [RECONCILER_INTERVAL]."),
        click.option("--relist-interval", envvar="RECONCILER_RELIST_INTERVAL", default="600",
                     callback=_seconds, show_default=True,
                     help="Seconds between full relists of the runs "
                     "[RECONCILER_RELIST_INTERVAL]."),
        click.option("--lease-ttl", envvar="RECONCILER_LEASE_TTL", default="10",
                     callback=_seconds, show_default=True,
                     help="Seconds of the leader lease [RECONCILER_LEASE_TTL]."),
        click.option("--airflow-deadline", envvar="RECONCILER_AIRFLOW_DEADLINE", default=None,
                     callback=_seconds, help="Seconds one action's Airflow call may take in "
                     "all, retries included (default: half the lease) "
                     "[RECONCILER_AIRFLOW_DEADLINE]."),
        click.option("--pass-deadline", envvar="RECONCILER_PASS_DEADLINE", default="180",
                     callback=_seconds, show_default=True,
                     help="Seconds a pass may run; past it the replica is not ready and a "
                     "leader gives its lease to a standby until a pass ends "
                     "[RECONCILER_PASS_DEADLINE]."),
        click.option("--max-clock-skew", envvar="RECONCILER_MAX_CLOCK_SKEW", default="30",
                     callback=_seconds, show_default=True,
                     help="Seconds this machine's clock may differ from Airflow's before a "
                     "warning (the loop follows Airflow's clock either way) "
                     "[RECONCILER_MAX_CLOCK_SKEW]."),
        click.option("--concurrency", envvar="RECONCILER_CONCURRENCY", type=int, default=8,
                     show_default=True, help="The most Airflow calls in flight at once: "
                     "the limit starts at 1 and adapts below this ceiling to how promptly "
                     "Airflow answers (an Airflow on SQLite gets 1) "
                     "[RECONCILER_CONCURRENCY]."),
        click.option("--eager/--no-eager", envvar="RECONCILER_EAGER", default=True,
                     show_default=True, help="Trigger a downstream once every task of its "
                     "upstream run is done (the listener plugin's task events), before "
                     "Airflow closes the run [RECONCILER_EAGER]."),
        click.option("--http-host", envvar="RECONCILER_HTTP_HOST", default="127.0.0.1",
                     show_default=True, help="Address of /healthz, /readyz, /metrics; "
                     "0.0.0.0 in a container [RECONCILER_HTTP_HOST]."),
        click.option("--http-port", envvar="RECONCILER_HTTP_PORT", type=int, default=9102,
                     show_default=True, help="Port of /healthz, /readyz, /metrics (0: off) "
                     "[RECONCILER_HTTP_PORT]."),
        click.option("--log-format", envvar="RECONCILER_LOG_FORMAT",
                     type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="[RECONCILER_LOG_FORMAT]"),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _open(etcd: EtcdSettings, airflow: AirflowSettings, *,
          deadline: float | None = None, wait: threading.Event | None = None
          ) -> tuple[Any, Any]:
    from reconciler.adapters.airflow import DEFAULT_DEADLINE
    from reconciler.adapters.store import EtcdStore

    api = airflow_fleet(airflow, deadline=deadline or DEFAULT_DEADLINE, wait=wait)
    return EtcdStore(etcd), api


def airflow_fleet(airflow: AirflowSettings, *, deadline: float,
                  wait: threading.Event | None = None) -> Any:
    """Every deployment of the synced graph as one Airflow API (adapters/airflow_fleet.py):
    the settings' Airflow is the implicit `default` deployment; a declared one gets its
    client on first use, with the settings' timeouts, TLS and proxy, and the credentials
    read from where its declaration says."""
    from reconciler.adapters.airflow_detect import client_for, detect
    from reconciler.adapters.airflow_fleet import AirflowFleet, settings_for
    from reconciler.core.graph import Deployment
    from reconciler.service.observability import event

    def connect(declaration: Deployment) -> Any:
        settings = settings_for(declaration, airflow, os.environ)
        found = detect(settings, deadline=min(deadline, ONE_SHOT_DEADLINE))
        event("airflow api", deployment=declaration.name, api=found.generation,
              version=found.version or "not said", chosen=found.chosen)
        return client_for(found, settings, deadline=deadline)

    return AirflowFleet(_airflow_client(airflow, deadline=deadline, wait=wait), connect)


def held_back(result: Plan, observer: Any, api: Any,
              ledger: Mapping[tuple[datetime, str], LedgerEntry]) -> Plan:
    """A one-shot command's plan as the loop would act on it: nothing of a deployment
    that cannot be reached, whose pipelines say so, and no trigger of a moved pipeline
    whose last call went to a deployment it left that cannot be read (core/plan.py
    hold_back, hold_moved)."""
    from reconciler.core.plan import hold_back, hold_moved

    unreachable: Mapping[str, str] = observer.unreachable
    unread: Mapping[str, str] = observer.moved_unread
    if not unreachable and not unread:
        return result
    for _, why in sorted(unreachable.items()):
        click.echo(f"warning: {why} (its pipelines are shown as last seen)", err=True)

    def deployment_of(name: str) -> str:
        return str(api.where(name)[0])
    result = hold_moved(result, ledger, {**unread, **unreachable}, deployment_of)
    return hold_back(result, unreachable, deployment_of) if unreachable else result


def _airflow_client(airflow: AirflowSettings, *, deadline: float,
                    wait: threading.Event | None = None) -> Any:
    """The client of the REST API the settings choose or the server speaks (asked once,
    logged). A wrong explicit choice is one line and exit 2. Airflow unreachable: a
    one-shot command exits 2; with `wait` (the loop) it is asked again every few seconds
    until it answers or `wait` is set (a stop signal: exit 0)."""
    from reconciler.adapters.airflow import AirflowUnavailable
    from reconciler.adapters.airflow_detect import client_for, detect
    from reconciler.service.observability import event

    told = False
    while True:
        try:
            found = detect(airflow, deadline=min(deadline, ONE_SHOT_DEADLINE))
            break
        except AirflowUnavailable as exc:
            if wait is None:
                fail(str(exc))
            if not told:
                event("waiting for Airflow to tell its API", logging.WARNING, error=str(exc))
                told = True
            if wait.wait(5.0):
                raise SystemExit(0) from None
        except ReconcilerError as exc:
            fail(str(exc))
    event("airflow api", api=found.generation, version=found.version or "not said",
          chosen=found.chosen)
    return client_for(found, airflow, deadline=deadline)


def _require_credentials(airflow: AirflowSettings) -> None:
    if airflow.token or airflow.token_file:
        return
    if not airflow.username:
        fail("no Airflow credentials: set RECONCILER_AIRFLOW_USERNAME and "
             "RECONCILER_AIRFLOW_PASSWORD (or RECONCILER_AIRFLOW_TOKEN or "
             "RECONCILER_AIRFLOW_TOKEN_FILE)")
    if airflow.password is None:
        fail(f"Airflow user {airflow.username!r} has no password: set "
             "RECONCILER_AIRFLOW_PASSWORD (or --airflow-password-file)")


def _fresh_plan(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta
                ) -> tuple[Plan, str]:
    """Observe everything once and plan, changing nothing (for `plan` and `status`)."""
    from reconciler.adapters.clock import SystemClock
    from reconciler.core.plan import plan
    from reconciler.service.observer import Observer

    _require_credentials(airflow)
    from reconciler.adapters.store import EtcdStore

    store = EtcdStore(etcd)
    try:
        # Before Airflow is asked anything: an empty namespace is one line, like every
        # command's (and the loop's hints are not ours).
        if store.read_head()[0] is None:
            nothing_synced(etcd)
        api = airflow_fleet(airflow, deadline=ONE_SHOT_DEADLINE)
        settings = LoopSettings(window=window)
        observer = Observer(store, api, settings, SystemClock())
        observer.log_quarantine = False  # each key is named below, in one line
        seen = observer.observe(with_ledger=False)
        if seen.desired is None:
            for key, why in observer.quarantined.items():  # the head or graph: name it
                fail(f"unreadable value at {key}: {why}")
            nothing_synced(etcd)
        ledger = observer.read_ledger()
        for key, why in observer.quarantined.items():  # skipped, each named in one line
            click.echo(f"warning: unreadable value at {key}: {why} (skipped)", err=True)
        result = plan(seen.desired.graph, seen.runs.values(), ledger, seen.now,
                      window=window, since=seen.desired.since, commit=seen.desired.commit)
        return held_back(result, observer, api, ledger), seen.desired.commit
    except ReconcilerError as exc:
        fail(str(exc))
    finally:
        store.close()


def _window_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--window", envvar="RECONCILER_WINDOW", default="2d",
                        callback=_duration, show_default=True,
                        help="Lookback [RECONCILER_WINDOW].")(func)


def _output_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return output_option(["text", "json"], "text")(func)


@main.command("plan")
@etcd_options
@airflow_options
@_window_option
@_output_option
@handle_errors
def plan_command(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta,
                 output: str) -> None:
    """What the loop would do now (a dry run: nothing is written or triggered)."""
    result, commit = _fresh_plan(etcd, airflow, window)
    if output == "json":
        click.echo(json.dumps({"kind": "Plan", "commit": commit, "actions": [
            {"kind": a.kind.value, "dag_id": a.dag_id, "cycle": iso(a.cycle),
             "run_id": a.run_id, "reason": a.reason} for a in result.actions]}, indent=2))
        return
    if not result.actions:
        click.echo(f"nothing to do ({counted(len(result.cycles), 'open cycle')}, commit "
                   f"{commit[:12]})")
    for a in result.actions:
        click.echo(f"{a.kind.value:8} {printable(a.dag_id)} cycle {iso(a.cycle)} run "
                   f"{printable(a.run_id)}: {printable(a.reason)}")


@main.command()
@etcd_options
@airflow_options
@click.option("--repo", envvar="RECONCILER_REPO", default=None,
              help="Pull mode: a git URL or path; new commits of --branch are synced by "
              "the leader itself [RECONCILER_REPO].")
@click.option("--branch", envvar="RECONCILER_BRANCH", default="main", show_default=True,
              help="[RECONCILER_BRANCH]")
@click.option("--path", "subdir", envvar="RECONCILER_PATH", default="pipelines",
              show_default=True,
              help="Folder of the pipeline files inside the repository [RECONCILER_PATH].")
@click.option("--pull-interval", envvar="RECONCILER_PULL_INTERVAL", default="30",
              callback=_seconds, show_default=True,
              help="Seconds between fetches in pull mode [RECONCILER_PULL_INTERVAL].")
@click.option("--workdir", envvar="RECONCILER_WORKDIR", type=click.Path(file_okay=False),
              default=None, help="Where pull mode keeps its clone (default: a cache folder) "
              "[RECONCILER_WORKDIR].")
@click.option("--git-username", envvar="RECONCILER_GIT_USERNAME", default=None,
              help="Pull mode: the user sent with the token (default: the URL's, else "
              "x-access-token); the token comes from RECONCILER_GIT_TOKEN, --git-token-file "
              "or the URL, never from a flag [RECONCILER_GIT_USERNAME].")
@click.option("--git-token-file", envvar="RECONCILER_GIT_TOKEN_FILE",
              type=click.Path(exists=True, dir_okay=False), default=None,
              help="Pull mode: read the git token from this file, again at each fetch "
              "[RECONCILER_GIT_TOKEN_FILE].")
@loop_options
@handle_errors
def run(etcd: EtcdSettings, airflow: AirflowSettings, loop: LoopSettings, repo: str | None,
        branch: str, subdir: str, pull_interval: float, workdir: str | None,
        git_username: str | None, git_token_file: str | None) -> None:
    """The loop: keep Airflow in step with the graph in etcd (the container's entrypoint).

    Stops on SIGTERM or SIGINT: the leader lease is released at once, and the process
    exits within 8 s whatever a call is doing.
    """
    # The handlers first, before the heavy imports (gRPC, etcd: seconds on a loaded
    # machine): a SIGTERM while the loop is being set up (a replica restarted and stopped
    # at once) is a clean stop too, not the default death by signal.
    stop = threading.Event()
    runners: list[Any] = []
    signals: list[str] = []

    def overrun() -> None:
        # A call that would not return: the lease is already released; do not wait for it.
        event("stopped without waiting for the pass under way", logging.WARNING,
              grace_seconds=STOP_GRACE)
        logging.shutdown()
        os._exit(0)

    def on_signal(signum: int, _frame: Any) -> None:
        if runners:
            event("stopping", signal=signal.Signals(signum).name)
            runners[0].shutdown(stop, grace=STOP_GRACE, overrun=overrun)
        else:
            signals.append(signal.Signals(signum).name)  # logged once logging is set up
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from reconciler.adapters.airflow import redact_url
    from reconciler.service.loop import Reconciler
    from reconciler.service.observability import Health, Metrics, event, serve_http, setup_logging
    from reconciler.service.puller import Puller
    from reconciler.service.runner import Runner

    _require_credentials(airflow)
    setup_logging(loop.log_format)
    if signals:
        event("stopping", signal=signals[0])
    metrics = Metrics()
    health = Health(stall_after=loop.liveness_timeout)
    server = None
    if loop.http_port:
        try:
            server, _ = serve_http(loop.http_host, loop.http_port, metrics, health)
        except OSError as exc:
            fail(f"cannot serve /metrics on {loop.http_host}:{loop.http_port}: "
                 f"{exc.strerror or exc}")
    # Which API Airflow speaks is asked once, here: while it does not answer, the health
    # port is up (alive, not ready) and a stop signal ends the wait.
    health.unready("airflow", f"asking {redact_url(airflow.url)} which REST API it speaks")
    try:
        # Reads (the informer) get the client's own deadline; each action's calls run
        # under the executor's, shorter than the lease left (deadline_of).
        store, api = _open(etcd, airflow, wait=stop)
    except BaseException:
        if server is not None:
            server.shutdown()
        raise
    health.ready("airflow")
    reconciler = Reconciler(store, api, loop, metrics=metrics)
    git = GitSettings(username=git_username or None, token_file=git_token_file,
                      token=os.environ.get("RECONCILER_GIT_TOKEN") or None)
    puller = (Puller(repo, branch, subdir, store, reconciler.clock, interval=pull_interval,
                     workdir=workdir, git=git) if repo else None)
    runner = Runner(reconciler, health, puller=puller)
    runners.append(runner)
    event("reconciler started", holder=reconciler.holder, airflow=redact_url(airflow.url),
          etcd=",".join(etcd.endpoints), namespace=etcd.root, interval=loop.interval,
          window=str(loop.window), lease_ttl=loop.lease_ttl,
          mode="pull" if repo else "push")
    try:
        if not stop.is_set():
            runner.run_forever(stop)
    finally:
        if server is not None:
            server.shutdown()
        store.close()
        event("reconciler stopped")
