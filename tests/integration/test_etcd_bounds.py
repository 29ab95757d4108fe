"""Every etcd call the loop makes outside a pass is bounded as a whole, against a real etcd
that stops answering (SIGSTOP: the connection stays open, nothing comes back): the lease
keep-alive, a campaign, a watch's creation, and a resign on the way out each give up within
a few of the store's timeouts (`EtcdSettings.timeout`, tried once per endpoint and once
more), so neither the keep-alive thread nor a shutdown can hang on etcd."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from reconciler.adapters.store import EtcdStore, StoreUnavailable
from tests.fixtures.etcd import EtcdServer

TIMEOUT = 1.0
BOUND = 4 * TIMEOUT + 6  # two tries of one endpoint, plus a loaded CI's slack


def ends(call: Callable[[], Any], within: float = BOUND) -> BaseException | Any:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"the etcd call was still running after {within} s"
    return out[0]


@pytest.mark.real_clock  # only an etcd request timeout ends these: gRPC's is wall-clock
@pytest.mark.parametrize("call", ["refresh", "campaign", "watch", "resign", "leader"])
def test_a_call_to_a_silent_etcd_ends_within_its_bound(etcd_killable: EtcdServer,
                                                        call: str) -> None:
    store = EtcdStore(replace(etcd_killable.settings(), timeout=TIMEOUT))
    lease = store.campaign("a", 30)
    assert lease is not None
    store.leader()  # connected before the pause
    calls: dict[str, Callable[[], Any]] = {
        "refresh": lambda: store.refresh(lease),
        "campaign": lambda: store.campaign("b", 30),
        "watch": lambda: store.watch([store.head_key()], threading.Event()),
        "resign": lambda: store.resign(lease),
        "leader": store.leader,
    }
    etcd_killable.pause()
    try:
        error = ends(calls[call])
        assert isinstance(error, StoreUnavailable), error
    finally:
        etcd_killable.resume()
        store.close()
