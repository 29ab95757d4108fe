"""What the service needs from its adapters, as Protocols: the roles are tested with fakes
of these (tests/fakes) beside the real-etcd and real-Airflow tiers."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from reconciler.adapters.store import HeadRecord
from reconciler.core.graph import Graph


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, timeout: float) -> bool: ...

    def sleep(self, seconds: float) -> None: ...


class Store(Protocol):
    """The etcd store as the loop uses it (reconciler.adapters.store.EtcdStore)."""

    writes: int
    last_contact: float | None
    last_failure: tuple[float, str] | None

    def head_key(self) -> str: ...

    def events_prefix(self) -> str: ...

    def observed_key(self, cycle: str, dag_id: str) -> str: ...

    def ledger_key(self, cycle: str, dag_id: str) -> str: ...

    def read_head(self) -> tuple[HeadRecord | None, int]: ...

    def read_graph(self, commit: str) -> Graph | None: ...

    def read_since(self, commit: str) -> dict[str, datetime]: ...

    def read_ledger(self, cycle: str | None = None) -> dict[tuple[str, str], Any]: ...

    def read_observed(self, cycle: str | None = None) -> dict[tuple[str, str], Any]: ...

    def put_ledger(self, holder: str, cycle: str, dag_id: str,
                   entry: Mapping[str, Any]) -> None: ...

    def put_fenced(self, holder: str, puts: list[tuple[str, bytes]]) -> bool: ...

    def delete_cycle(self, holder: str, cycle: str) -> None: ...

    def campaign(self, holder: str, ttl: int) -> Any | None: ...

    def refresh(self, lease: Any) -> float: ...

    def resign(self, lease: Any) -> None: ...

    def leader(self) -> str | None: ...

    def watch(self, prefixes: list[str], wake: threading.Event) -> Any: ...


class AirflowApi(Protocol):
    """The Airflow client as the loop uses it (reconciler.adapters.airflow.AirflowClient)."""

    request_count: int
    last_contact: float | None
    last_failure: tuple[float, str] | None

    def list_runs(self, dag_ids: Iterable[str] | None = None, *,
                  updated_at_gte: datetime | None = None,
                  logical_date_gte: datetime | None = None,
                  logical_date_lte: datetime | None = None) -> list[dict[str, Any]]: ...

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None: ...

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Mapping[str, Any]) -> tuple[dict[str, Any], bool]: ...

    def clear(self, dag_id: str, run_id: str, *,
              cleared_end: datetime | None = None) -> tuple[dict[str, Any], bool]: ...

    def deadline_of(self, seconds: float) -> AbstractContextManager[None]: ...
