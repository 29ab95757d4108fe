"""The etcd store: the only module that imports etcd3 and knows the key layout.

Layout under `/<prefix>/<namespace>/` (DESIGN section 4):

    desired/head              JSON {"commit", "graph_digest", "synced_at", "source",
                              "previous", "forced"}
    desired/graphs/<commit>   gzip canonical graph JSON, immutable
    desired/since/<commit>    gzip JSON {dag_id: ISO time it first appeared in a synced head}
    ledger/<cycle>/<dag_id>   JSON ledger entry (reconciler.state.LedgerEntry)
    observed/<cycle>/<dag_id> JSON last observed Airflow state of that run
    leader                    holder id, bound to a lease
    events/<dag_id>/<run_id>  optional wake-ups (TTL'd)

The client is python3-etcd3, a maintained drop-in of the `etcd3` API (PyPI's etcd3 0.12
cannot be imported with protobuf >= 4). Every call has a deadline; a failed endpoint is
marked and the call is retried on the next one, so a one-shot command gives up after at
most one timeout per endpoint. Errors are typed by what the caller does next:
StoreUnavailable (retry later / exit 2), StoreConflict (re-read and re-decide).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import etcd3
import etcd3.exceptions
import etcd3.watch
import grpc

from reconciler.settings import EtcdSettings

T = TypeVar("T")

if not hasattr(etcd3.watch, "six"):
    # python3-etcd3 0.13's watcher still calls six.itervalues when a stream ends, without
    # importing six; without this the watch thread dies with a NameError on reconnect.
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(list(d.values())))

# etcd refuses transactions of more than 128 operations by default (--max-txn-ops).
MAX_TXN_OPS = 128


class StoreError(Exception):
    """Base of the store's errors; messages never contain the password."""


class StoreUnavailable(StoreError):
    """No endpoint answered in time, or the cluster refused us: retry later."""


class StoreConflict(StoreError):
    """A guarded transaction's comparison failed: someone else wrote first."""


@dataclass(frozen=True)
class Versioned:
    """A value with the revision it was last written at (0 = the key does not exist)."""

    value: bytes | None
    mod_revision: int

    def json(self) -> Any:
        return None if self.value is None else json.loads(self.value)


def _parse_endpoint(text: str) -> tuple[str, int]:
    text = text.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {text!r} is not host:port")
    return host.strip("[]"), int(port)


class EtcdStore:
    """A namespace of one etcd cluster, with endpoint failover and bounded calls."""

    def __init__(self, settings: EtcdSettings) -> None:
        if not settings.endpoints:
            raise ValueError("no etcd endpoint given")
        self.settings = settings
        self.root = settings.root
        self._lock = threading.RLock()
        self._client: etcd3.MultiEndpointEtcd3Client | None = None
        self.writes = 0  # puts and transactions sent: the loop's metrics read this
        self._endpoints = [_parse_endpoint(e) for e in settings.endpoints]

    # --- connection -----------------------------------------------------------------

    def _describe(self) -> str:
        return ",".join(self.settings.endpoints)

    def _make_client(self) -> etcd3.MultiEndpointEtcd3Client:
        s = self.settings
        creds = None
        if s.ca:
            creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(s.ca, s.key, s.cert)
        # Never through an HTTP proxy from the environment: etcd is reached directly.
        opts = [("grpc.enable_http_proxy", 0)]
        endpoints = [etcd3.Endpoint(host, port, secure=creds is not None, creds=creds,
                                    time_retry=max(2.0, s.timeout),
                                    opts=opts)  # type: ignore[arg-type]
                     for host, port in self._endpoints]
        last: BaseException | None = None
        # Authentication is itself a call to one endpoint: try them in turn.
        for _ in endpoints:
            try:
                client = etcd3.MultiEndpointEtcd3Client(
                    endpoints=endpoints, timeout=s.timeout, user=s.user, password=s.password,
                    failover=True)
                # python3-etcd3 sends the auth token both as metadata and as call
                # credentials; gRPC refuses call credentials on a plaintext channel, and
                # etcd only needs the metadata.
                client.call_credentials = None
                return client
            except grpc.RpcError as exc:
                last = exc
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.FAILED_PRECONDITION):
                    raise StoreUnavailable(f"etcd at {self._describe()} refused the "
                                           f"credentials of user {s.user!r}: "
                                           f"{exc.details()}") from None
                endpoints = endpoints[1:] + endpoints[:1]
            except etcd3.exceptions.Etcd3Exception as exc:
                last = exc
                endpoints = endpoints[1:] + endpoints[:1]
        raise StoreUnavailable(f"etcd at {self._describe()} is unreachable ({_why(last)})")

    @property
    def client(self) -> etcd3.MultiEndpointEtcd3Client:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[etcd3.MultiEndpointEtcd3Client], T]) -> T:
        """Run one call, failing over to the next endpoint; at most one try per endpoint."""
        last: BaseException | None = None
        for attempt in range(len(self._endpoints) + 1):
            try:
                return fn(self.client)
            except etcd3.exceptions.NoServerAvailableError as exc:
                last = exc
                break
            except (etcd3.exceptions.ConnectionFailedError,
                    etcd3.exceptions.ConnectionTimeoutError,
                    etcd3.exceptions.InternalServerError) as exc:
                last = exc  # the client marked that endpoint failed; the next try moves on
            except grpc.RpcError as exc:
                last = exc
                details = _why(exc)
                if "user name is empty" in details:
                    raise StoreUnavailable(f"etcd at {self._describe()} requires "
                                           "authentication: set RECONCILER_ETCD_USER and "
                                           "RECONCILER_ETCD_PASSWORD") from None
                if "auth token" in details or exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.close()  # the token expired: authenticate again
                    continue
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise StoreUnavailable(f"etcd refused {what} for user "
                                           f"{self.settings.user!r}: {details}") from None
                if attempt >= 1:
                    break
            except ValueError as exc:  # python-etcd3 raises it for "failed node" races
                last = exc
        raise StoreUnavailable(f"etcd at {self._describe()} is unreachable during {what} "
                               f"({_why(last)})")

    # --- keys -------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.root + "/".join(parts)

    def head_key(self) -> str:
        return self.key("desired", "head")

    def graph_key(self, commit: str) -> str:
        return self.key("desired", "graphs", commit)

    def since_key(self, commit: str) -> str:
        return self.key("desired", "since", commit)

    def ledger_key(self, cycle: str, dag_id: str) -> str:
        return self.key("ledger", cycle, dag_id)

    def observed_key(self, cycle: str, dag_id: str) -> str:
        return self.key("observed", cycle, dag_id)

    def leader_key(self) -> str:
        return self.key("leader")

    def events_prefix(self) -> str:
        return self.key("events") + "/"

    # --- generic reads and writes -------------------------------------------------------

    def get(self, key: str) -> Versioned:
        value, meta = self._call(f"get {key}", lambda c: c.get(key))
        return Versioned(value, meta.mod_revision if meta is not None else 0)

    def get_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        items = self._call(f"range {prefix}", lambda c: list(c.get_prefix(prefix)))
        for value, meta in items:
            yield meta.key.decode(), value

    def put(self, key: str, value: bytes) -> None:
        self.writes += 1
        self._call(f"put {key}", lambda c: c.put(key, value))

    def put_json(self, key: str, data: Any) -> None:
        self.put(key, _dumps(data))

    def delete_prefix(self, prefix: str) -> None:
        self.writes += 1
        self._call(f"delete {prefix}", lambda c: c.delete_prefix(prefix))

    def put_if_revision(self, key: str, mod_revision: int, value: bytes,
                        also: list[tuple[str, bytes]] | None = None) -> bool:
        """Put `key` (and `also`) only if `key` is still at `mod_revision` (0 = absent)."""
        ops = [(key, value), *(also or [])]
        if len(ops) > MAX_TXN_OPS:
            raise ValueError(f"{len(ops)} operations in one transaction (etcd allows "
                             f"{MAX_TXN_OPS})")

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> bool:
            compare = [c.transactions.mod(key) == mod_revision]
            ok, _ = c.transaction(compare=compare,
                                  success=[c.transactions.put(k, v) for k, v in ops],
                                  failure=[])
            return bool(ok)

        self.writes += 1
        return self._call(f"transaction on {key}", txn)

    # --- desired state (sync) ------------------------------------------------------------

    def read_head(self) -> tuple[dict[str, Any] | None, int]:
        got = self.get(self.head_key())
        return got.json(), got.mod_revision

    def write_head(self, head: dict[str, Any], expected_mod_revision: int,
                   blobs: list[tuple[str, bytes]]) -> None:
        """The new head and its blobs in one transaction guarded by the head's revision.

        Raises StoreConflict when another sync moved the head since it was read.
        """
        if not self.put_if_revision(self.head_key(), expected_mod_revision, _dumps(head),
                                    also=blobs):
            raise StoreConflict("desired/head changed since it was read")

    def read_graph_blob(self, commit: str) -> bytes | None:
        return self.get(self.graph_key(commit)).value

    def read_since_blob(self, commit: str) -> bytes | None:
        return self.get(self.since_key(commit)).value

    # --- ledger and observed state ----------------------------------------------------------

    def read_ledger(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every ledger entry, keyed by (cycle, dag_id) as written."""
        prefix = self.key("ledger") + "/"
        out = {}
        for key, value in self.get_prefix(prefix):
            cycle, _, dag_id = key[len(prefix):].rpartition("/")
            out[(cycle, dag_id)] = json.loads(value)
        return out

    def read_observed(self) -> dict[tuple[str, str], dict[str, Any]]:
        prefix = self.key("observed") + "/"
        out = {}
        for key, value in self.get_prefix(prefix):
            cycle, _, dag_id = key[len(prefix):].rpartition("/")
            out[(cycle, dag_id)] = json.loads(value)
        return out

    def put_fenced(self, holder: str, puts: list[tuple[str, bytes]]) -> bool:
        """Put only while `holder` still holds the leader key (fencing a deposed leader)."""
        if len(puts) >= MAX_TXN_OPS:
            raise ValueError(f"{len(puts)} operations in one transaction")
        leader = self.leader_key()

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> bool:
            ok, _ = c.transaction(compare=[c.transactions.value(leader) == holder],
                                  success=[c.transactions.put(k, v) for k, v in puts],
                                  failure=[])
            return bool(ok)

        self.writes += 1
        return self._call("fenced write", txn)

    def put_ledger(self, holder: str, cycle: str, dag_id: str, entry: dict[str, Any]) -> None:
        if not self.put_fenced(holder, [(self.ledger_key(cycle, dag_id), _dumps(entry))]):
            raise StoreConflict(f"not the leader any more ({holder}); ledger entry for "
                                f"{dag_id} {cycle} not written")

    def delete_cycle(self, cycle: str) -> None:
        """Forget a cycle that left the window (ledger and observed)."""
        self.delete_prefix(self.key("ledger", cycle) + "/")
        self.delete_prefix(self.key("observed", cycle) + "/")

    # --- leader election ----------------------------------------------------------------------

    def campaign(self, holder: str, ttl: int) -> Any | None:
        """Take the leader key with a fresh lease if it is free; returns the lease or None."""
        lease = self._call("lease grant", lambda c: c.lease(ttl))
        key = self.leader_key()

        def txn(c: etcd3.MultiEndpointEtcd3Client) -> bool:
            ok, _ = c.transaction(compare=[c.transactions.version(key) == 0],
                                  success=[c.transactions.put(key, holder, lease=lease)],
                                  failure=[])
            return bool(ok)

        self.writes += 1
        if self._call("leader campaign", txn):
            return lease
        self._call("lease revoke", lambda c: c.revoke_lease(lease.id))
        return None

    def refresh(self, lease: Any) -> bool:
        """Keep the lease alive; False when it expired (leadership is lost)."""
        responses = self._call("lease refresh", lambda c: list(c.refresh_lease(lease.id)))
        return bool(responses) and responses[0].TTL > 0

    def leader(self) -> str | None:
        value = self.get(self.leader_key()).value
        return value.decode() if value is not None else None

    def resign(self, lease: Any) -> None:
        self._call("lease revoke", lambda c: c.revoke_lease(lease.id))

    # --- wake-ups -----------------------------------------------------------------------------

    def watch(self, prefixes: list[str], wake: threading.Event) -> Callable[[], None]:
        """Set `wake` on any change under `prefixes`; returns a function that cancels it.

        A broken watch only costs latency: the loop also wakes every --interval.
        """
        ids = []

        def callback(_response: Any) -> None:
            wake.set()

        for prefix in prefixes:
            ids.append(self._call("watch", lambda c, p=prefix: c.add_watch_prefix_callback(
                p, callback)))

        def cancel() -> None:
            for watch_id in ids:
                with contextlib.suppress(StoreError):
                    self._call("cancel watch", lambda c, w=watch_id: c.cancel_watch(w))

        return cancel

    def ping(self) -> float:
        """Round-trip time of a status call, in seconds."""
        start = time.monotonic()
        self._call("status", lambda c: c.status())
        return time.monotonic() - start


def _why(exc: BaseException | None) -> str:
    """A short reason for an error, without gRPC's multi-line debug string."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
