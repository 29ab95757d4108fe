"""Wake-ups: `events/<dag_id>/<run_id>` (TTL'd, written by the Airflow listener) and the
watches the loop wakes on (any prefix: desired/head, events/, suspended/, control/)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import etcd3.events

from reconciler.adapters.store.client import EtcdClient
from reconciler.adapters.store.errors import StoreError


class WatchHandle:
    """What `EtcdStore.watch` returns: call it to cancel; `broken` is set if the stream ended.

    A broken watch only costs latency (the loop also wakes every --interval); the owner
    re-creates it when it sees `broken`.
    """

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self.broken = threading.Event()

    def __call__(self) -> None:
        self._cancel()


class EventStore(EtcdClient):
    """events/ and watches."""

    def events_prefix(self) -> str:
        return self.key("events") + "/"

    def event_key(self, dag_id: str, run_id: str) -> str:
        return self.key("events", dag_id, run_id)

    def watch(self, prefixes: list[str], wake: threading.Event, *,
              on_put: Callable[[str, bytes], None] | None = None) -> WatchHandle:
        """Set `wake` on any change under `prefixes`; call the handle to cancel.
        `on_put(key, value)` is called (on the watch thread) for every put, first.

        If the stream breaks, `wake` is set too and `handle.broken` tells the owner to watch
        again.
        """
        ids: list[Any] = []
        handle: WatchHandle

        def callback(response: Any) -> None:
            if isinstance(response, BaseException):
                handle.broken.set()
            elif on_put is not None:
                for change in getattr(response, "events", ()):
                    if isinstance(change, etcd3.events.PutEvent):
                        with contextlib.suppress(Exception):  # never kill the watch thread
                            on_put(change.key.decode(), change.value or b"")
            wake.set()

        def cancel() -> None:
            for watch_id in ids:
                with contextlib.suppress(StoreError):
                    self._call("cancel watch", functools.partial(_cancel_watch, watch_id))

        handle = WatchHandle(cancel)
        for prefix in prefixes:
            ids.append(self._call(f"watch {prefix}",
                                  functools.partial(_add_watch, prefix, callback)))
        return handle


def _add_watch(prefix: str, callback: Callable[[Any], None], client: Any) -> Any:
    return client.add_watch_prefix_callback(prefix, callback)


def _cancel_watch(watch_id: Any, client: Any) -> None:
    client.cancel_watch(watch_id)
