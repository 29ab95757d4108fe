"""Leader election: `leader` holds the holder's id, bound to a lease (the fenced writes
of every key family compare it: client.py `put_fenced`)."""

from __future__ import annotations

import contextlib
from typing import Any

from reconciler.adapters.store.client import EtcdClient
from reconciler.adapters.store.errors import StoreError


class LeaderStore(EtcdClient):
    """leader: campaign, keep the lease, resign."""

    def campaign(self, holder: str, ttl: int) -> Any | None:
        """Take the leader key with a fresh lease if it is free; returns the lease or None."""
        lease = self._call("lease grant", lambda c: c.lease(ttl))
        key = self.leader_key()

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(compare=[c.transactions.version(key) == 0],
                                  success=[c.transactions.put(key, holder, lease=lease)],
                                  failure=[])
            return bool(ok)

        self._count_write()
        if self._call("leader campaign", txn):
            return lease
        with contextlib.suppress(StoreError):
            self._call("lease revoke", lambda c: c.revoke_lease(lease.id))
        return None

    def refresh(self, lease: Any) -> float:
        """Keep the lease alive; the seconds it has left (0 when it expired: leadership is
        lost). The deadline of this call is the caller's: see Leadership."""
        responses = self._call("lease refresh", lambda c: list(c.refresh_lease(lease.id)))
        return float(responses[0].TTL) if responses and responses[0].TTL > 0 else 0.0

    def leader(self) -> str | None:
        value = self.get(self.leader_key()).value
        return value.decode() if value is not None else None

    def resign(self, lease: Any) -> None:
        """Revoke the lease: the leader key goes with it, a standby takes over at once."""
        self._call("lease revoke", lambda c: c.revoke_lease(lease.id))
