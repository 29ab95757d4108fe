"""A deadline on the whole HTTP exchange, headers and body, and a bound on the body's size.

requests' timeouts apply to each socket read: an answer trickled one byte (or one header
line) a second never times out. Here every call runs under a `Watchdog` deadline: the
connections the call takes from the pool are registered with it, and when the deadline
passes the watchdog shuts their sockets down, so a read blocked inside http.client or
urllib3 returns at once (with an error, or with an early end of a body without length).
The caller asks `Call.expired` before trusting what it got.

`read_body` streams the body in chunks, checks the deadline between chunks and refuses an
answer past `max_bytes` (announced by Content-Length, or counted as it arrives, after
decompression: a gzip bomb is counted at its real size).

`WatchedAdapter` is the requests transport adapter that registers connections; mount it
on a session (`watch_session`). One watchdog thread serves every call of a process.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

CHUNK = 65536


class BodyTooLarge(Exception):
    """The answer is larger than allowed; `size` is what was announced or read so far."""

    def __init__(self, size: int, limit: int, *, announced: bool) -> None:
        super().__init__(f"{size} bytes, over the bound of {limit}")
        self.size = size
        self.limit = limit
        self.announced = announced


class Expired(Exception):
    """The call's deadline passed while its body was being read."""


class Call:
    """One exchange under a deadline: the sockets it used, and whether it expired."""

    def __init__(self, deadline: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        """monotonic() after which the call's sockets are shut down."""
        self._monotonic = monotonic
        self.expired = False
        self.done = False
        self._sockets: list[Any] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.deadline - self._monotonic()

    def adopt(self, sock: Any) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        # Under the lock, so a call that just finished (its connection back in the pool,
        # perhaps taken by another call) is never touched.
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._sockets.clear()


def _shut(sock: Any) -> None:
    """Shut the socket down (not close: the reading thread still owns the descriptor), so
    a blocked recv returns; the connection is discarded by urllib3 afterwards."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        # socket.socket's own shutdown, also for an SSLSocket: its override would drop the
        # SSL object under the feet of the thread reading from it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """One thread that expires calls whose deadline passed.

    `monotonic` and `threaded=False` are for an in-process transport on a simulated clock
    (the fault simulation): no socket to shut, so no thread; `read_body` alone checks the
    deadline, on that clock, and a seed stays deterministic however loaded the machine."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, *,
                 threaded: bool = True) -> None:
        self._monotonic = monotonic
        self._threaded = threaded
        self._heap: list[tuple[float, int, Call]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="http-watchdog",
                                            daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def watch(self, seconds: float) -> Iterator[Call]:
        """Connections taken from a watched pool by this thread inside the block belong to
        the yielded call; their sockets are shut when `seconds` have passed."""
        call = Call(self._monotonic() + max(0.0, seconds), self._monotonic)
        if self._threaded:
            with self._cond:
                self._ensure_thread()
                heapq.heappush(self._heap, (call.deadline, next(self._order), call))
                self._cond.notify()
        previous = getattr(_current, "call", None)
        _current.call = call
        try:
            yield call
        finally:
            _current.call = previous
            call.finish()  # lazily dropped from the heap when its deadline comes up

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    now = self._monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, call = heapq.heappop(self._heap)
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            call.expire()


_current = threading.local()
WATCHDOG = Watchdog()


def _register(sock: Any) -> None:
    call: Call | None = getattr(_current, "call", None)
    if call is not None and sock is not None:
        call.adopt(sock)


# The socket is what is registered, not the connection: http.client drops the
# connection's reference to it (`sock = None`) as soon as the headers of a `Connection:
# close` answer are read, while the body is still read from it.


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _register(self.sock)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _register(self.sock)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)
        _register(getattr(connection, "sock", None))  # a kept-alive connection, reused
        return connection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)
        _register(getattr(connection, "sock", None))
        return connection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class WatchedAdapter(HTTPAdapter):
    """requests' adapter whose pools (direct or through an HTTP proxy) register each
    connection with the calling thread's watched call."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


def watch_session(session: requests.Session) -> requests.Session:
    adapter = WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def read_body(response: requests.Response, call: Call, max_bytes: int) -> bytes:
    """The whole body of a streamed answer, within the call's deadline and `max_bytes`;
    the response's `content` is set to it (so `.json()` and `.text` work as usual)."""
    try:
        announced = int(response.headers.get("Content-Length") or -1)
    except ValueError:
        announced = -1
    if announced > max_bytes:
        response.close()
        raise BodyTooLarge(announced, max_bytes, announced=True)
    # BytesIO, not a list joined at the end: getvalue() hands its buffer over without a
    # copy, so a page costs its size once, not twice.
    buffer = io.BytesIO()
    size = 0
    try:
        for chunk in response.iter_content(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(size, max_bytes, announced=False)
            buffer.write(chunk)
            if call.expired or call.remaining() <= 0:
                raise Expired()
    except BaseException:
        buffer.close()  # not held by the traceback while the caller retries
        response.close()
        raise
    if call.expired:
        raise Expired()
    body = buffer.getvalue()
    response._content = body
    response._content_consumed = True  # type: ignore[attr-defined]
    return body
