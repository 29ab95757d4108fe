"""The fault-injecting proxy itself (tests/fixtures/proxy.py), in front of a tiny HTTP
server that counts the requests it handled: each mode does what the fault tests rely on."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.fixtures.proxy import FaultProxy, is_clear, is_post, is_trigger


class Counting(ThreadingHTTPServer):
    handled = 0


@pytest.fixture
def upstream() -> Iterator[Counting]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *_args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            self.server.handled += 1  # type: ignore[attr-defined]
            data = b"ok:" + self.path.encode() + b":" + body
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

    server = Counting(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream: Counting) -> Iterator[FaultProxy]:
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
        yield p


def call(proxy: FaultProxy, method: str = "GET", path: str = "/x", timeout: float = 5.0
         ) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request(method, path, body=b"b" if method == "POST" else None)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_pass_through(proxy: FaultProxy, upstream: Counting) -> None:
    assert call(proxy, "POST", "/a") == b"ok:/a:b"
    assert call(proxy) == b"ok:/x:"
    assert upstream.handled == 2
    assert sum(proxy.faults.values()) == 0


def test_delay_only_matching_answers(proxy: FaultProxy) -> None:
    proxy.delay(0.6, match=is_post)
    started = time.monotonic()
    call(proxy, "GET")
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    assert call(proxy, "POST", "/p") == b"ok:/p:b"
    assert time.monotonic() - started >= 0.6
    assert proxy.faults["delay"] == 1


def test_drop_answers_the_request_takes_effect_the_answer_is_lost(
        proxy: FaultProxy, upstream: Counting) -> None:
    proxy.drop_answers(match=is_clear, count=1)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call(proxy, "POST", "/api/v2/dags/d/dagRuns/r/clear")
    assert upstream.handled == 1  # it was handled
    assert proxy.remaining() == 0
    assert call(proxy, "POST", "/api/v2/dags/d/dagRuns/r/clear").startswith(b"ok:")
    assert upstream.handled == 2
    assert proxy.faults["drop"] == 1


def test_refuse_closes_the_port_and_pass_through_reopens_it(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    proxy.pass_through()
    assert proxy.port == port
    assert call(proxy) == b"ok:/x:"


def test_blackhole_answers_nothing_then_recovers(proxy: FaultProxy,
                                                upstream: Counting) -> None:
    # A connection opened before the black hole goes silent too.
    before = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    before.sendall(b"GET /early HTTP/1.0\r\n")  # the head so far: connected upstream
    deadline = time.monotonic() + 5
    while proxy.forwarding() == 0:  # the proxy has opened its upstream side
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proxy.blackhole()
    before.sendall(b"\r\n")
    before.settimeout(0.5)
    with pytest.raises(TimeoutError):
        before.recv(100)
    with pytest.raises(TimeoutError):
        call(proxy, timeout=0.5)
    assert upstream.handled == 0
    proxy.pass_through()
    assert call(proxy) == b"ok:/x:"
    before.close()


def test_request_matchers() -> None:
    trigger = b"POST /api/v2/dags/06_pipeline/dagRuns HTTP/1.1\r\nHost: x\r\n"
    clear = b"POST /api/v2/dags/06_pipeline/dagRuns/reconciler__2026/clear HTTP/1.1\r\n"
    listing = b"POST /api/v2/dags/~/dagRuns/list HTTP/1.1\r\n"
    get = b"GET /api/v2/dags/~/dagRuns?limit=5 HTTP/1.1\r\n"
    assert is_trigger(trigger)
    assert not is_trigger(clear)
    assert not is_trigger(listing)
    assert not is_trigger(get)
    assert is_clear(clear)
    assert not is_clear(trigger)
    assert is_post(listing)
    assert not is_post(get)
