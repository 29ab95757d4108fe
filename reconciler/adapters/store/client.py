"""The connection to etcd: endpoints, TLS, authentication, failover, bounded calls, and
the generic reads and writes (get, range, scan, put, guarded and fenced transactions)
that each key family's module builds on.

The client is python3-etcd3, a maintained drop-in of the `etcd3` API (PyPI's etcd3 0.12
cannot be imported with protobuf >= 4). Every call has a deadline (EtcdSettings.timeout);
a failed endpoint is marked and the call is retried on the next one in the order given,
so a one-shot command gives up after at most one timeout per endpoint. Errors are typed by
what the caller does next: StoreUnavailable (retry later / exit 2), StoreAccessDenied
(fix the credentials), StoreConflict (re-read and re-decide). No message contains the
password.
"""

from __future__ import annotations

import os
import re
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self, TypeVar

# gRPC's C core logs TLS handshake and connection failures on stderr by itself; the store
# reports them as one error instead. Set before grpc is imported; the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import etcd3
import etcd3.exceptions
import etcd3.watch
import grpc
from etcd3 import etcdrpc

from reconciler.adapters.store.codec import PART_BYTES, Versioned, _check_request, _dumps
from reconciler.adapters.store.errors import (
    StoreAccessDenied,
    StoreError,
    StoreRequestTooLarge,
    StoreUnavailable,
)
from reconciler.core.settings import EtcdSettings

T = TypeVar("T")

if not hasattr(etcd3.watch, "six"):
    # python3-etcd3 0.13's watcher still calls six.itervalues when a stream ends, without
    # importing six; without this the watch thread dies with a NameError on reconnect.
    etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(list(d.values())))

# Range reads of ledger/ and observed/ can exceed gRPC's 4 MiB default for large graphs.
_MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# What an etcd member answers when the cluster cannot finish a request for now.
_TLS_FAILED = re.compile(r"Tls handshake failed|SSL_ERROR_SSL|CERTIFICATE_VERIFY_FAILED")
_CLIENT_CERT_REFUSED = re.compile(r"ALERT_BAD_CERTIFICATE|ALERT_CERTIFICATE_REQUIRED|"
                                  r"ALERT_UNKNOWN_CA|ALERT_HANDSHAKE_FAILURE|"
                                  r"ALERT_UNSUPPORTED_CERTIFICATE|ALERT_CERTIFICATE_UNKNOWN")
_NAME_MISMATCH = re.compile(r"Peer name .* is not in peer certificate|hostname mismatch",
                            re.IGNORECASE)
_SERVER_BUSY = re.compile(r"context deadline exceeded|request timed out|leader changed|"
                          r"no leader", re.IGNORECASE)
# Keys a range read of ledger/ or observed/ asks for at once (scan_prefix).
SCAN_CHUNK = 5000


def parse_endpoint(text: str) -> tuple[str, int, bool]:
    """'host:port', 'http://host:port' or 'https://host:port' -> (host, port, tls)."""
    text = text.strip().rstrip("/")
    tls = text.startswith("https://")
    text = text.removeprefix("http://").removeprefix("https://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {text!r} is not host:port")
    return host.strip("[]"), int(port), tls



class EtcdClient:
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
        raise self._unreachable("authenticate", last)

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

    def __enter__(self) -> Self:
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
        raise self._unreachable(what, last)

    def _unreachable(self, what: str, last: BaseException | None) -> StoreError:
        """The error for a call no endpoint answered: a TLS handshake that failed says so
        and names the settings to set (StoreAccessDenied: no retry fixes it); anything else
        is StoreUnavailable, with a hint when the cause looks like TLS on one side only."""
        why = _why(last)
        message = f"etcd at {self._describe()} is unreachable during {what} ({why})"
        self.last_failure = (time.monotonic(), message)
        denied = self._tls_refusal(why)
        if denied is not None:
            self.last_failure = (time.monotonic(), denied)
            return StoreAccessDenied(denied)
        hint = self._tls_hint(why)
        return StoreUnavailable(message + (f"; {hint}" if hint else ""))

    def _tls_refusal(self, why: str) -> str | None:
        """What to set when the TLS handshake failed for a reason of configuration."""
        s, where = self.settings, f"etcd at {self._describe()}"
        if not _TLS_FAILED.search(why):
            return None
        if "CERTIFICATE_VERIFY_FAILED" in why:
            if s.ca:
                return (f"{where}: TLS handshake failed: its certificate is not signed by the "
                        f"CA in RECONCILER_ETCD_CA ({s.ca}); set RECONCILER_ETCD_CA "
                        "(--etcd-ca) to the CA that signed it")
            return (f"{where}: TLS handshake failed: its certificate is not trusted (no CA "
                    "given, the system's roots do not know it); set RECONCILER_ETCD_CA "
                    "(--etcd-ca) to the CA file that signed it")
        if _CLIENT_CERT_REFUSED.search(why):
            if not s.cert:
                return (f"{where}: TLS handshake failed: etcd requires a client certificate; "
                        "set RECONCILER_ETCD_CERT and RECONCILER_ETCD_KEY (--etcd-cert, "
                        "--etcd-key) to one signed by the CA etcd trusts")
            return (f"{where}: TLS handshake failed: etcd refused the client certificate in "
                    f"RECONCILER_ETCD_CERT ({s.cert}); set RECONCILER_ETCD_CERT and "
                    "RECONCILER_ETCD_KEY to one signed by the CA etcd trusts "
                    "(its --trusted-ca-file)")
        if _NAME_MISMATCH.search(why):
            return (f"{where}: TLS handshake failed: its certificate does not name the host "
                    "of the endpoint; use a name the certificate lists in "
                    "RECONCILER_ETCD_ENDPOINTS")
        return (f"{where}: TLS handshake failed ({why}); check RECONCILER_ETCD_CA, "
                "RECONCILER_ETCD_CERT and RECONCILER_ETCD_KEY")

    def _tls_hint(self, why: str) -> str | None:
        """A connection closed at once is what a TLS-only etcd does to a plaintext client,
        and a reset handshake what a plaintext etcd does to a TLS one: say which to check."""
        s = self.settings
        tls = bool(s.ca or s.cert or any(t for _, _, t in self._endpoints))
        if not tls and "Socket closed" in why:
            return ("if etcd serves TLS, set RECONCILER_ETCD_CA (--etcd-ca) and, if it asks "
                    "for one, RECONCILER_ETCD_CERT and RECONCILER_ETCD_KEY")
        if tls and "Handshake read failed" in why:
            return ("TLS is configured (RECONCILER_ETCD_CA/CERT/KEY or an https:// "
                    "endpoint): does this etcd serve TLS?")
        return None

    def _count_write(self) -> None:
        with self._writes_lock:
            self.writes += 1

    def revision(self) -> int:
        """The cluster's current revision: it moves on every write, to any key."""
        head = self.key("desired", "head")
        response = self._call("get revision", lambda c: c.get_response(head, count_only=True))
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


    def leader_key(self) -> str:
        return self.key("leader")


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


def _why(exc: BaseException | None) -> str:
    """A short reason for an error, without gRPC's multi-line debug string."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    if exc is None:
        return "no endpoint tried"
    return str(exc) or type(exc).__name__

