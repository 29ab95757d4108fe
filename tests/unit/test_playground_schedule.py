"""The playground's root schedule (scripts/playground.py): every minute on Airflow 3; every
5 minutes on Airflow 2, whose standalone runs one task at a time, so that cycles do not
pile up; EXAMPLE_ROOT_SCHEDULE chooses another. The e2e test runs the playground itself."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers import REPO


def playground() -> ModuleType:
    path = REPO / "scripts" / "playground.py"
    spec = importlib.util.spec_from_file_location("playground_script", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("playground_script", module)
    spec.loader.exec_module(module)
    return module


def test_the_root_runs_every_minute_on_airflow_3_and_every_5_minutes_on_airflow_2() -> None:
    module = playground()
    assert module.default_root_schedule(3) == "* * * * *"
    assert module.default_root_schedule(2) == "*/5 * * * *"
