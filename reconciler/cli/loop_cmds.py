"""`run` (the loop, the container's entrypoint), `plan` (dry run) and `status`."""

from __future__ import annotations

import functools
import json
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from reconciler.cli.app import EXIT_FAILED, fail, handle_errors, main
from reconciler.cli.options import etcd_options
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings, parse_duration
from reconciler.core.state import Plan, iso, parse_time


def _read_secret_file(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8").strip() if path else None


def airflow_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--airflow-* options (and their environment variables) -> one `airflow` kwarg."""

    @functools.wraps(func)
    def wrapper(*args: Any, airflow_url: str, airflow_username: str | None,
                airflow_password_file: str | None, airflow_timeout: float,
                **kwargs: Any) -> Any:
        import os

        password = (_read_secret_file(airflow_password_file)
                    or os.environ.get("RECONCILER_AIRFLOW_PASSWORD") or None)
        token = os.environ.get("RECONCILER_AIRFLOW_TOKEN") or None
        kwargs["airflow"] = AirflowSettings(url=airflow_url.rstrip("/"),
                                            username=airflow_username, password=password,
                                            token=token, timeout=airflow_timeout)
        return func(*args, **kwargs)

    options = [
        click.option("--airflow-url", envvar="RECONCILER_AIRFLOW_URL",
                     default="http://localhost:8080", show_default=True,
                     help="Airflow 3 API server [RECONCILER_AIRFLOW_URL]."),
        click.option("--airflow-username", envvar="RECONCILER_AIRFLOW_USERNAME",
                     help="User for /auth/token [RECONCILER_AIRFLOW_USERNAME]; its password "
                     "comes from RECONCILER_AIRFLOW_PASSWORD (or a static token from "
                     "RECONCILER_AIRFLOW_TOKEN), never from a flag."),
        click.option("--airflow-password-file", type=click.Path(dir_okay=False, exists=True),
                     help="Read the Airflow password from this file."),
        click.option("--airflow-timeout", type=float, default=10.0, show_default=True,
                     help="Seconds for one Airflow request."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def loop_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Window, interval and the other knobs of the loop -> one `loop` kwarg."""

    @functools.wraps(func)
    def wrapper(*args: Any, window: timedelta, interval: float, relist_interval: float,
                lease_ttl: int, http_port: int, log_format: str, **kwargs: Any) -> Any:
        kwargs["loop"] = LoopSettings(window=window, interval=interval,
                                      relist_interval=relist_interval, lease_ttl=lease_ttl,
                                      http_port=http_port, log_format=log_format)
        return func(*args, **kwargs)

    options = [
        click.option("--window", envvar="RECONCILER_WINDOW", default="2d", show_default=True,
                     callback=_duration, help="Lookback: older cycles are never touched "
                     "[RECONCILER_WINDOW]."),
        click.option("--interval", envvar="RECONCILER_INTERVAL", type=float, default=5.0,
                     show_default=True, help="Seconds between passes [RECONCILER_INTERVAL]."),
        click.option("--relist-interval", envvar="RECONCILER_RELIST_INTERVAL", type=float,
                     default=600.0, show_default=True,
                     help="Seconds between full relists of the runs."),
        click.option("--lease-ttl", envvar="RECONCILER_LEASE_TTL", type=int, default=10,
                     show_default=True, help="Seconds of the leader lease."),
        click.option("--http-port", envvar="RECONCILER_HTTP_PORT", type=int, default=9102,
                     show_default=True, help="Port of /healthz, /readyz, /metrics (0: off)."),
        click.option("--log-format", envvar="RECONCILER_LOG_FORMAT",
                     type=click.Choice(["text", "json"]), default="text", show_default=True),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _open(etcd: EtcdSettings, airflow: AirflowSettings) -> tuple[Any, Any]:
    from reconciler.adapters.airflow import AirflowClient
    from reconciler.adapters.store import EtcdStore

    return EtcdStore(etcd), AirflowClient(airflow)


def _fresh_plan(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta
                ) -> tuple[Plan, str]:
    """Observe everything once and plan, changing nothing (for `plan` and `status`)."""
    from reconciler.adapters.airflow import AirflowError
    from reconciler.adapters.store import StoreError
    from reconciler.service.loop import Reconciler

    store, api = _open(etcd, airflow)
    try:
        r = Reconciler(store, api, LoopSettings(window=window))
        r._load_desired()
        if r.desired is None:
            fail("no graph has been synced to etcd yet: run `reconciler sync` first",
                 EXIT_FAILED)
        now = r.clock.now()
        r._observe(now)
        ledger = r._read_ledger()
        from reconciler.core.plan import plan

        result = plan(r.desired.graph, r.runs.runs.values(), ledger, now, window=window,
                      since=r.desired.since, commit=r.desired.commit)
        return result, r.desired.commit
    except StoreError as exc:
        fail(str(exc))
    except AirflowError as exc:
        fail(str(exc))
    finally:
        store.close()


@main.command("plan")
@etcd_options
@airflow_options
@click.option("--window", envvar="RECONCILER_WINDOW", default="2d", callback=_duration,
              show_default=True, help="Lookback [RECONCILER_WINDOW].")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@handle_errors
def plan_command(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta,
                 output: str) -> None:
    """What the loop would do now (a dry run: nothing is written or triggered)."""
    result, commit = _fresh_plan(etcd, airflow, window)
    if output == "json":
        click.echo(json.dumps({"commit": commit, "actions": [
            {"kind": a.kind.value, "dag_id": a.dag_id, "cycle": iso(a.cycle),
             "run_id": a.run_id, "reason": a.reason} for a in result.actions]}, indent=2))
        return
    if not result.actions:
        click.echo(f"nothing to do ({len(result.cycles)} open cycles, commit {commit[:12]})")
    for a in result.actions:
        click.echo(f"{a.kind.value:8} {a.dag_id} cycle {iso(a.cycle)} run {a.run_id}: "
                   f"{a.reason}")


@main.command()
@etcd_options
@airflow_options
@click.option("--window", envvar="RECONCILER_WINDOW", default="2d", callback=_duration,
              show_default=True, help="Lookback [RECONCILER_WINDOW].")
@click.option("--cycle", help="Only this cycle (its logical date, ISO 8601).")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@handle_errors
def status(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta,
           cycle: str | None, output: str) -> None:
    """Pipelines x open cycles: done, running, waiting for X, blocked by failed X, disabled."""
    result, commit = _fresh_plan(etcd, airflow, window)
    statuses = list(result.statuses)
    if cycle is not None:
        try:
            wanted = parse_time(cycle)
        except ValueError:
            fail(f"--cycle {cycle!r} is not an ISO 8601 date")
        statuses = [s for s in statuses if s.cycle == wanted]
        if not statuses:
            fail(f"no open cycle {cycle}", EXIT_FAILED)
    if output == "json":
        click.echo(json.dumps({"commit": commit, "cycles": [iso(c) for c in result.cycles],
                               "statuses": [s.to_json() for s in statuses]}, indent=2))
        return
    by_cycle: dict[datetime, list[Any]] = {}
    for s in statuses:
        by_cycle.setdefault(s.cycle, []).append(s)
    if not by_cycle:
        click.echo(f"no open cycle (commit {commit[:12]})")
    width = max((len(s.dag_id) for s in statuses), default=10)
    for c in sorted(by_cycle, reverse=True):
        click.echo(f"cycle {iso(c)}")
        for s in by_cycle[c]:
            click.echo(f"  {s.dag_id:{width}}  {s.state.value:12}  {s.message}")


@main.command()
@etcd_options
@airflow_options
@loop_options
@click.option("--repo", envvar="RECONCILER_REPO", default=None,
              help="Pull mode: a git URL or path; new commits of --branch are synced by "
              "the loop itself [RECONCILER_REPO].")
@click.option("--branch", envvar="RECONCILER_BRANCH", default="main", show_default=True)
@click.option("--path", "subdir", default="pipelines", show_default=True,
              help="Folder of the pipeline files inside the repository.")
@click.option("--pull-interval", type=float, default=30.0, show_default=True,
              help="Seconds between fetches in pull mode.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where pull mode keeps its clone (default: a cache folder).")
@handle_errors
def run(etcd: EtcdSettings, airflow: AirflowSettings, loop: LoopSettings, repo: str | None,
        branch: str, subdir: str, pull_interval: float, workdir: str | None) -> None:
    """The loop: keep Airflow in step with the graph in etcd (the container's entrypoint).

    Stops cleanly on SIGTERM or SIGINT (the leader lease is released).
    """
    from reconciler.service.loop import Reconciler
    from reconciler.service.observability import Health, Metrics, event, serve_http, setup_logging

    setup_logging(loop.log_format)
    store, api = _open(etcd, airflow)
    metrics, health = Metrics(), Health()
    pull = _puller(repo, branch, subdir, workdir, store) if repo else None
    reconciler = Reconciler(store, api, loop, metrics=metrics, health=health, pull=pull,
                            pull_interval=pull_interval)
    server = None
    if loop.http_port:
        server, _ = serve_http(loop.http_host, loop.http_port, metrics, health)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        event("stopping", signal=signal.Signals(signum).name)
        stop.set()
        reconciler.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    event("reconciler started", holder=reconciler.holder, airflow=airflow.url,
          etcd=",".join(etcd.endpoints), namespace=etcd.root, interval=loop.interval,
          window=str(loop.window), mode="pull" if repo else "push")
    try:
        reconciler.run_forever(stop)
    finally:
        if server is not None:
            server.shutdown()
        store.close()
        event("reconciler stopped")


def _puller(repo: str, branch: str, subdir: str, workdir: str | None, store: Any
            ) -> Callable[[], None]:
    """Pull mode: fetch `branch` and sync its head commit (fast-forward only)."""
    import logging

    from reconciler.service.observability import event
    from reconciler.service.sync import sync

    local = Path(repo)
    state: dict[str, Any] = {"last": None}

    def pull() -> None:
        import git

        if (local / ".git").exists() or ((local / "HEAD").exists() and local.is_dir()):
            path, rev = str(local), branch
        else:
            target = Path(workdir or Path.home() / ".cache" / "reconciler" / "repo")
            if not target.exists():
                git.Repo.clone_from(repo, target, bare=True)
            git.Repo(target).git.fetch("origin", f"+refs/heads/{branch}:refs/heads/{branch}")
            path, rev = str(target), branch
        source = f"pull:{repo}@{branch}"
        result = sync(path, rev, subdir, store, force=False, source=source,
                      now=datetime.now(UTC))
        summary = getattr(result, "status", str(result))
        if summary != state["last"]:
            level = logging.INFO if getattr(result, "ok", True) else logging.ERROR
            event("pull-mode sync", level, result=str(getattr(result, "message", summary)))
            state["last"] = summary

    return pull
