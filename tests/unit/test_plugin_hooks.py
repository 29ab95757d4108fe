"""The listener plugin's hooks against the hook specs of each Airflow generation, without
Airflow: pluggy (the library Airflow's listener manager is) registers the plugin's listener
against each version's spec, as `ListenerManager.add_listener` does, and calls each hook the
way Airflow does (keyword arguments, all of the spec's). The specs below are copied from
airflow/listeners/spec/ of each version; the real 2.11.2 and 3.3.2 load the plugin in
tests/e2e.

And Airflow 2's task processes: a forked child that ends with os._exit() (what 2.x's
StandardTaskRunner does) skips atexit, so a task hook must wait for its own event."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pluggy
import pytest

from reconciler.plugin import reconciler_events as ev

TI = ["on_task_instance_running", "on_task_instance_success", "on_task_instance_failed"]
SPECS: dict[str, dict[str, list[str]]] = {
    # 2.3, 2.4: task instance hooks only, each with `session`
    "2.4": {name: ["previous_state", "task_instance", "session"] for name in TI},
    # 2.5-2.9: the dag-run hooks come
    "2.9": {**{name: ["previous_state", "task_instance", "session"] for name in TI},
            **{f"on_dag_run_{s}": ["dag_run", "msg"] for s in ("running", "success",
                                                                "failed")}},
    # 2.10, 2.11: on_task_instance_failed gets `error`
    "2.11": {"on_task_instance_running": ["previous_state", "task_instance", "session"],
             "on_task_instance_success": ["previous_state", "task_instance", "session"],
             "on_task_instance_failed": ["previous_state", "task_instance", "error",
                                         "session"],
             **{f"on_dag_run_{s}": ["dag_run", "msg"] for s in ("running", "success",
                                                                 "failed")}},
    # 3.x: no session; skipped is new
    "3.3": {"on_task_instance_running": ["previous_state", "task_instance"],
            "on_task_instance_success": ["previous_state", "task_instance"],
            "on_task_instance_failed": ["previous_state", "task_instance", "error"],
            "on_task_instance_skipped": ["previous_state", "task_instance"],
            **{f"on_dag_run_{s}": ["dag_run", "msg"] for s in ("running", "success",
                                                                "failed")}},
}


def spec_module(hooks: dict[str, list[str]]) -> type:
    """A class of hook specs with exactly these argument names (what pluggy reads)."""
    mark = pluggy.HookspecMarker("airflow")
    namespace: dict[str, Any] = {}
    for name, args in hooks.items():
        source = f"def {name}({', '.join(args)}):\n    pass\n"
        exec(source, namespace)  # a signature built from the table above
        namespace[name] = mark(namespace[name])
    return type("Spec", (), {n: staticmethod(namespace[n]) for n in hooks})


class TaskInstance:  # as the hooks read it
    dag_id, run_id, task_id, map_index, try_number = "02_pipeline", "r1", "load", -1, 1


class Run:
    dag_id, run_id = "02_pipeline", "r1"


@pytest.fixture
def marked() -> Any:
    """The plugin's listener with its hooks marked as Airflow's `hookimpl` marks them."""
    mark = pluggy.HookimplMarker("airflow")
    hooks = {name: mark(getattr(ev.Listener, name)) for name in dir(ev.Listener)
             if name.startswith("on_")}
    return type("Marked", (ev.Listener,), hooks)()


@pytest.mark.parametrize("version", sorted(SPECS))
def test_the_listener_registers_and_is_called_on_every_generation(
        version: str, marked: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    emitted: list[tuple[str, str]] = []
    monkeypatch.setattr(ev, "_emit", lambda make, **_: emitted.append(
        (make()["kind"], make()["state"])))
    manager = pluggy.PluginManager("airflow")
    manager.add_hookspecs(spec_module(SPECS[version]))
    manager.register(marked)  # pluggy refuses an argument the spec lacks
    values = {"previous_state": "running", "task_instance": TaskInstance(), "session": None,
              "error": RuntimeError("x"), "dag_run": Run(), "msg": ""}
    for name, args in SPECS[version].items():
        getattr(manager.hook, name)(**{a: values[a] for a in args})
    expected = [("task", "success"), ("task", "failed")]
    if "on_dag_run_success" in SPECS[version]:
        expected += [("run", "success"), ("run", "failed")]
    if "on_task_instance_skipped" in SPECS[version]:
        expected.append(("task", "skipped"))
    assert sorted(emitted) == sorted(expected)


class SlowGateway:
    """etcd that takes a moment to answer, writing what it got to a file (across a fork)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def get(self, key: str) -> bytes | None:
        if key.endswith("desired/head"):
            return json.dumps({"commit": "c"}).encode()
        import gzip

        return gzip.compress(json.dumps({"pipelines": {"02_pipeline": {}}}).encode())

    def grant(self, ttl: int) -> str:
        return "1"

    def put(self, key: str, value: bytes, lease: str | None = None) -> None:
        time.sleep(0.3)
        with open(self.out, "ab") as fh:
            fh.write(key.encode() + b"\n")


def test_on_airflow_2_a_task_hook_sends_before_the_task_process_exits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "puts"
    config = ev.Config(endpoints=("http://127.0.0.1:1",), root="/r/d/", flush_timeout=5.0)
    monkeypatch.setattr(ev, "_sender", ev.Sender(config, SlowGateway(out)))  # type: ignore[arg-type]
    monkeypatch.setattr(ev, "FLUSH_IN_TASK_HOOKS", True)  # what Airflow 2 sets
    pid = os.fork()
    if pid == 0:  # the task process of Airflow 2's StandardTaskRunner
        ev.listener.on_task_instance_success(None, TaskInstance())
        os._exit(0)  # as 2.x ends it: no atexit, so no flush there
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text() == "/r/d/events/02_pipeline/r1\n"
