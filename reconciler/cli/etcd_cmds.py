"""`sync` (a commit's graph into etcd, push mode) and `history` (what was synced).

Exit codes: 0 synced or no-op; 1 refused (invalid files, an empty graph or a missing
--path without --allow-empty, not a fast-forward); 2 etcd unreachable, credentials
refused, or no such repository or commit. One line on failure.
"""

from __future__ import annotations

import getpass
import os
import socket

import click

from reconciler.cli.app import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    fail,
    handle_errors,
    main,
    nothing_synced,
)
from reconciler.cli.checks_cmds import path_option, repo_option
from reconciler.cli.options import etcd_options, json_answer, output_option
from reconciler.core.heap import gc_paused
from reconciler.core.settings import EtcdSettings
from reconciler.core.words import counted


def default_source(environ: dict[str, str] | None = None) -> str:
    """Who synced: the GitHub repository and run, 'ci', or 'cli:<user>@<host>'."""
    env = os.environ if environ is None else environ
    if env.get("GITHUB_ACTIONS") == "true":
        repo, sha = env.get("GITHUB_REPOSITORY", "?"), env.get("GITHUB_SHA", "?")
        return f"github:{repo}@{sha[:12]} run {env.get('GITHUB_RUN_ID', '?')}"
    if env.get("CI"):
        return "ci"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


@main.command()
@repo_option("The git repository (its committed tree is read, never the working tree).")
@click.option("--rev", default="HEAD", show_default=True, show_envvar=True,
              help="The commit to sync.")
@path_option()
@click.option("--force", is_flag=True, show_envvar=True,
              help="Sync even if REV does not descend from the synced head (a rollback); "
              "recorded as forced in the history.")
@click.option("--allow-empty", is_flag=True, show_envvar=True,
              help="Sync even a commit without pipeline files (or without --path): an empty "
              "graph, which removes every dependency. Refused without this flag.")
@click.option("--source", envvar="RECONCILER_SYNC_SOURCE", default=None, show_envvar=True,
              help="Who or what synced, recorded in the head (default: cli:<user>@<host>, or "
              "the CI run); credentials in a URL are removed.")
@output_option(["text", "json"], "text")
@etcd_options
@handle_errors
def sync(repo: str, rev: str, subdir: str, force: bool, allow_empty: bool,
         source: str | None, output: str, etcd: EtcdSettings) -> None:
    """Write the graph of commit REV to etcd, fast-forward only.

    The files are validated with the same checks as `validate`; any problem writes nothing.
    A commit without pipeline files, or without --path, is refused unless --allow-empty.
    Re-syncing the synced commit is a no-op. Exit 0 synced or no-op, 1 refused, 2 etcd
    unreachable or no such repository or commit.
    """
    from reconciler.adapters.sources import SourceError
    from reconciler.adapters.store import EtcdStore, StoreError, StoreRequestTooLarge
    from reconciler.service.sync import Reason, Status
    from reconciler.service.sync import sync as run_sync

    try:
        with EtcdStore(etcd) as store, gc_paused():
            result = run_sync(repo, rev, subdir, store, force=force,
                              source=source or default_source(), allow_empty=allow_empty)
    except SourceError as exc:
        fail(str(exc), EXIT_ENVIRONMENT)
    except StoreRequestTooLarge as exc:
        fail(f"sync refused: {exc}", EXIT_FAILED)  # the commit's graph is too big to write
    except StoreError as exc:
        fail(str(exc), EXIT_ENVIRONMENT)
    if output == "json":
        click.echo(json_answer("SyncResult", result.to_dict()), nl=False)
    elif result.reason is Reason.INVALID:
        for problem in result.problems:
            click.echo(str(problem))
    elif result.ok:
        size = (f"{counted(result.pipelines, 'pipeline')}, "
                f"{counted(result.blob_bytes, 'byte')} compressed")
        click.echo(f"{result.message} ({size}) in {result.namespace}"
                   if result.status is Status.SYNCED else f"{result.message} ({result.namespace})")
    if not result.ok:
        fail(f"sync refused: {result.message}", EXIT_FAILED)


@main.command()
@click.option("--limit", type=click.IntRange(min=0), default=0, show_envvar=True,
              help="Show at most this many (0 = all).")
@output_option(["text", "json"], "text")
@etcd_options
@handle_errors
def history(limit: int, output: str, etcd: EtcdSettings) -> None:
    """The synced commits, newest first: time, source, and whether the sync was forced."""
    from reconciler.adapters.store import HeadRecord, StoreError
    from reconciler.service.sync import read_history

    try:
        read = read_history(etcd, limit)
    except StoreError as exc:
        fail(str(exc), EXIT_ENVIRONMENT)
    entries = [e for e in read if isinstance(e, HeadRecord)]
    unreadable = [e for e in read if not isinstance(e, HeadRecord)]
    for bad in unreadable:  # skipped, each named in one line
        click.echo(f"warning: unreadable value at {bad.key}: {bad.why} (skipped)", err=True)
    if not entries and not unreadable:
        nothing_synced(etcd)
    if output == "json":
        click.echo(json_answer("History", namespace=etcd.root,
                               items=[e.to_dict() for e in entries],
                               unreadable=[{"key": u.key, "why": u.why} for u in unreadable]),
                   nl=False)
        return
    for n, e in enumerate(entries):
        mark = "head" if n == 0 else ""
        how = "forced" if e.forced else ("first" if e.previous is None else "fast-forward")
        was = f" from {e.previous[:12]}" if e.previous else ""
        click.echo(f"#{e.seq:<4} {e.synced_at:%Y-%m-%dT%H:%M:%SZ}  {e.commit[:12]}  "
                   f"{how + was:<32} {e.source}  {mark}".rstrip())
