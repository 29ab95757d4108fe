"""The playground's port check (scripts/playground.py, issue 16): a port left with
connections in TIME_WAIT by a playground stopped a moment ago is free, as it is for the
servers that bind it (SO_REUSEADDR), so a restart right after Ctrl-C keeps etcd on 2379;
a port some socket really holds is taken, and the playground says which port it uses
instead."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def playground() -> ModuleType:
    path = REPO / "scripts" / "playground.py"
    spec = importlib.util.spec_from_file_location("playground_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_wait_on_a_port() -> int:
    """A loopback port with no socket bound to it, but a connection of it in TIME_WAIT:
    what a server that closed its connections first (etcd, on Ctrl-C) leaves behind. The
    server sets SO_REUSEADDR as etcd (Go), uvicorn and Python's HTTP servers do: the
    TIME_WAIT entries keep that flag, and a new bind with the flag may share the port."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: it is the one in TIME_WAIT
        client.recv(1)  # the FIN arrived
        client.close()
    return port


def _in_time_wait(port: int) -> bool:
    # /proc/net/tcp: local address as hex ip:port, state 06 is TIME_WAIT
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                return True
    return False


@pytest.fixture
def time_wait_port() -> int:
    port = _time_wait_on_a_port()
    assert _in_time_wait(port), "the set-up should leave a connection in TIME_WAIT"
    return port


def test_a_port_with_connections_in_time_wait_is_free(playground: ModuleType,
                                                      time_wait_port: int,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert playground.port_or_free(time_wait_port) == time_wait_port
    assert playground.port_or_free(time_wait_port, "etcd") == time_wait_port
    assert playground.port_free(time_wait_port)
    assert capsys.readouterr().out == ""  # nothing to say: the usual port is kept
    # and a server really can listen on it now, as etcd does (Go sets SO_REUSEADDR)
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", time_wait_port))
        server.listen()


def test_a_port_a_server_listens_on_is_taken_and_the_playground_says_so(
        playground: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = int(other.getsockname()[1])
        assert not playground.port_free(taken)
        chosen = playground.port_or_free(taken, "etcd")
    assert chosen != taken
    out = capsys.readouterr().out
    assert out == (f"port {taken} for etcd is taken (another playground, or another program "
                   f"listens on it): using 127.0.0.1:{chosen} instead\n")


def test_a_port_bound_on_every_interface_is_taken(playground: ModuleType) -> None:
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        assert not playground.port_free(int(other.getsockname()[1]))
