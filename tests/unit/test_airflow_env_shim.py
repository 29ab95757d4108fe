"""No Airflow log server on every interface (issue 16): `airflow standalone` starts its
components as `airflow <name>` from PATH, and scripts/airflow_env.py puts an `airflow`
first on that PATH which adds `--skip-serve-logs` to the scheduler and the triggerer (the
two that would start `airflow serve-logs` on 0.0.0.0 and [::]) and passes everything else
through unchanged. The playground, the e2e fixture and the benchmarks all start Airflow
through it; tests/e2e/test_playground.py checks the real sockets."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def airflow_env() -> ModuleType:
    spec = importlib.util.spec_from_file_location("airflow_env_under_test",
                                                  REPO / "scripts" / "airflow_env.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def proc(airflow_env: ModuleType, tmp_path: Path) -> object:
    # a venv whose `airflow` prints the arguments it was given, one per line
    venv = tmp_path / "venv with space"
    (venv / "bin").mkdir(parents=True)
    real = venv / "bin" / "airflow"
    real.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    real.chmod(0o755)
    process = airflow_env.AirflowProcess(home=tmp_path / "home", port=1, venv=venv,
                                         dags_folder=tmp_path / "dags",
                                         log_path=tmp_path / "log")
    process.write_shim()
    return process


def run_as_standalone_does(proc: object, *args: str) -> list[str]:
    """`airflow ARGS` resolved on the PATH standalone's children get, as Popen does."""
    env = proc.env()  # type: ignore[attr-defined]
    answer = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True,
                            check=True)
    return answer.stdout.splitlines()


@pytest.mark.parametrize("component", ["scheduler", "triggerer"])
def test_the_components_with_a_log_server_get_skip_serve_logs(proc: object,
                                                              component: str) -> None:
    assert run_as_standalone_does(proc, component) == [component, "--skip-serve-logs"]
    assert run_as_standalone_does(proc, component, "--pid", "x y") == [
        component, "--pid", "x y", "--skip-serve-logs"]


@pytest.mark.parametrize("args", [["api-server"], ["dag-processor"], ["standalone"],
                                  ["dags", "list", "-o", "json"], []])
def test_everything_else_passes_through_unchanged(proc: object, args: list[str]) -> None:
    assert run_as_standalone_does(proc, *args) == args


def test_the_shim_comes_first_on_the_path(proc: object) -> None:
    path = proc.env()["PATH"].split(os.pathsep)  # type: ignore[attr-defined]
    shim = proc.shim  # type: ignore[attr-defined]
    assert path[0] == str(shim.parent)
    assert path[1] == str(proc.venv / "bin")  # type: ignore[attr-defined]
    assert os.access(shim, os.X_OK)
