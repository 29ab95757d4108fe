"""The fault helpers of tests/fixtures/etcd.py on real etcd processes: a lone server
killed -9 and restarted keeps its data and port; a 3-member cluster names its leader, elects
a new one when the leader is killed or paused, and takes a restarted member back."""

from __future__ import annotations

import os
import time

from tests.fixtures.etcd import EtcdCluster, EtcdServer


def test_a_killed_server_restarts_on_the_same_port_with_its_data(
        etcd_killable: EtcdServer) -> None:
    etcd_killable.etcdctl("put", "/k", "v1")
    pid, endpoint = etcd_killable.pid, etcd_killable.endpoint
    assert pid is not None
    etcd_killable.kill()
    assert not etcd_killable.running()
    assert etcd_killable.status(timeout=0.5) is None
    etcd_killable.restart()
    assert etcd_killable.pid != pid
    assert etcd_killable.endpoint == endpoint
    assert etcd_killable.etcdctl("get", "--print-value-only", "/k").stdout.strip() == "v1"


def test_a_paused_server_answers_nothing_until_resumed(etcd_killable: EtcdServer) -> None:
    etcd_killable.pause()
    assert etcd_killable.status(timeout=0.5) is None
    assert etcd_killable.running()
    etcd_killable.resume()
    etcd_killable.wait_healthy(10)
    # stop() after pause() must not hang on a stopped process
    etcd_killable.pause()
    etcd_killable.stop()
    assert not etcd_killable.running()


def test_the_cluster_elects_a_new_leader_when_the_leader_dies(
        etcd_cluster: EtcdCluster) -> None:
    assert len({m.member_id for m in etcd_cluster.members}) == 3
    assert len({m.pid for m in etcd_cluster.members}) == 3
    assert all(os.getpgid(m.pid) == m.pid for m in etcd_cluster.members if m.pid)
    etcd_cluster.etcdctl("put", "/k", "before")
    old = etcd_cluster.kill_leader()
    assert not old.running()
    new = etcd_cluster.leader(timeout=20, exclude=old)
    assert new is not old
    assert new in etcd_cluster.members
    etcd_cluster.etcdctl("put", "/k", "after")  # a quorum of two still writes
    etcd_cluster.restart(old)
    assert etcd_cluster.leader(timeout=20) in etcd_cluster.members
    out = old.etcdctl("get", "--consistency=l", "--print-value-only", "/k")
    assert out.stdout.strip() == "after"  # it caught up


def test_a_paused_leader_is_replaced(etcd_cluster: EtcdCluster) -> None:
    old = etcd_cluster.leader()
    etcd_cluster.pause(old)
    new = etcd_cluster.leader(timeout=20, exclude=old)
    assert new is not old
    etcd_cluster.resume(old)
    old.wait_healthy(20)
    # It rejoins and agrees on who leads (usually `new`; a resumed member may call one
    # more election, so compare with whoever leads now).
    deadline = time.monotonic() + 20
    while True:
        status = old.status()
        if status is not None and str(status["leader"]) == etcd_cluster.leader().member_id:
            break
        assert time.monotonic() < deadline, etcd_cluster.describe()
        time.sleep(0.05)
