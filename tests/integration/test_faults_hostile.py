"""Processes against a hostile Airflow (tests/fixtures/hostile.py): the one-shot commands
end with one line and exit 2 however the answer trickles in or pages repeat (on Airflow 3's
API and, in a few cases, on Airflow 2's); a `reconciler
run` leader stuck in a pass gives its lease to a standby and says it is not ready; SIGTERM
releases the leader key at once and ends the process within its stated bound
(`reconciler.cli.loop_cmds.STOP_GRACE`), whatever a call is doing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.loop_cmds import STOP_GRACE
from tests.fakes.fake_airflow import FakeAirflow
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.hostile import HostileAirflow, repeat_page, trickle_body, trickle_headers
from tests.fixtures.replicas import Deployment, Replica, poll_until
from tests.helpers import EXAMPLE_DAGS

ONE_SHOT_BOUND = 30.0
"""The one-shot commands give each call 8 s (ONE_SHOT_DEADLINE); the old ones ran on past
90 s. Past this the command counts as hung."""


@pytest.fixture
def deployment(tmp_path: Path, etcd_server: EtcdServer, hostile: HostileAirflow,
               deployments: list[Deployment]) -> Deployment:
    made = Deployment.create(tmp_path, etcd_server.endpoints, hostile.url)
    deployments.append(made)
    return made


def one_shot(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    env = deployment.env(RECONCILER_AIRFLOW_URL=deployment.airflow_url,
                         RECONCILER_AIRFLOW_USERNAME="admin")
    try:
        return subprocess.run([sys.executable, "-m", "reconciler", *args], env=env,
                              capture_output=True, text=True, timeout=ONE_SHOT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`reconciler {' '.join(args)}` still running after {ONE_SHOT_BOUND} s")


ONE_SHOT_CASES = {
    "plan-body": (("plan",), trickle_body(1.0), "no whole answer within 8 s"),
    "plan-headers": (("plan",), trickle_headers(1.0), "no whole answer within 8 s"),
    "plan-1e9": (("plan",), repeat_page(), "claims 1,000,000,000 entries"),
    "plan-repeat": (("plan",), repeat_page(total=50), "does not advance"),
    "status-body": (("status", "--live"), trickle_body(1.0), "no whole answer within 8 s"),
    "status-headers": (("status", "--live"), trickle_headers(1.0),
                       "no whole answer within 8 s"),
    "doctor-body": (("doctor",), trickle_body(1.0), "no whole answer within 8 s"),
    "doctor-repeat": (("doctor",), repeat_page(total=50), "does not advance"),
}
ON_AIRFLOW_2 = ["plan-body", "plan-1e9", "plan-repeat", "status-headers", "doctor-repeat"]
"""The cases also run against a stub that says it is Airflow 2.11 (the CLI then speaks
API v1): each kind of hostility, each command, in a few cases rather than all."""


@pytest.mark.parametrize(("generation", "case"),
                         [("v2", c) for c in ONE_SHOT_CASES] + [("v1", c) for c in ON_AIRFLOW_2],
                         ids=[*ONE_SHOT_CASES, *(f"v1-{c}" for c in ON_AIRFLOW_2)])
def test_a_one_shot_command_ends_with_one_line_whatever_airflow_does(
        deployment: Deployment, hostile: HostileAirflow, generation: str,
        case: str) -> None:
    command, behaviour, says = ONE_SHOT_CASES[case]
    hostile.generation = generation
    hostile.behave(behaviour)
    out = one_shot(deployment, *command)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    assert says in lines[0]
    assert "Traceback" not in out.stderr
    assert hostile.count(b"/dagRuns") <= 4  # never a listing that runs on and on
    # The API the stub's version names, and only that one.
    if generation == "v1":
        assert hostile.count(b"/api/v1/dags") >= 1
        assert hostile.count(b"/api/v2/dags") == 0
    else:
        assert hostile.count(b"/api/v1/") == 0


def readyz(replica: Replica) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.http_port}/readyz",
                                    timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_a_leader_stuck_in_a_pass_gives_its_lease_to_a_standby(
        deployment: Deployment, hostile: HostileAirflow) -> None:
    hostile.behave(trickle_body(1.0))
    # The stuck replica's calls each take 30 s (the loop's call deadline); its passes
    # would never end in time. The pass deadline (4 s) makes it let go.
    stuck = deployment.start(lease_ttl=2, extra=["--pass-deadline", "4"])
    assert deployment.leader(timeout=30) is stuck
    with FakeAirflow(EXAMPLE_DAGS) as fake:
        standby = deployment.start(lease_ttl=2, airflow_url=fake.url)
        took_over = poll_until(lambda: deployment.leader_now() is standby, 30,
                               what="the standby takes the lease", alive=[stuck, standby])
        assert took_over
        _, text = poll_until(lambda: (s := readyz(stuck))[0] == 503 and s, 10,
                             what="the stuck replica unready", alive=[stuck])
        assert "a pass has been running for" in text
        # The healthy replica leads on: it passes (its own Airflow answers).
        poll_until(lambda: "reconciler_passes_total" in (standby.metrics() or "")
                   and _passes(standby) >= 3, 30, what="the new leader's passes",
                   alive=[standby])
        assert deployment.leader_now() is standby
        assert [line for line in stuck.lines() if line.get("message") == "lost leadership"]
    assert deployment.stop_all() == {stuck.name: 0, standby.name: 0}
    assert stuck.tracebacks() == 0


def _passes(replica: Replica) -> float:
    for line in (replica.metrics() or "").splitlines():
        if line.startswith("reconciler_passes_total "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("behaviour", [trickle_body(1.0), trickle_headers(1.0)],
                         ids=["body-trickled", "headers-trickled"])
def test_sigterm_releases_the_lease_at_once_and_ends_the_process_in_its_bound(
        deployment: Deployment, hostile: HostileAirflow, behaviour: Any) -> None:
    hostile.behave(behaviour)
    leader = deployment.start(lease_ttl=10)
    assert deployment.leader(timeout=30) is leader
    poll_until(lambda: hostile.count(b"/dagRuns") >= 1, 30, what="a listing under way",
               alive=[leader])
    time.sleep(1.0)  # well inside the trickled call (30 s)
    assert leader.process is not None
    os.killpg(leader.pid, signal.SIGTERM)
    # The key goes at once (resigned), not when the 10 s lease lapses.
    poll_until(lambda: deployment.holder() is None, 3, what="the leader key released")
    try:
        code = leader.process.wait(STOP_GRACE + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_GRACE + 5} s after SIGTERM:\n{leader.tail()}")
    assert code == 0, leader.tail()
    messages = [line.get("message") for line in leader.lines()]
    assert "leadership released" in messages
    assert leader.tracebacks() == 0
