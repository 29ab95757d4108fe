"""Moves the wall clock of this Python process ahead when TEST_CLOCK_SHIFT_DAYS is set.

(Not a RECONCILER_* name on purpose: tests strip those from the environment of the
subprocesses they start, to give them a clean configuration.)

`make test-shifted` puts this folder first on PYTHONPATH, so every Python process of the
run (pytest, and every `reconciler` subprocess it starts, which inherit the environment)
imports it at start-up and travels `now + N days` with time-machine, ticking: the clock
keeps running from there, so processes started a few seconds apart still agree with each
other to within their start-up gap. A test that pins a calendar date, or that compares a
date it made with one a service made on the real clock, fails in that run.

What moves: time.time/time_ns, datetime.now/utcnow, date.today, time.gmtime/localtime/
strftime. What does not: time.monotonic/perf_counter (so every timeout, sleep and
Condition.wait keeps working), non-Python processes (etcd, git), and C libraries' own
clocks. That last one is why tests of etcd request timeouts carry the `real_clock` marker
and are deselected here: gRPC's Python layer turns a call's timeout into an absolute
deadline from time.time(), which the C core then compares with the real clock, a year off.

libfaketime is not used on purpose: it hangs Python 3.11's timed waits.
"""

from __future__ import annotations

import os
import sys


def _travel(days: float) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    # time_machine imports pytest when it can (for its fixture), which costs ~0.2 s in
    # every subprocess: hide it unless this process already is pytest.
    hide = "pytest" not in sys.modules
    if hide:
        sys.modules["pytest"] = None  # type: ignore[assignment]
    try:
        import time_machine
    except ImportError:
        # A Python without time-machine (another venv, a build isolation env): it keeps
        # the real clock. tests/timeshift/test_shift.py checks the project's venv has it.
        return
    finally:
        if hide:
            del sys.modules["pytest"]
    traveller = time_machine.travel(datetime.now(UTC) + timedelta(days=days), tick=True)
    traveller.start()
    # time-machine starts ticking at the first reading of the clock, not at start(): read
    # it now, or a process that first looks at the clock after a 3 s sleep is 3 s behind.
    time.time()
    sys.modules[__name__].traveller = traveller  # type: ignore[attr-defined]


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


SHIFT_ENV = "TEST_CLOCK_SHIFT_DAYS"
if os.environ.get(SHIFT_ENV):
    _travel(float(os.environ[SHIFT_ENV]))
_chain()
