"""The etcd store: the only package that imports etcd3 and knows the key layout.

Layout under `/<prefix>/<namespace>/` (EtcdSettings.root, DESIGN section 4), one module
per key family:

    desired/head, desired/graphs/<commit>[/<n>], desired/since/<commit>,
    desired/history/<seq>          desired.py   (sync, history, the loop's graph)
    ledger/<cycle>/<dag_id>        ledger.py    (what the loop asked Airflow to do)
    observed/<cycle>/<dag_id>,
    status/loop                    observed.py  (the recorder's mirror, the heartbeat)
    leader                         leadership.py (holder id bound to a lease)
    suspended/<dag_id|*>,
    control/<name>                 controls.py  (operator's marks and requests)
    events/<dag_id>/<run_id>       events.py    (listener wake-ups, watches)

audit.py finds every value of them that cannot be read (`doctor`).
client.py owns the connection (endpoints, TLS, auth, failover, bounded calls) and the
generic reads and writes; codec.py the value formats; errors.py the store's errors.
`EtcdStore` is all of them on one connection: callers import everything from here.
"""

from __future__ import annotations

from reconciler.adapters.store.audit import AuditStore
from reconciler.adapters.store.client import SCAN_CHUNK, EtcdClient, parse_endpoint
from reconciler.adapters.store.codec import (
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    PART_BYTES,
    PARTS_MAGIC,
    HeadRecord,
    Versioned,
    decode_since,
    encode_since,
)
from reconciler.adapters.store.controls import ControlStore
from reconciler.adapters.store.desired import DesiredStore
from reconciler.adapters.store.errors import (
    NotLeader,
    StoreAccessDenied,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreNotFound,
    StoreRequestTooLarge,
    StoreUnavailable,
    Unreadable,
)
from reconciler.adapters.store.events import EventStore, WatchHandle
from reconciler.adapters.store.leadership import LeaderStore
from reconciler.adapters.store.observed import ObservedStore


class EtcdStore(AuditStore, DesiredStore, ObservedStore, LeaderStore, ControlStore, EventStore):
    """A namespace of one etcd cluster, with endpoint failover and bounded calls: every
    key family's operations on one connection. Thread-safe for the loop's use (calls
    from the main thread, watch callbacks from the client's watch thread). Use as a
    context manager, or call close()."""


__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_TXN_OPS",
    "PARTS_MAGIC",
    "PART_BYTES",
    "SCAN_CHUNK",
    "AuditStore",
    "ControlStore",
    "DesiredStore",
    "EtcdClient",
    "EtcdStore",
    "EventStore",
    "HeadRecord",
    "LeaderStore",
    "NotLeader",
    "ObservedStore",
    "StoreAccessDenied",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreNotFound",
    "StoreRequestTooLarge",
    "StoreUnavailable",
    "Unreadable",
    "Versioned",
    "WatchHandle",
    "decode_since",
    "encode_since",
    "parse_endpoint",
]
