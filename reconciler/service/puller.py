"""Pull mode: the leader fetches the branch and syncs new commits itself (DESIGN section 6).

Only the leader pulls (standbys would race it for nothing). Pulling runs on its own thread
and never blocks reconciling: an unreachable remote is logged once per state change and
retried with capped backoff while the loop keeps acting on the graph etcd already holds.
A sync race (another writer moved the head) is not a lost leadership: the head is read
again on the next pull. Credentials (in the URL, RECONCILER_GIT_TOKEN or a token file)
reach git through its environment only (adapters/git_remote.py): never the clone's config,
a command line, etcd (the head's `source` shows the URL without them) or a log. A changed
--repo re-points the clone's remote.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from reconciler.adapters.git_remote import RemoteClone
from reconciler.adapters.git_remote import RemoteUnavailable as GitUnavailable
from reconciler.adapters.sources import SourceError
from reconciler.adapters.store import StoreConflict, StoreError
from reconciler.core.errors import backoff
from reconciler.core.settings import GitSettings
from reconciler.service.observability import event
from reconciler.service.ports import Clock, Store
from reconciler.service.sync import sync

__all__ = ["GitUnavailable", "Puller"]


class Puller:
    def __init__(self, repo: str, branch: str, subdir: str, store: Store, clock: Clock, *,
                 interval: float, workdir: str | None = None,
                 is_leader: Callable[[], bool] = lambda: True,
                 on_synced: Callable[[], None] | None = None,
                 git: GitSettings | None = None) -> None:
        self.repo = repo
        self.branch = branch
        self.subdir = subdir
        self.store = store
        self.clock = clock
        self.interval = interval
        self.workdir = Path(workdir) if workdir else Path.home() / ".cache" / "reconciler" / "repo"
        git = git or GitSettings()
        self.remote = RemoteClone(repo, self.workdir, username=git.username, token=git.token,
                                  token_file=git.token_file)
        self.shown = self.remote.shown
        """The repository as logs and etcd show it: never with credentials."""
        self.is_leader = is_leader
        self.on_synced = on_synced
        self.failures = 0
        self.last_error: str | None = None
        self.last_result: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _local(self) -> Path | None:
        path = Path(self.repo)
        if "://" not in self.repo and path.is_dir() and (
                (path / ".git").exists() or (path / "HEAD").exists()):
            return path
        return None

    def _fetch(self) -> Path:
        local = self._local()
        if local is not None:
            return local
        moved = self.remote.fetch(self.branch)
        if moved is not None:
            event("pull mode: the clone's remote changed; it now fetches from the new one",
                  logging.WARNING, repo=self.shown, previous=moved, workdir=str(self.workdir))
        return self.workdir

    def _scrub(self, text: str) -> str:
        return self.remote.redact(text.replace(self.repo, self.shown))

    def pull_once(self) -> str:
        """Fetch and sync once; returns what happened (for logs and tests).

        Raises GitUnavailable (fetch failed) or StoreError (etcd)."""
        path = self._fetch()
        try:
            result = sync(path, self.branch, self.subdir, self.store,  # type: ignore[arg-type]
                          force=False, source=f"pull:{self.shown}@{self.branch}",
                          now=self.clock.now())
        except StoreConflict:
            return "another sync won the race; the head is read again on the next pull"
        except SourceError as exc:
            raise GitUnavailable(self._scrub(str(exc))) from None
        message = self._scrub(str(getattr(result, "message", result)))
        if getattr(result, "status", None) is not None and result.status.value == "synced" \
                and self.on_synced is not None:
            self.on_synced()
        if message != self.last_result:
            level = logging.INFO if getattr(result, "ok", True) else logging.ERROR
            event("pull-mode sync", level, repo=self.shown, branch=self.branch, result=message)
            self.last_result = message
        return message

    def tick(self) -> float:
        """One pull if this replica leads; seconds until the next."""
        if not self.is_leader():
            return min(self.interval, 1.0)
        try:
            self.pull_once()
        except (GitUnavailable, StoreError) as exc:
            self.failures += 1
            if str(exc) != self.last_error:
                event("pull failed; reconciling goes on with the graph in etcd",
                      logging.WARNING, repo=self.shown, error=str(exc))
            self.last_error = str(exc)
            return backoff(self.failures, self.interval, cap=max(60.0, self.interval))
        if self.last_error is not None:
            event("pull works again", repo=self.shown)
        self.failures = 0
        self.last_error = None
        return self.interval

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="puller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.tick()
            except Exception as exc:  # a bug in one pull must not end pulling
                event("pull step failed", logging.ERROR, exc_info=True, error=repr(exc))
                delay = self.interval
            self.clock.wait(self._stop, delay)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.remote.timeout)
            self._thread = None

