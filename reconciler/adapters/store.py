"""The etcd store: the only module that imports etcd3 and knows the key layout.

Layout under `/<prefix>/<namespace>/` (EtcdSettings.root, DESIGN section 4):

    desired/head              JSON HeadRecord {"commit", "graph_digest", "synced_at",
                              "source", "previous", "forced", "seq"}
    desired/graphs/<commit>   gzip canonical graph JSON of that commit, never rewritten;
                              or, when it is over one part (PART_BYTES), a manifest
                              (PARTS_MAGIC + {"parts", "bytes", "digest"}) and the blob in
    desired/graphs/<commit>/<n>  parts 000000, 000001, ... (concatenated: the gzip blob)
    desired/since/<commit>    gzip JSON {dag_id: ISO time it first appeared in a synced head}
                              (split the same way when it is over one part)
    desired/history/<seq>     JSON copy of the head record of sync number <seq> (10 digits)
    ledger/<cycle>/<dag_id>   JSON ledger entry (reconciler.core.state.LedgerEntry)
    observed/<cycle>/<dag_id> JSON last observed Airflow state of that run
    leader                    holder id, bound to a lease
    events/<dag_id>/<run_id>  optional wake-ups (TTL'd)

History is kept as `desired/history/<seq>` rather than by walking `previous`: a rollback
can sync the same commit twice, and one range read gives the list newest first. The head,
its history entry, the since-map and (if new) the graph blob are written in one
transaction guarded by the head's mod revision, so they never disagree.

A graph has no fixed size: a blob over PART_BYTES is split across numbered part keys, and
the head names them (`graph_parts`, `graph_blob_digest`: sha256 of the whole blob, also in
the manifest). etcd caps one request at 1.5 MiB and a transaction at 128 operations, so
when the parts and the head do not fit in one request, the parts are written first, each
in its own put (they are content-addressed by commit: an orphan of a sync that then lost
its race is harmless, and the next sync of that commit writes the same bytes), and then
the head, its history entry and the manifests in the transaction guarded by the head's
revision that also compares that every part exists. A reader joins the parts and checks
the digest: a missing or mixed part is StoreCorrupt (bad stored data), never a crash and
never a wrong graph. A graph of one part is stored exactly as before (one value, no
manifest, no new head fields), so older readers still read it.

The client is python3-etcd3, a maintained drop-in of the `etcd3` API (PyPI's etcd3 0.12
cannot be imported with protobuf >= 4). Every call has a deadline (EtcdSettings.timeout);
a failed endpoint is marked and the call is retried on the next one in the order given,
so a one-shot command gives up after at most one timeout per endpoint. Errors are typed by
what the caller does next: StoreUnavailable (retry later / exit 2), StoreAccessDenied
(fix the credentials), StoreConflict (re-read and re-decide). No message contains the
password.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

# gRPC's C core logs TLS handshake and connection failures on stderr by itself; the store
# reports them as one error instead. Set before grpc is imported; the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import etcd3
import etcd3.events
import etcd3.exceptions
import etcd3.watch
import grpc
from etcd3 import etcdrpc

from reconciler.core.errors import (
    BadStoredData,
    LostLeadership,
    NeedsHuman,
    ReconcilerError,
    RetryLater,
)
from reconciler.core.graph import Graph
from reconciler.core.settings import EtcdSettings

T = TypeVar("T")

if not hasattr(etcd3.watch, "six"):
    # python3-etcd3 0.13's watcher still calls six.itervalues when a stream ends, without
    # importing six; without this the watch thread dies with a NameError on reconnect.
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(list(d.values())))

# etcd refuses transactions of more than 128 operations by default (--max-txn-ops) and
# requests over 1.5 MiB (--max-request-bytes); refuse before sending, with a clear message.
MAX_TXN_OPS = 128
MAX_REQUEST_BYTES = 1536 * 1024
# Range reads of ledger/ and observed/ can exceed gRPC's 4 MiB default for large graphs.
_MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# What an etcd member answers when the cluster cannot finish a request for now.
_SERVER_BUSY = re.compile(r"context deadline exceeded|request timed out|leader changed|"
                          r"no leader", re.IGNORECASE)
# Keys a range read of ledger/ or observed/ asks for at once (scan_prefix).
SCAN_CHUNK = 5000
# One part of a split blob: with its key, well under the request limit on its own.
PART_BYTES = 1024 * 1024
PARTS_MAGIC = b"reconciler-parts/1\n"
_PART_DIGITS = 6
_SEQ_DIGITS = 10
_HEX = re.compile(r"^[0-9a-f]{4,64}$")


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


@dataclass(frozen=True)
class HeadRecord:
    """The value of desired/head (and of each desired/history/<seq> entry)."""

    commit: str
    graph_digest: str
    synced_at: datetime
    source: str
    previous: str | None = None
    """The commit of the head this one replaced (None for the first sync)."""
    forced: bool = False
    """True when this sync was not a fast-forward (a rollback with --force)."""
    seq: int = 1
    """1 for the first sync of the namespace, then +1 per sync: the history key."""
    graph_parts: int = 0
    """0: the graph blob is the one value desired/graphs/<commit>; N: it is split across
    the N keys desired/graphs/<commit>/<n> (see the module's docstring)."""
    graph_blob_digest: str = ""
    """With graph_parts: "sha256:<hex>" of the whole (joined) blob."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["synced_at"] = _iso(self.synced_at)
        if not self.graph_parts:  # a graph in one value: the head reads as it always did
            del data["graph_parts"], data["graph_blob_digest"]
        return data

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadRecord:
        # Unknown keys are ignored so that an older reconciler can read a newer head.
        return cls(commit=str(data["commit"]), graph_digest=str(data.get("graph_digest", "")),
                   synced_at=_parse_iso(str(data["synced_at"])),
                   source=str(data.get("source", "")), previous=data.get("previous"),
                   forced=bool(data.get("forced", False)), seq=int(data.get("seq", 0)),
                   graph_parts=int(data.get("graph_parts", 0)),
                   graph_blob_digest=str(data.get("graph_blob_digest", "")))

    def __getitem__(self, name: str) -> Any:
        # Mapping-style access for callers written against the earlier dict form of the head.
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class Versioned:
    """A value with the revision it was last written at (0 = the key does not exist)."""

    value: bytes | None
    mod_revision: int

    def json(self) -> Any:
        return None if self.value is None else json.loads(self.value)


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


def parse_endpoint(text: str) -> tuple[str, int, bool]:
    """'host:port', 'http://host:port' or 'https://host:port' -> (host, port, tls)."""
    text = text.strip().rstrip("/")
    tls = text.startswith("https://")
    text = text.removeprefix("http://").removeprefix("https://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {text!r} is not host:port")
    return host.strip("[]"), int(port), tls


class EtcdStore:
    """A namespace of one etcd cluster, with endpoint failover and bounded calls.

    Thread-safe for the loop's use (calls from the main thread, watch callbacks from the
    client's watch thread). Use as a context manager, or call close().
    """

    def __init__(self, settings: EtcdSettings) -> None:
        if not settings.endpoints:
            raise ValueError("no etcd endpoint given")
        self.settings = settings
        self.root = settings.root
        self._endpoints = [parse_endpoint(e) for e in settings.endpoints]
        self._lock = threading.RLock()
        self._client: Any = None  # etcd3.MultiEndpointEtcd3Client, built on first use
        self.writes = 0  # puts and transactions sent: the loop's metrics read this
        self._writes_lock = threading.Lock()
        self.last_contact: float | None = None
        """time.monotonic() of the last answer from etcd (readiness)."""
        self.last_failure: tuple[float, str] | None = None
        """When and why the last call found no endpoint (readiness)."""
        self.part_bytes = PART_BYTES
        """The size of one part of a split blob (tests make it small)."""

    # --- connection -----------------------------------------------------------------

    def _describe(self) -> str:
        return ",".join(self.settings.endpoints)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        s = self.settings
        if not (s.ca or s.cert or any(tls for _, _, tls in self._endpoints)):
            return None

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise StoreAccessDenied(f"cannot read TLS file {path}: {exc.strerror}"
                                        ) from None

        # No CA: gRPC verifies the server against the system's roots.
        return grpc.ssl_channel_credentials(read(s.ca), read(s.key), read(s.cert))

    def _make_client(self) -> Any:
        s = self.settings
        creds = self._credentials()
        # Never through an HTTP proxy from the environment: etcd is reached directly.
        opts = [("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES)]
        endpoints = [etcd3.Endpoint(host, port, secure=creds is not None, creds=creds,
                                    time_retry=max(2.0, s.timeout), opts=opts)
                     for host, port, _ in self._endpoints]
        # No user/password here: the client would authenticate against a random endpoint
        # inside its constructor, with no failover; _authenticate does it in order.
        client = etcd3.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=s.timeout,
                                                failover=True)
        # The client starts on a random endpoint; the settings' order is the preference.
        client._current_endpoint_label = endpoints[0].netloc
        if s.user is not None:
            try:
                self._authenticate(client)
            except BaseException:
                client.close()
                raise
        return client

    def _authenticate(self, client: Any) -> None:
        s = self.settings
        if s.password is None:
            raise StoreAccessDenied(f"etcd user {s.user!r} given without a password: set "
                                    "RECONCILER_ETCD_PASSWORD (or --etcd-password-file)")
        last: BaseException | None = None
        for label, endpoint in client.endpoints.items():
            if endpoint.is_failed():
                continue
            client._current_endpoint_label = label
            request = etcdrpc.AuthenticateRequest(name=s.user, password=s.password)
            try:
                response = client.authstub.Authenticate(request, s.timeout)
            except grpc.RpcError as exc:
                last = exc
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    endpoint.fail()
                    continue
                if code == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in _why(exc):
                    return  # the cluster has no auth: the credentials are simply not needed
                raise StoreAccessDenied(f"etcd at {label} refused the credentials of user "
                                        f"{s.user!r} ({_why(exc)})") from None
            # The token goes as metadata only: python3-etcd3 would also set it as call
            # credentials, which gRPC refuses on a plaintext channel.
            client.metadata = (("token", response.token),)
            client.call_credentials = None
            return
        raise StoreUnavailable(f"etcd at {self._describe()} is unreachable ({_why(last)})")

    @property
    def client(self) -> Any:
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

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run one call, failing over to the next endpoint; at most one try per endpoint."""
        last: BaseException | None = None
        reauthenticated = False
        for _ in range(len(self._endpoints) + 1):
            try:
                result = fn(self.client)
                self.last_contact = time.monotonic()
                return result
            except etcd3.exceptions.NoServerAvailableError as exc:
                last = last or exc  # every endpoint failed: the reason is the last failure
                break
            except (etcd3.exceptions.ConnectionFailedError,
                    etcd3.exceptions.ConnectionTimeoutError,
                    etcd3.exceptions.InternalServerError) as exc:
                # The client marked that endpoint failed, so the next try moves on. It raises
                # these without details; the gRPC error it translated is the context.
                last = exc.__context__ or exc
            except etcd3.exceptions.WatchTimedOut as exc:
                last = exc
            except grpc.RpcError as exc:
                details = _why(exc)
                code = exc.code()
                if "user name is empty" in details:
                    raise StoreAccessDenied(
                        f"etcd at {self._describe()} requires authentication: set "
                        "RECONCILER_ETCD_USER and RECONCILER_ETCD_PASSWORD") from None
                if code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in details:
                    if reauthenticated:
                        raise StoreAccessDenied(f"etcd refused {what}: {details}") from None
                    reauthenticated = True
                    self.close()  # the token expired (or the member restarted): log in again
                    continue
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    raise StoreAccessDenied(f"etcd refused {what} for user "
                                            f"{self.settings.user!r}: {details}") from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in details \
                        or "too many operations" in details:
                    raise StoreRequestTooLarge(f"etcd refused {what}: {details}") from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or _SERVER_BUSY.search(details):
                    # The member took the request but the cluster could not finish it (its
                    # leader died, an election): transient. Not sent again here: a write
                    # may have been applied; the caller's next attempt decides.
                    message = (f"etcd at {self._describe()} did not complete {what} "
                               f"({details}); a member is down or electing a leader")
                    self.last_failure = (time.monotonic(), message)
                    raise StoreUnavailable(message) from None
                raise StoreError(f"etcd refused {what}: {details}") from None
        message = (f"etcd at {self._describe()} is unreachable during {what} "
                   f"({_why(last)})")
        self.last_failure = (time.monotonic(), message)
        raise StoreUnavailable(message)

    def _count_write(self) -> None:
        with self._writes_lock:
            self.writes += 1

    def revision(self) -> int:
        """The cluster's current revision: it moves on every write, to any key."""
        response = self._call("get revision", lambda c: c.get_response(self.head_key(),
                                                                       count_only=True))
        return int(response.header.revision)

    def ping(self) -> float:
        """Round-trip time of a status call, in seconds."""
        start = time.monotonic()
        self._call("status", lambda c: c.status())
        return time.monotonic() - start

    # --- keys -------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        for part in parts:
            if not part or "/" in part:
                raise ValueError(f"{part!r} cannot be one segment of an etcd key")
        return self.root + "/".join(parts)

    def head_key(self) -> str:
        return self.key("desired", "head")

    def graph_key(self, commit: str) -> str:
        return self.key("desired", "graphs", commit)

    def graph_part_key(self, commit: str, n: int) -> str:
        return self.key("desired", "graphs", commit, f"{n:0{_PART_DIGITS}d}")

    def since_key(self, commit: str) -> str:
        return self.key("desired", "since", commit)

    def history_key(self, seq: int) -> str:
        return self.key("desired", "history", f"{seq:0{_SEQ_DIGITS}d}")

    def ledger_key(self, cycle: str, dag_id: str) -> str:
        return self.key("ledger", cycle, dag_id)

    def observed_key(self, cycle: str, dag_id: str) -> str:
        return self.key("observed", cycle, dag_id)

    def leader_key(self) -> str:
        return self.key("leader")

    def events_prefix(self) -> str:
        return self.key("events") + "/"

    def event_key(self, dag_id: str, run_id: str) -> str:
        return self.key("events", dag_id, run_id)

    # --- generic reads and writes -------------------------------------------------------

    def get(self, key: str) -> Versioned:
        value, meta = self._call(f"get {key}", lambda c: c.get(key))
        return Versioned(value, meta.mod_revision if meta is not None else 0)

    def get_prefix(self, prefix: str, *, keys_only: bool = False, newest_key_first: bool = False,
                   limit: int = 0) -> list[tuple[str, bytes]]:
        """(key, value) pairs under `prefix`, sorted by key (descending if asked)."""
        order = "descend" if newest_key_first else "ascend"
        # The raw response, not get_prefix's (value, KVMetadata) pairs: building a metadata
        # object per key cost more than the read itself for the 150,000 ledger entries of
        # 50,000 pipelines x 3 cycles.
        response = self._call(f"range {prefix}", lambda c: c.get_prefix_response(
            prefix, keys_only=keys_only, sort_order=order, sort_target="key", limit=limit))
        return [(kv.key.decode(), kv.value or b"") for kv in response.kvs]

    def put(self, key: str, value: bytes, *, lease: Any = None) -> None:
        self._count_write()
        self._call(f"put {key}", lambda c: c.put(key, value, lease=lease))

    def get_json(self, key: str) -> Any:
        return self.get(key).json()

    def put_json(self, key: str, data: Any) -> None:
        self.put(key, _dumps(data))

    def delete_prefix(self, prefix: str) -> None:
        self._count_write()
        self._call(f"delete {prefix}", lambda c: c.delete_prefix(prefix))

    def put_if_revision(self, key: str, mod_revision: int, value: bytes,
                        also: Iterable[tuple[str, bytes]] = ()) -> bool:
        """Put `key` (and `also`) only if `key` is still at `mod_revision` (0 = absent)."""
        ops = [(key, value), *also]
        _check_request(ops)

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(compare=[c.transactions.mod(key) == mod_revision],
                                  success=[c.transactions.put(k, v) for k, v in ops],
                                  failure=[])
            return bool(ok)

        self._count_write()
        return self._call(f"transaction on {key}", txn)

    # --- desired state (sync) ------------------------------------------------------------

    def read_head(self) -> tuple[HeadRecord | None, int]:
        """The synced head and its mod revision (None, 0 when nothing was synced yet)."""
        got = self.get(self.head_key())
        if got.value is None:
            return None, 0
        try:
            return HeadRecord.from_dict(json.loads(got.value)), got.mod_revision
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(self.head_key(), _short(exc)) from None

    def write_sync(self, head: HeadRecord, expected_mod_revision: int,
                   graph_blob: bytes | None, since: Mapping[str, datetime], *,
                   split: bool = False) -> HeadRecord:
        """Head, history entry, since-map and (unless None) the graph blob, atomically;
        returns the head as written.

        Guarded by the head's mod revision as read (0 = no head yet). Raises StoreConflict
        when another sync moved the head in between (or a part it names vanished).
        Without `split` every value is one key and a write over etcd's limits is refused
        (StoreRequestTooLarge) before sending. With `split` (what sync uses) a blob over
        `part_bytes` goes into parts, the head names the graph's parts, and parts that do
        not fit beside the head in one request are written before it (module docstring).
        """
        since_blob = encode_since(since)
        if not split:
            also = [(self.history_key(head.seq), head.to_json()),
                    (self.since_key(head.commit), since_blob)]
            if graph_blob is not None:
                also.append((self.graph_key(head.commit), graph_blob))
            self._guarded_head(head, expected_mod_revision, also, ())
            return head
        graph_value: bytes | None = None
        graph_parts: list[tuple[str, bytes]] = []
        if graph_blob is not None:
            graph_value, graph_parts = self._split(self.graph_key(head.commit), graph_blob)
            existing = graph_parts
        else:  # the commit's graph is stored: the head names its parts as they are
            existing = self._stored_parts(self.graph_key(head.commit))
        manifest = _read_manifest(self.graph_key(head.commit), graph_value) \
            if graph_value is not None else self._stored_manifest(head.commit)
        if manifest is not None:
            head = replace(head, graph_parts=int(manifest["parts"]),
                           graph_blob_digest=str(manifest["digest"]))
        else:
            head = replace(head, graph_parts=0, graph_blob_digest="")
        since_value, since_parts = self._split(self.since_key(head.commit), since_blob)
        values = [(self.history_key(head.seq), head.to_json()),
                  (self.since_key(head.commit), since_value)]
        if graph_value is not None:
            values.append((self.graph_key(head.commit), graph_value))
        parts = graph_parts + since_parts
        kept = [k for k, _ in existing] if graph_blob is None else []  # reused, not rewritten
        if _fits([(self.head_key(), head.to_json()), *values, *parts]) \
                and len(kept) + 1 <= MAX_TXN_OPS:
            self._guarded_head(head, expected_mod_revision, [*values, *parts], kept)
            return head
        for key, value in parts:  # immutable, content-addressed: harmless if orphaned
            self.put(key, value)
        must_exist = [k for k, _ in parts] + kept
        if len(must_exist) + 1 > MAX_TXN_OPS:
            raise StoreRequestTooLarge(f"{len(must_exist)} parts are more than one transaction "
                                       f"can check (etcd allows {MAX_TXN_OPS} comparisons)")
        self._guarded_head(head, expected_mod_revision, values, must_exist)
        return head

    def _guarded_head(self, head: HeadRecord, expected_mod_revision: int,
                      also: list[tuple[str, bytes]], must_exist: Iterable[str]) -> None:
        key = self.head_key()
        ops = [(key, head.to_json()), *also]
        _check_request(ops)
        exist = list(must_exist)

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(
                compare=[c.transactions.mod(key) == expected_mod_revision,
                         *(c.transactions.version(k) > 0 for k in exist)],
                success=[c.transactions.put(k, v) for k, v in ops], failure=[])
            return bool(ok)

        self._count_write()
        if not self._call(f"transaction on {key}", txn):
            raise StoreConflict(f"{key} changed since it was read (another sync won the race)"
                                + (", or a part of the graph it names is missing"
                                   if exist else ""))

    def _split(self, key: str, blob: bytes, size: int | None = None
               ) -> tuple[bytes, list[tuple[str, bytes]]]:
        """(the value of `key`, [(part key, part)]): the blob itself when it fits one part,
        else a manifest and the parts."""
        size = max(1, size or self.part_bytes)
        if len(blob) <= size:
            return blob, []
        parts = [(f"{key}/{n:0{_PART_DIGITS}d}", blob[at:at + size])
                 for n, at in enumerate(range(0, len(blob), size))]
        manifest = {"parts": len(parts), "bytes": len(blob), "digest": _sha256(blob),
                    "part_bytes": size}
        return PARTS_MAGIC + _dumps(manifest), parts

    def repair_parts(self, commit: str, graph_blob: bytes) -> int:
        """Rewrite the parts of `commit`'s split graph that are missing (a torn write), when
        `graph_blob` is the blob its manifest names; the number of parts written."""
        key = self.graph_key(commit)
        manifest = self._stored_manifest(commit)
        if manifest is None or manifest["digest"] != _sha256(graph_blob):
            return 0
        present = {k for k, _ in self._stored_parts(key)}
        _, parts = self._split(key, graph_blob, int(manifest.get("part_bytes") or 0) or None)
        if len(parts) != int(manifest["parts"]):
            return 0  # split some other way: not ours to rewrite
        missing = [(k, v) for k, v in parts if k not in present]
        for part_key, value in missing:
            self.put(part_key, value)
        return len(missing)

    def _stored_manifest(self, commit: str) -> dict[str, Any] | None:
        key = self.graph_key(commit)
        return _read_manifest(key, self.get(key).value)

    def _stored_parts(self, key: str) -> list[tuple[str, bytes]]:
        return [(k, b"") for k, _ in self.get_prefix(key + "/", keys_only=True)]

    def _read_blob(self, key: str) -> bytes | None:
        """The value of `key`, with the parts joined when it is a manifest (StoreCorrupt
        when one is missing, or the joined blob is not the one the manifest names)."""
        value = self.get(key).value
        manifest = _read_manifest(key, value)
        if manifest is None:
            return value
        count = int(manifest["parts"])
        found = dict(self.get_prefix(key + "/"))
        pieces = []
        for n in range(count):
            part_key = f"{key}/{n:0{_PART_DIGITS}d}"
            if part_key not in found:
                raise StoreCorrupt(part_key, f"part {n + 1} of {count} is missing (a torn "
                                   "write): sync the commit again to rewrite it")
            pieces.append(found[part_key])
        blob = b"".join(pieces)
        if _sha256(blob) != manifest["digest"] or len(blob) != int(manifest["bytes"]):
            raise StoreCorrupt(key, f"the {count} parts join to {len(blob)} bytes that are "
                               f"not the blob the manifest names ({manifest['digest']})")
        return blob

    def read_graph_blob(self, commit: str) -> bytes | None:
        """The graph blob of `commit` (parts joined), None when it was never synced."""
        return self._read_blob(self.graph_key(commit))

    def read_graph(self, commit: str) -> Graph | None:
        blob = self.read_graph_blob(commit)
        if blob is None:
            return None
        try:
            return Graph.from_compressed(blob)
        except Exception as exc:  # any decoding failure of stored bytes is bad data
            raise StoreCorrupt(self.graph_key(commit), _short(exc)) from None

    def read_since_blob(self, commit: str) -> bytes | None:
        return self._read_blob(self.since_key(commit))

    def read_since(self, commit: str) -> dict[str, datetime]:
        """{dag_id: first synced} for that commit's graph ({} if none was written)."""
        blob = self.read_since_blob(commit)
        if blob is None:
            return {}
        try:
            return decode_since(blob)
        except Exception as exc:
            raise StoreCorrupt(self.since_key(commit), _short(exc)) from None

    def synced_commits(self, prefix: str) -> list[str]:
        """Full hashes of the synced graphs whose commit starts with `prefix`."""
        if not _HEX.match(prefix):
            return []
        base = self.key("desired", "graphs") + "/"
        return [k[len(base):] for k, _ in self.get_prefix(base + prefix, keys_only=True)
                if "/" not in k[len(base):]]  # not the parts of a split graph

    def read_history(self, limit: int = 0) -> list[HeadRecord]:
        """The synced heads, newest first (limit 0 = all)."""
        prefix = self.key("desired", "history") + "/"
        return [HeadRecord.from_dict(json.loads(v))
                for _, v in self.get_prefix(prefix, newest_key_first=True, limit=limit)]

    # --- ledger and observed state --------------------------------------------------------

    def get_ledger(self, cycle: str, dag_id: str) -> dict[str, Any] | None:
        data: dict[str, Any] | None = self.get_json(self.ledger_key(cycle, dag_id))
        return data

    def get_observed(self, cycle: str, dag_id: str) -> dict[str, Any] | None:
        data: dict[str, Any] | None = self.get_json(self.observed_key(cycle, dag_id))
        return data

    def put_observed(self, cycle: str, dag_id: str, data: Mapping[str, Any]) -> None:
        self.put_json(self.observed_key(cycle, dag_id), dict(data))

    def read_ledger(self, cycle: str | None = None) -> dict[tuple[str, str], Any]:
        """Every ledger entry (of one cycle, if given), keyed by (cycle, dag_id) as written.

        A value that is not JSON comes back as `Unreadable` (the caller quarantines it)."""
        return dict(self.scan_ledger(cycle))

    def read_observed(self, cycle: str | None = None) -> dict[tuple[str, str], Any]:
        return dict(self.scan_observed(cycle))

    def scan_ledger(self, cycle: str | None = None) -> Iterator[tuple[tuple[str, str], Any]]:
        """As `read_ledger`, one entry at a time: a caller that keeps a compact form never
        holds every decoded entry at once (150,000 at 50,000 pipelines x 3 cycles)."""
        return self._scan_cycles("ledger", cycle)

    def scan_observed(self, cycle: str | None = None) -> Iterator[tuple[tuple[str, str], Any]]:
        return self._scan_cycles("observed", cycle)

    def _scan_cycles(self, kind: str, cycle: str | None
                     ) -> Iterator[tuple[tuple[str, str], Any]]:
        base = self.key(kind) + "/"
        prefix = self.key(kind, cycle) + "/" if cycle is not None else base
        for chunk in self.scan_prefix(prefix):
            for key, value in chunk:
                # dag ids never contain "/" (Airflow's rule), cycles are ISO strings: split
                # once.
                found_cycle, _, dag_id = key[len(base):].rpartition("/")
                try:
                    yield (found_cycle, dag_id), json.loads(value)
                except ValueError as exc:
                    yield (found_cycle, dag_id), Unreadable(key, _short(exc))

    def scan_prefix(self, prefix: str, *, chunk: int = SCAN_CHUNK
                    ) -> Iterator[list[tuple[str, bytes]]]:
        """(key, value) pairs under `prefix` in key order, `chunk` keys a request, all read
        at the revision of the first request: one consistent view, as one range would be,
        without one response (and its decoded copy) of every key at once."""
        start, end = prefix.encode(), etcd3.utils.prefix_range_end(prefix.encode())
        revision: int | None = None
        def read(c: Any) -> Any:  # start and revision as they are at the call
            return c.get_range_response(start, end, limit=chunk, revision=revision)

        while True:
            response = self._call(f"range {prefix}", read)
            if revision is None:
                revision = response.header.revision
            kvs = response.kvs
            yield [(kv.key.decode(), kv.value or b"") for kv in kvs]
            if not response.more or not kvs:
                return
            start = kvs[-1].key + b"\0"  # the next key after the last one read

    def put_fenced(self, holder: str, puts: list[tuple[str, bytes]]) -> bool:
        """Put only while `holder` still holds the leader key (fencing a deposed leader)."""
        _check_request(puts, extra_ops=1)
        leader = self.leader_key()

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(compare=[c.transactions.value(leader) == holder],
                                  success=[c.transactions.put(k, v) for k, v in puts],
                                  failure=[])
            return bool(ok)

        self._count_write()
        return self._call("fenced write", txn)

    def put_ledger(self, holder: str, cycle: str, dag_id: str, entry: Mapping[str, Any]) -> None:
        """Write a ledger entry only while `holder` leads; StoreConflict otherwise."""
        if not self.put_fenced(holder, [(self.ledger_key(cycle, dag_id), _dumps(entry))]):
            raise NotLeader(f"not the leader any more ({holder}); ledger entry for "
                            f"{dag_id} {cycle} not written")

    def delete_cycle(self, holder: str, cycle: str) -> None:
        """Forget a cycle that left the window (ledger and observed), fenced like every
        write of the loop: a deposed leader cannot delete what the new one relies on."""
        leader = self.leader_key()
        ranges = []
        for kind in ("ledger", "observed"):
            prefix = self.key(kind, cycle) + "/"
            ranges.append((prefix, etcd3.utils.prefix_range_end(prefix.encode())))

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(
                compare=[c.transactions.value(leader) == holder],
                success=[c.transactions.delete(p, range_end=e) for p, e in ranges],
                failure=[])
            return bool(ok)

        self._count_write()
        if not self._call(f"delete cycle {cycle}", txn):
            raise NotLeader(f"not the leader any more ({holder}); cycle {cycle} not deleted")

    # --- leader election -------------------------------------------------------------------

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

    # --- operator controls -------------------------------------------------------------------

    def suspended_prefix(self) -> str:
        return self.key("suspended") + "/"

    def suspend_key(self, target: str) -> str:
        """`suspended/<dag_id>`, or `suspended/*` for the whole namespace."""
        return self.key("suspended", target)

    def read_suspended(self) -> dict[str, Any]:
        """{dag_id or "*": the mark (who, when, why)}; an unreadable mark still suspends."""
        base = self.suspended_prefix()
        out: dict[str, Any] = {}
        for key, value in self.get_prefix(base):
            try:
                out[key[len(base):]] = json.loads(value)
            except ValueError as exc:
                out[key[len(base):]] = Unreadable(key, _short(exc))
        return out

    def put_suspend(self, target: str, mark: Mapping[str, Any]) -> None:
        self.put_json(self.suspend_key(target), dict(mark))

    def delete_suspend(self, target: str) -> bool:
        """Remove the mark; False when there was none."""
        key = self.suspend_key(target)
        self._count_write()
        return bool(self._call(f"delete {key}", lambda c: c.delete(key)))

    def control_key(self, name: str) -> str:
        """`control/<name>`: requests to the loop (e.g. `reconcile`: a pass and a relist now)."""
        return self.key("control", name)

    def heartbeat_key(self) -> str:
        """`status/loop`: the leader's last pass, written at most once a minute (fenced)."""
        return self.key("status", "loop")

    # --- wake-ups ----------------------------------------------------------------------------

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


# --- value formats ---------------------------------------------------------------------------

def encode_since(since: Mapping[str, datetime]) -> bytes:
    data = {dag_id: _iso(at) for dag_id, at in sorted(since.items())}
    return gzip.compress(_dumps(data), compresslevel=6, mtime=0)


def decode_since(blob: bytes) -> dict[str, datetime]:
    return {dag_id: _parse_iso(at) for dag_id, at in json.loads(gzip.decompress(blob)).items()}


def _iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}: times in etcd are UTC")
    return dt.astimezone(UTC).isoformat()


def _parse_iso(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def _fits(puts: list[tuple[str, bytes]]) -> bool:
    try:
        _check_request(puts)
    except StoreRequestTooLarge:
        return False
    return True


def _sha256(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _read_manifest(key: str, value: bytes | None) -> dict[str, Any] | None:
    """The manifest a split blob's key holds, None for a plain value."""
    if value is None or not value.startswith(PARTS_MAGIC):
        return None
    try:
        manifest = json.loads(value[len(PARTS_MAGIC):])
        if not (isinstance(manifest, dict) and int(manifest["parts"]) > 0
                and int(manifest["bytes"]) >= 0 and str(manifest["digest"])):
            raise ValueError("not a manifest of parts")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreCorrupt(key, _short(exc)) from None
    return manifest


def _check_request(puts: list[tuple[str, bytes]], extra_ops: int = 0) -> None:
    if len(puts) + extra_ops > MAX_TXN_OPS:
        raise StoreRequestTooLarge(f"{len(puts) + extra_ops} operations in one transaction "
                                   f"(etcd allows {MAX_TXN_OPS})")
    size = sum(len(k) + len(v) for k, v in puts)
    if size > MAX_REQUEST_BYTES - 4096:  # room for the request's own framing
        raise StoreRequestTooLarge(f"a transaction of {size} bytes is over etcd's request "
                                   f"limit of {MAX_REQUEST_BYTES} bytes")


def _why(exc: BaseException | None) -> str:
    """A short reason for an error, without gRPC's multi-line debug string."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    if exc is None:
        return "no endpoint tried"
    return str(exc) or type(exc).__name__


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
