"""The commands operators reach for in an incident (the Argo CD / Flux set):

    status     pipelines x cycles, with a header; from etcd's mirror (no Airflow
               credentials needed) or, with credentials, observed live
    suspend    stop triggering a pipeline, or the whole namespace (no PR needed)
    resume     undo it
    reconcile  wake the loop now (a pass and a relist)
    rollback N history entry N back as the head (a forced sync, recorded)
    wait       until a pipeline (or every pipeline of a cycle) reaches a state
    doctor     what in Airflow will keep the graph from running

Every command talks to etcd with the --etcd-* options; only `status --live` and `doctor`
talk to Airflow.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from reconciler.cli.app import EXIT_FAILED, fail, handle_errors, main, nothing_synced
from reconciler.cli.loop_cmds import (
    ONE_SHOT_DEADLINE,
    _airflow_client,
    _duration,
    _require_credentials,
    _seconds,
    airflow_fleet,
    airflow_options,
    held_back,
)
from reconciler.cli.options import etcd_options, json_answer, output_option
from reconciler.core.errors import ReconcilerError
from reconciler.core.safe_text import printable
from reconciler.core.settings import AirflowSettings, EtcdSettings, LoopSettings
from reconciler.core.state import State, iso, parse_time
from reconciler.core.words import counted

STATES = [s.value for s in State]
COLOURS = {"done": "green", "failed": "red", "blocked": "red", "running": "cyan",
           "queued": "cyan", "triggering": "cyan", "rerunning": "cyan", "waiting": "yellow",
           "suspended": "magenta", "disabled": "bright_black", "not_in_cycle": "bright_black"}


def _store(etcd: EtcdSettings) -> Any:
    from reconciler.adapters.store import EtcdStore

    return EtcdStore(etcd)


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# --- status ----------------------------------------------------------------------------------


def _header(store: Any, unreadable: list[Any], *, need_head: bool) -> dict[str, Any]:
    """The status header; a stored value that cannot be read is added to `unreadable` and
    shown as unknown (the head only when `need_head` is False: the mirror needs no graph)."""
    from reconciler.adapters.store import StoreCorrupt, Unreadable

    try:
        head, _ = store.read_head()
    except StoreCorrupt as exc:
        if need_head:
            raise
        head = None
        unreadable.append(Unreadable(exc.key, exc.why))
    beat = store.read_heartbeat()
    if isinstance(beat, Unreadable):
        unreadable.append(beat)
    marks = {}
    for target, mark in store.read_suspended().items():
        if isinstance(mark, Unreadable):
            unreadable.append(mark)
        marks[target] = mark if isinstance(mark, dict) else {"reason": "unreadable"}
    return {"commit": head.commit if head else None,
            "synced_at": iso(head.synced_at) if head else None,
            "source": head.source if head else None,
            "leader": store.leader(),
            "last_pass": beat.get("last_pass") if isinstance(beat, dict) else None,
            "last_pass_by": beat.get("holder") if isinstance(beat, dict) else None,
            "suspended": marks}


def _from_mirror(store: Any, unreadable: list[Any] | None = None) -> list[dict[str, Any]]:
    """The statuses the leader mirrored into observed/ (what it saw on its last pass);
    a value that is not one is added to `unreadable`, if given, and skipped."""
    from reconciler.adapters.store import Unreadable

    rows = []
    for (cycle, dag_id), v in store.read_observed().items():
        if isinstance(v, dict) and isinstance(v.get("dag_id"), str) \
                and isinstance(v.get("cycle"), str) and parse_time_or_none(v["cycle"]):
            rows.append(v)
        elif unreadable is not None:
            unreadable.append(v if isinstance(v, Unreadable) else Unreadable(
                store.scanned_key("observed", cycle, dag_id), "not a status record"))
    return rows


def parse_time_or_none(text: str) -> Any:
    try:
        return parse_time(text)
    except ValueError:
        return None


def warn_unreadable(unreadable: Iterable[Any]) -> None:
    """One line on stderr per stored value skipped because it cannot be read."""
    for bad in unreadable:
        click.echo(f"warning: unreadable value at {bad.key}: {bad.why} (skipped)", err=True)


def fail_if_quarantined(observer: Any) -> None:
    """A one-shot observation found no graph because the head or graph is unreadable:
    say which key, rather than "nothing synced"."""
    from reconciler.adapters.store import StoreCorrupt

    for key, why in observer.quarantined.items():
        raise StoreCorrupt(key, why)


def _live(store: Any, etcd: EtcdSettings, airflow: AirflowSettings,
          window: timedelta, unreadable: list[Any]) -> list[dict[str, Any]]:
    from reconciler.adapters.clock import SystemClock
    from reconciler.adapters.store import Unreadable
    from reconciler.core.plan import plan
    from reconciler.service.observer import Observer

    api = airflow_fleet(airflow, deadline=ONE_SHOT_DEADLINE)
    observer = Observer(store, api, LoopSettings(window=window), SystemClock())
    observer.log_quarantine = False  # each key is named in one line, by warn_unreadable
    seen = observer.observe(with_ledger=False)
    if seen.desired is None:
        fail_if_quarantined(observer)
        nothing_synced(etcd)
    ledger = observer.read_ledger()
    result = held_back(plan(seen.desired.graph, seen.runs.values(), ledger,
                            seen.now, window=window, since=seen.desired.since,
                            commit=seen.desired.commit, suspended=seen.suspended),
                       observer, api, ledger)
    paused = {d["dag_id"] for d in api.list_dags(skip=observer.unreachable)
              if d.get("is_paused")}
    out = []
    for s in result.statuses:
        data = s.to_json()
        if s.dag_id in paused and s.state in (State.QUEUED, State.TRIGGERING,
                                              State.RUNNING, State.RERUNNING):
            data["message"] += " (the DAG is paused in Airflow: unpause it or its runs stay " \
                               "queued)"
            data["paused"] = True
        out.append(data)
    named = {u.key for u in unreadable}  # the header may have found some already
    unreadable += [Unreadable(k, why) for k, why in observer.quarantined.items()
                   if k not in named]
    return out


@main.command()
@etcd_options
@airflow_options
@click.option("--window", envvar="RECONCILER_WINDOW", default="2d", callback=_duration,
              show_default=True, help="Lookback, with --live [RECONCILER_WINDOW].")
@click.option("--cycle", envvar="RECONCILER_CYCLE",
              help="Only this cycle (its logical date, ISO 8601) [RECONCILER_CYCLE].")
@click.option("--dag", "dags", multiple=True, help="Only these pipelines (repeatable).")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only pipelines in these states (repeatable).")
@click.option("--live/--from-etcd", default=None,
              help="Observe Airflow now (needs its credentials), or read what the leader "
              "mirrored into etcd on its last pass. Default: live when Airflow credentials "
              "are set, else the mirror.")
@output_option(["text", "json"], "text")
@handle_errors
def status(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta,
           cycle: str | None, dags: tuple[str, ...], states: tuple[str, ...],
           live: bool | None, output: str) -> None:
    """Pipelines x open cycles: done, running, waiting for X, blocked by failed X, suspended.

    The header says which commit is synced (and when), who leads, and when its last pass
    was. Exit 1 when nothing matches the filters.
    """
    from reconciler.adapters.store import StoreError

    if live is None:
        live = bool(airflow.token or airflow.token_file
                    or (airflow.username and airflow.password is not None))
    if live:
        _require_credentials(airflow)
    wanted = None
    if cycle is not None:
        try:
            wanted = parse_time(cycle)
        except ValueError:
            fail(f"--cycle {cycle!r} is not an ISO 8601 date")
    store = _store(etcd)
    unreadable: list[Any] = []
    try:
        header = _header(store, unreadable, need_head=live)
        if header["commit"] is None and store.head_key() not in {u.key for u in unreadable}:
            nothing_synced(etcd)
        rows = (_live(store, etcd, airflow, window, unreadable) if live
                else _from_mirror(store, unreadable))
        _with_deployments(store, rows)
    except (StoreError, ReconcilerError) as exc:
        fail(str(exc))
    finally:
        store.close()
    warn_unreadable(unreadable)
    header["source_of_status"] = "live" if live else "etcd mirror"
    rows = [r for r in rows
            if (wanted is None or parse_time(r["cycle"]) == wanted)
            and (not dags or r["dag_id"] in dags) and (not states or r["state"] in states)]
    rows.sort(key=lambda r: (r["cycle"], r["dag_id"]))
    if output == "json":
        click.echo(json_answer("Status", header=header,
                               cycles=sorted({r["cycle"] for r in rows}, reverse=True),
                               statuses=rows), nl=False)
    else:
        _print_status(header, rows)
    if not rows and (cycle or dags or states):
        raise SystemExit(EXIT_FAILED)


def _with_deployments(store: Any, rows: list[dict[str, Any]]) -> None:
    """Each row names its pipeline's deployment when the synced graph declares some."""
    from reconciler.adapters.store import StoreCorrupt, StoreNotFound
    from reconciler.service.sync import read_synced_graph

    if not rows:
        return
    try:
        _, graph = read_synced_graph(store)
    except (StoreCorrupt, StoreNotFound):
        return  # already said (the header's unreadable values)
    if graph is None or not graph.deployments:
        return
    for r in rows:
        if r["dag_id"] in graph.pipelines:
            r["deployment"] = graph.deployment_of(r["dag_id"])


def _print_status(header: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
    # Every value from Airflow or etcd is escaped (printable): a run id or reason holding a
    # newline, an ANSI escape or U+202E cannot forge a line of this table.
    commit = printable((header["commit"] or "")[:12])
    click.echo(f"commit {commit}  synced {printable(header['synced_at'])}  "
               f"({header['source_of_status']})")
    leader = printable(header["leader"] or "none (no replica holds the lease)")
    last = printable(header["last_pass"] or "never")
    click.echo(f"leader {leader}  last pass {last}")
    for target, mark in sorted(header["suspended"].items()):
        what = "the whole namespace" if target == "*" else target
        click.echo(click.style(printable(f"suspended: {what} by {mark.get('by', '?')} at "
                                         f"{mark.get('at', '?')}: {mark.get('reason', '')}"),
                               fg="magenta"))
    if not rows:
        click.echo("no pipeline matches" if header["commit"] else "no open cycle")
        return
    width = max(len(printable(r["dag_id"])) for r in rows)
    places = max((len(printable(r.get("deployment", ""))) for r in rows), default=0)
    current = None
    for r in sorted(rows, key=lambda r: r["cycle"], reverse=True):
        if r["cycle"] != current:
            current = r["cycle"]
            click.echo(f"cycle {printable(current)}")
        state = click.style(f"{printable(r['state']):12}", fg=COLOURS.get(r["state"]))
        place = f"{printable(r.get('deployment', '')):{places}}  " if places else ""
        click.echo(f"  {printable(r['dag_id']):{width}}  {place}{state}  "
                   f"{printable(r['message'])}")


# --- suspend / resume / reconcile ------------------------------------------------------------


def _target(dag: str | None, everything: bool) -> str:
    if everything == (dag is not None):
        fail("name one pipeline, or --all for the whole namespace")
    return "*" if everything else str(dag)


@main.command()
@etcd_options
@click.argument("dag", required=False)
@click.option("--all", "everything", is_flag=True, help="Suspend the whole namespace.")
@click.option("--reason", "-m", default="", help="Why (shown in status and the logs).")
@output_option(["text", "json"], "text")
@handle_errors
def suspend(etcd: EtcdSettings, dag: str | None, everything: bool, reason: str,
            output: str) -> None:
    """Stop triggering DAG (or --all): recorded in etcd, honoured by the loop at once.

    Roots keep running (Airflow schedules them), so `resume` catches up every open cycle.
    """
    from reconciler.adapters.store import StoreError

    target = _target(dag, everything)
    mark = {"by": _operator(), "at": iso(datetime.now(UTC)), "reason": reason}
    store = _store(etcd)
    try:
        if target != "*":
            head, _ = store.read_head()
            if head is not None:
                from reconciler.service.sync import read_synced_graph

                _, graph = read_synced_graph(store, head.commit)
                if target not in graph.pipelines:
                    fail(f"{target} is not a pipeline of the synced graph "
                         f"({head.commit[:12]})", EXIT_FAILED)
        store.put_suspend(target, mark)
    except (StoreError, ReconcilerError) as exc:
        fail(str(exc))
    except ValueError:  # a name with "/" is no key segment, and no DAG id either
        fail(f"{target!r} is not a DAG id", EXIT_FAILED)
    finally:
        store.close()
    if output == "json":
        click.echo(json_answer("Suspension", {"target": target, **mark}), nl=False)
    else:
        click.echo(f"suspended {'the namespace' if target == '*' else target}; "
                   "`reconciler resume` undoes it")


@main.command()
@etcd_options
@click.argument("dag", required=False)
@click.option("--all", "everything", is_flag=True, help="Resume the whole namespace.")
@output_option(["text", "json"], "text")
@handle_errors
def resume(etcd: EtcdSettings, dag: str | None, everything: bool, output: str) -> None:
    """Undo `suspend` for DAG (or --all). Exit 1 when it was not suspended."""
    from reconciler.adapters.store import StoreError

    target = _target(dag, everything)
    store = _store(etcd)
    try:
        removed = store.delete_suspend(target)
    except StoreError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc), EXIT_FAILED)
    finally:
        store.close()
    if not removed:
        fail(f"{'the namespace' if target == '*' else target} was not suspended", EXIT_FAILED)
    if output == "json":
        click.echo(json_answer("Resumption", target=target, by=_operator(),
                               at=iso(datetime.now(UTC))), nl=False)
    else:
        click.echo(f"resumed {'the namespace' if target == '*' else target}")


@main.command()
@etcd_options
@output_option(["text", "json"], "text")
@handle_errors
def reconcile(etcd: EtcdSettings, output: str) -> None:
    """Wake the loop now: the leader runs a pass with a full relist of the runs."""
    from reconciler.adapters.store import StoreError

    request = {"by": _operator(), "at": iso(datetime.now(UTC))}
    store = _store(etcd)
    try:
        store.put_json(store.control_key("reconcile"), request)
        leader = store.leader()
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    if output == "json":
        click.echo(json_answer("ReconcileRequest", request, leader=leader), nl=False)
    elif leader is None:
        click.echo("asked; but no replica holds the lease now: the request waits for one")
    else:
        click.echo(f"asked {leader} to reconcile now")


# --- rollback --------------------------------------------------------------------------------


@main.command()
@etcd_options
@click.argument("seq", type=int)
@output_option(["text", "json"], "text")
@handle_errors
def rollback(etcd: EtcdSettings, seq: int, output: str) -> None:
    """Make history entry SEQ (see `reconciler history`) the head again: a forced sync of
    that commit's graph, recorded as such. No git access is needed."""
    from reconciler.adapters.store import StoreError, StoreNotFound
    from reconciler.service.rollback import rollback as do_rollback

    store = _store(etcd)
    try:
        result = do_rollback(store, seq, now=datetime.now(UTC), by=_operator())
    except StoreNotFound as exc:
        fail(str(exc), EXIT_FAILED)
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    if output == "json":
        click.echo(json_answer("Rollback", changed=result.changed, head=result.head.to_dict(),
                               message=result.message), nl=False)
    else:
        click.echo(result.message)


# --- wait ------------------------------------------------------------------------------------

TERMINAL = {"done", "failed", "blocked"}


@main.command()
@etcd_options
@click.option("--dag", "dags", multiple=True,
              help="The pipelines to wait for (repeatable; default: every pipeline).")
@click.option("--cycle", help="The cycle (logical date, ISO 8601); default: the newest.")
@click.option("--state", "wanted", default="done", show_default=True,
              type=click.Choice(STATES), help="The state to wait for.")
@click.option("--timeout", default="10m", callback=_seconds, show_default=True,
              help="Give up after this long (exit 1).")
@click.option("--every", default="1", callback=_seconds, show_default=True,
              help="How often to look.")
@output_option(["text", "json"], "text")
@handle_errors
def wait(etcd: EtcdSettings, dags: tuple[str, ...], cycle: str | None, wanted: str,
         timeout: float, every: float, output: str) -> None:
    """Until the pipelines of a cycle reach --state in the leader's mirror, or --timeout.

    Exit 0 when they did, 1 on timeout or when one of them settled in another final
    state (done, failed, blocked) first: handy for smoke tests after a deploy. Exit 1 at
    once when nothing is synced or a --dag is not in the synced graph.
    """
    from reconciler.adapters.store import StoreError
    from reconciler.service.sync import read_synced_graph

    target = None
    if cycle is not None:
        try:
            target = parse_time(cycle)
        except ValueError:
            fail(f"--cycle {cycle!r} is not an ISO 8601 date")
    deadline = time.monotonic() + timeout
    store = _store(etcd)
    last: dict[str, str] = {}
    chosen = target

    def answer(ok: bool, message: str) -> None:
        if output == "json":
            click.echo(json_answer("WaitResult", ok=ok, cycle=iso(chosen) if chosen else None,
                                   state=wanted, pipelines=dict(sorted(last.items())),
                                   message=message), nl=False)
        elif ok:
            click.echo(message)
        if not ok:
            fail(message, EXIT_FAILED)

    try:
        # Fail fast on what no waiting can change: nothing synced, a pipeline not in it.
        head, _ = store.read_head()
        if head is None:
            nothing_synced(etcd)
        _, graph = read_synced_graph(store, head.commit)
        unknown = sorted(set(dags) - set(graph.pipelines))
        if unknown:
            fail(f"{', '.join(unknown)}: not a pipeline of the synced graph "
                 f"({head.commit[:12]})", EXIT_FAILED)
        while True:
            rows = _from_mirror(store)
            cycles = sorted(t for t in {parse_time(r.get("cycle")) for r in rows}
                            if t is not None)
            chosen = target or (cycles[-1] if cycles else None)
            mine = [r for r in rows if chosen is not None and parse_time(r["cycle"]) == chosen
                    and (not dags or r["dag_id"] in dags)]
            last = {r["dag_id"]: r["state"] for r in mine}
            missing = set(dags) - set(last)
            if mine and not missing and all(s == wanted for s in last.values()):
                return answer(True, f"{', '.join(sorted(last))}: {wanted} (cycle {iso(chosen)})"
                              if chosen else wanted)
            settled = {d: s for d, s in last.items() if s in TERMINAL and s != wanted}
            if settled and wanted in TERMINAL:
                return answer(False, _describe("settled otherwise", settled))
            if time.monotonic() >= deadline:
                what = f"timed out after {timeout:g} s waiting for {wanted}"
                if not last:
                    where = f"cycle {iso(chosen)}" if chosen else "any cycle"
                    return answer(False, f"{what}: no status in etcd's mirror for {where} "
                                  "(the leader of `reconciler run` writes it on each pass)")
                return answer(False, _describe(what, {**dict.fromkeys(dags, "no status yet"),
                                                      **last}))
            time.sleep(max(0.05, min(every, deadline - time.monotonic())))
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()


def _describe(what: str, states: Mapping[str, str]) -> str:
    return f"{what}: " + ", ".join(f"{d} {s}" for d, s in sorted(states.items()))


# --- doctor ----------------------------------------------------------------------------------


def diagnose(graph: Any, dags: Iterable[Mapping[str, Any]],
             roots_with_runs: set[str]) -> list[dict[str, str]]:
    """What in Airflow will keep the graph from running, one finding per problem."""
    known = {d["dag_id"]: d for d in dags if "dag_id" in d}
    findings = []
    for dag_id, pipeline in sorted(graph.pipelines.items()):
        dag = known.get(dag_id)
        if dag is None:
            findings.append({"dag_id": dag_id, "problem": "missing",
                             "message": "not in Airflow: is the DAG file deployed and parsed "
                                        "without import errors?"})
            continue
        if dag.get("is_stale"):
            findings.append({"dag_id": dag_id, "problem": "stale",
                             "message": "stale in Airflow: its file is gone or no longer "
                                        "defines it"})
        if dag.get("is_paused") and pipeline.enabled:
            findings.append({"dag_id": dag_id, "problem": "paused",
                             "message": "paused in Airflow: its runs stay queued "
                                        "(unpause it)"})
        schedule = dag.get("timetable_summary")
        scheduled = schedule not in (None, "", "None", "null")
        if pipeline.depends_on and scheduled:
            findings.append({"dag_id": dag_id, "problem": "scheduled-downstream",
                             "message": f"has its own schedule ({schedule}) although it "
                                        "depends on other pipelines: it would run twice; "
                                        "set schedule=None"})
        if not pipeline.depends_on and dag_id not in roots_with_runs:
            findings.append({"dag_id": dag_id, "problem": "root-idle",
                             "message": "a root without a run inside the window: nothing "
                                        "downstream will run (is it scheduled? paused?)"})
    return findings


def doctor_deployments(fleet: Any, graph: Any, window: timedelta,
                       max_clock_skew: float) -> list[dict[str, Any]]:
    """`doctor` for a graph that declares deployments: each deployment is asked for its
    DAGs and its roots' runs on its own (one that cannot be reached is one finding, and
    its pipelines are not reported as missing); each pipeline is checked in the
    deployment it runs in, and a root also unpaused in another deployment (a migration
    half done: it would be scheduled twice) is named."""
    from reconciler.adapters.airflow import AirflowAuthError
    from reconciler.core.graph import Graph

    findings: list[dict[str, Any]] = []
    by_deployment = fleet.groups(sorted(graph.pipelines))
    raw_dags: dict[str, dict[str, Mapping[str, Any]]] = {}
    for deployment in sorted(set(by_deployment) | set(graph.deployments)):
        names = by_deployment.get(deployment, [])
        try:
            client = fleet.client(deployment)
            dags = client.list_dags()
            raw_dags[deployment] = {d["dag_id"]: d for d in dags if "dag_id" in d}
            server = client.server_now()
            local = datetime.now(UTC)
            roots = [n for n in names if not graph.pipelines[n].depends_on]
            runs = list(fleet.iter_runs_of(deployment, roots,
                                           updated_at_gte=(server or local) - window)
                        ) if roots else []
        except AirflowAuthError as exc:
            explain = getattr(fleet.client(deployment), "explain_refusal", None)
            findings.append({"deployment": deployment, "problem": "unreachable",
                             "message": f"refuses the credentials: "
                                        f"{explain() if explain is not None else exc}"})
            continue
        except ReconcilerError as exc:
            findings.append({"deployment": deployment, "problem": "unreachable",
                             "message": f"cannot be reached or used: {exc}"})
            continue
        sub = Graph([graph.pipelines[n] for n in names])
        named = [{**d, "dag_id": n} for n in names
                 if (d := raw_dags[deployment].get(graph.pipelines[n].dag_id)) is not None]
        for finding in diagnose(sub, named, {r["dag_id"] for r in runs}):
            findings.append({**finding, "deployment": deployment})
        skew = None if server is None else (local - server).total_seconds()
        clock = clock_finding(skew, max_clock_skew)
        if clock is not None:
            findings.append({**clock, "deployment": deployment})
    for name, pipeline in sorted(graph.pipelines.items()):
        if pipeline.depends_on:
            continue
        home = graph.deployment_of(name)
        for other, dags in sorted(raw_dags.items()):
            dag = dags.get(pipeline.dag_id)
            owned = any(graph.deployment_of(n) == other and p.dag_id == pipeline.dag_id
                        for n, p in graph.pipelines.items())
            if other != home and dag is not None and not dag.get("is_paused") and not owned:
                findings.append({"dag_id": name, "deployment": other,
                                 "problem": "root-elsewhere",
                                 "message": f"the root runs in {home}, but its DAG is also "
                                            f"unpaused in {other}: it would be scheduled "
                                            f"twice; pause it in {other}"})
    return findings


def clock_finding(skew: float | None, threshold: float) -> dict[str, Any] | None:
    """A finding when this machine's clock is `skew` seconds off Airflow's, beyond
    `threshold` (None: Airflow's clock is not known)."""
    if skew is None or abs(skew) <= threshold:
        return None
    size = abs(skew)
    amount = (f"{size / 86400:.1f} days" if size >= 86400 else
              f"{size / 3600:.1f} h" if size >= 3600 else f"{size:.0f} s")
    return {"dag_id": None, "problem": "clock-skew", "skew_seconds": round(skew, 1),
            "message": f"this machine's clock is {amount} {'ahead of' if skew > 0 else 'behind'}"
                       " Airflow's (its Date header): the loop follows Airflow's clock, but "
                       "logs and ledger times are this machine's; fix its time sync (NTP)"}


@main.command()
@etcd_options
@airflow_options
@click.option("--window", envvar="RECONCILER_WINDOW", default="2d", callback=_duration,
              show_default=True, help="Lookback for root runs [RECONCILER_WINDOW].")
@click.option("--max-clock-skew", envvar="RECONCILER_MAX_CLOCK_SKEW", default="30",
              callback=_seconds, show_default=True,
              help="Seconds this machine's clock may differ from Airflow's "
              "[RECONCILER_MAX_CLOCK_SKEW].")
@output_option(["text", "json"], "text")
@handle_errors
def doctor(etcd: EtcdSettings, airflow: AirflowSettings, window: timedelta,
           max_clock_skew: float, output: str) -> None:
    """DAGs of the graph missing, stale or paused in Airflow; non-roots that also have a
    schedule of their own (they would run twice); roots that never ran in the window;
    this machine's clock off Airflow's; every value in etcd this version cannot read, its
    key named. Exit 1 when there is a finding."""
    from reconciler.adapters.airflow import AirflowAuthError
    from reconciler.adapters.store import StoreCorrupt, StoreError
    from reconciler.service.sync import read_synced_graph

    _require_credentials(airflow)
    # Airflow is asked (which API it speaks, then the DAGs) only once there is a graph to
    # check against: an empty namespace is the same one line as every command's.
    store = _store(etcd)
    api: Any = None
    commit: str | None = None
    try:
        # Every stored value this version cannot read, one finding each, key named.
        findings = [{"key": u.key, "problem": "corrupt", "message": f"unreadable ({u.why})"}
                    for u in store.corrupt_values()]
        if not findings and store.read_head()[0] is None:
            nothing_synced(etcd)
        try:
            commit, graph = read_synced_graph(store)
        except StoreCorrupt:
            if not findings:
                raise
            graph = None  # already a finding: Airflow cannot be checked against no graph
        if graph is not None and graph.deployments:
            api = airflow_fleet(airflow, deadline=ONE_SHOT_DEADLINE)
            api.configure(graph)
            findings += doctor_deployments(api, graph, window, max_clock_skew)
        elif graph is not None:
            api = _airflow_client(airflow, deadline=ONE_SHOT_DEADLINE)
            dags = api.list_dags()
            # The window on Airflow's clock (its Date header), like the loop's.
            local = datetime.now(UTC)
            server = api.server_now()
            since = (server or local) - window
            roots = sorted(d for d, p in graph.pipelines.items() if not p.depends_on)
            runs = api.list_runs(roots, updated_at_gte=since) if roots else []
            findings += diagnose(graph, dags, {r["dag_id"] for r in runs})
            skew = None if server is None else (local - server).total_seconds()
            clock = clock_finding(skew, max_clock_skew)
            if clock is not None:
                findings.append(clock)
    except AirflowAuthError as exc:
        # Airflow 2 answers 403 for three causes: its client tells which (the UI login)
        explain = getattr(api, "explain_refusal", None) if api is not None else None
        fail(explain() if explain is not None else str(exc))
    except (StoreError, ReconcilerError) as exc:
        fail(str(exc))
    finally:
        store.close()
    if output == "json":
        click.echo(json_answer("Diagnosis", commit=commit, findings=findings), nl=False)
    else:
        for f in findings:
            name = f.get("dag_id") or f.get("key") or (
                f"deployment {f['deployment']}" if f.get("deployment") else "clock")
            where = f" ({f['deployment']})" if f.get("dag_id") and f.get("deployment") else ""
            click.echo(f"{printable(name)}{printable(where)}: {printable(f['message'])}")
        if not findings and graph is not None and commit is not None:
            click.echo(f"no finding: {counted(len(graph), 'pipeline')} of {commit[:12]}, each "
                       "in Airflow, unpaused, and scheduled the way the graph expects")
    if findings:
        raise SystemExit(EXIT_FAILED)
