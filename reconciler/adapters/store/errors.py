"""The store's errors, typed by what the caller does next, and `Unreadable`, the value
that stands for a stored value this version cannot read (quarantined, never raised)."""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.errors import (
    BadStoredData,
    LostLeadership,
    NeedsHuman,
    ReconcilerError,
    RetryLater,
)


class StoreError(ReconcilerError):
    """Base of the store's errors; messages never contain the password."""

    dependency = "etcd"


class StoreUnavailable(StoreError, RetryLater):
    """No endpoint answered in time: retry later (a one-shot command exits 2)."""


class StoreAccessDenied(StoreError, NeedsHuman):
    """etcd refused the credentials or the permission: needs a human, not a retry."""


class StoreConflict(StoreError):
    """A guarded transaction's comparison failed: someone else wrote first."""


class NotLeader(StoreConflict, LostLeadership):
    """A fenced write found another holder of the leader key (or none)."""


class StoreNotFound(StoreError):
    """The key asked for does not exist (e.g. a commit that was never synced)."""


class StoreRequestTooLarge(StoreError, NeedsHuman):
    """A write would exceed etcd's request or transaction limits."""


class StoreCorrupt(StoreError, BadStoredData):
    """A stored value this version cannot read."""

    def __init__(self, key: str, why: str) -> None:
        BadStoredData.__init__(self, key, why)


@dataclass(frozen=True)
class Unreadable:
    """Stands in a range read's result for a value that is not JSON (quarantined)."""

    key: str
    why: str

