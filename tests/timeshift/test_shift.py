"""The shifted clock of `make test-shifted` (sitecustomize.py here): it moves the wall
clock of every Python process it starts by the same amount, keeps it ticking, and leaves
the monotonic clock and timed waits alone. Runs in both runs: unshifted, it starts shifted
children itself; shifted, it also checks its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
DAY = 86400.0

PROBE = """
import json, sys, threading, time, datetime
time.sleep(float(sys.argv[1]))  # the clock must have ticked meanwhile
started = time.monotonic()
threading.Event().wait(0.2)  # a timed wait (libfaketime hangs these)
print(json.dumps({"time": time.time(), "now": datetime.datetime.now(datetime.UTC).timestamp(),
                  "monotonic": time.monotonic(), "waited": time.monotonic() - started,
                  "shifted": hasattr(sys.modules.get("sitecustomize"), "traveller")}))
"""


def probe(shift: str | None, sleep: float = 0.0) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "TEST_CLOCK_SHIFT_DAYS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(":")
    if shift is not None:
        env["TEST_CLOCK_SHIFT_DAYS"] = shift
    out = subprocess.run([sys.executable, "-c", PROBE, str(sleep)], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stderr == "", out.stderr
    data: dict[str, float] = json.loads(out.stdout)
    return data


def test_a_shifted_process_is_a_year_ahead_and_keeps_ticking() -> None:
    real = probe(None)
    shifted = probe("365", sleep=1.0)
    assert not real["shifted"]
    assert shifted["shifted"]
    # 365 days ahead, plus the second it slept and the start-up gap (ticking, not frozen)
    ahead = shifted["time"] - real["time"]
    assert 365 * DAY + 0.9 < ahead < 365 * DAY + 30
    assert abs(shifted["now"] - shifted["time"]) < 1
    # monotonic is the machine's, in every process, shifted or not
    assert abs(shifted["monotonic"] - real["monotonic"]) < 30
    assert 0.19 < shifted["waited"] < 5


def test_this_process_matches_the_environment() -> None:
    shift = os.environ.get("TEST_CLOCK_SHIFT_DAYS")
    real = probe(None)["time"]
    ahead = time.time() - real
    if shift:
        assert abs(ahead - float(shift) * DAY) < 30
        assert datetime.now(UTC).year >= datetime.fromtimestamp(real, UTC).year
    else:
        assert abs(ahead) < 30
    # whatever the wall clock says, timeouts measured on the monotonic clock hold
    started = time.monotonic()
    assert not threading.Event().wait(0.2)
    assert 0.19 < time.monotonic() - started < 5
