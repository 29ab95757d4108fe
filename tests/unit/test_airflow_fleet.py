"""AirflowFleet without HTTP (stub clients): routing by pipeline name, answers under the
name, runs of a moved pipeline routed back where they were seen, readiness only when
every deployment fails, and credentials read from where a declaration says, never shown."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.airflow_fleet import AirflowFleet, DeploymentUnusable, settings_for
from reconciler.core.graph import Deployment, Graph, Pipeline
from reconciler.core.settings import AirflowSettings

AF2 = Deployment("af2", "http://af2.example", api="v1", default=True,
                 auth={"kind": "password", "username": "u", "password_env": "AF2_PW"})
AF3 = Deployment("af3", "http://af3.example", api="v2",
                 auth={"kind": "token", "token_file": "/run/secrets/af3"})


class Stub:
    """One deployment's client: records calls, answers runs of the dag_ids asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, str]] = []
        self.request_count = 0
        self.last_contact: float | None = None
        self.last_failure: tuple[float, str] | None = None

    def trigger(self, dag_id: str, run_id: str, logical_date: datetime,
                conf: Any) -> tuple[dict[str, Any], bool]:
        self.calls.append(("trigger", dag_id, run_id))
        return {"dag_id": dag_id, "dag_run_id": run_id}, True

    def clear(self, dag_id: str, run_id: str, *, cleared_end: Any = None
              ) -> tuple[dict[str, Any], bool]:
        self.calls.append(("clear", dag_id, run_id))
        return {"dag_id": dag_id, "dag_run_id": run_id}, True

    def list_runs(self, dag_ids: list[str], **_: Any) -> list[dict[str, Any]]:
        return [{"dag_id": d, "dag_run_id": f"r-{self.name}"} for d in dag_ids]

    @contextlib.contextmanager
    def deadline_of(self, seconds: float) -> Iterator[None]:
        yield


def fleet() -> tuple[AirflowFleet, dict[str, Stub]]:
    stubs = {"af2": Stub("af2"), "af3": Stub("af3")}
    made = AirflowFleet(Stub("settings"), lambda d: stubs[d.name])
    # `cleanup` is a dag_id in both; in the graph af3's is named cleanup_af3.
    made.configure(Graph([Pipeline("root"), Pipeline("cleanup", depends_on=("root",)),
                          Pipeline("cleanup", depends_on=("root",), deployment="af3",
                                   name="cleanup_af3")], [AF2, AF3]))
    return made, stubs


def test_calls_go_to_the_pipelines_deployment_by_dag_id_and_answer_under_its_name() -> None:
    f, stubs = fleet()
    raw, created = f.trigger("cleanup_af3", "r1", datetime.now().astimezone(), {})
    assert created
    assert stubs["af3"].calls == [("trigger", "cleanup", "r1")]
    assert raw["dag_id"] == "cleanup_af3"
    f.trigger("cleanup", "r1", datetime.now().astimezone(), {})
    assert stubs["af2"].calls == [("trigger", "cleanup", "r1")]
    assert f.groups(["root", "cleanup", "cleanup_af3"]) == {
        "af2": ["root", "cleanup"], "af3": ["cleanup_af3"]}
    assert f.name_of("af3", "cleanup") == "cleanup_af3"
    assert f.name_of("af3", "root") is None
    listed = list(f.iter_runs_of("af3", ["cleanup_af3"]))
    assert listed == [{"dag_id": "cleanup_af3", "dag_run_id": "r-af3"}]


def test_a_moved_pipelines_earlier_run_is_cleared_where_it_was_seen() -> None:
    f, stubs = fleet()
    # cleanup_af3 ran in af2 before it moved: listed there as a moved pipeline's run.
    (seen,) = f.iter_runs_of("af2", ["cleanup_af3"], moved=True)
    assert seen["dag_id"] == "cleanup_af3"
    f.clear("cleanup_af3", "r-af2")
    assert stubs["af2"].calls == [("clear", "cleanup", "r-af2")]
    f.clear("cleanup_af3", "another-run")  # a run not seen elsewhere: where it runs now
    assert stubs["af3"].calls == [("clear", "cleanup", "another-run")]


def test_the_fleet_fails_readiness_only_when_every_deployment_fails() -> None:
    f, stubs = fleet()
    f.client("af2")
    f.client("af3")
    stubs["af2"].last_contact, stubs["af2"].last_failure = 1.0, (2.0, "af2 down")
    stubs["af3"].last_contact = 3.0
    assert f.last_failure is None
    assert f.last_contact == 3.0
    stubs["af3"].last_failure = (4.0, "af3 down")
    assert f.last_failure == (4.0, "af3 down")


def test_credentials_come_from_where_the_declaration_says_and_are_never_shown(
        tmp_path: Path) -> None:
    base = AirflowSettings(url="http://settings.example", username="x", password="y",
                           timeout=3)
    made = settings_for(AF2, base, {"AF2_PW": "s3cret"})
    assert (made.url, made.api, made.username, made.password, made.timeout) == (
        "http://af2.example", "v1", "u", "s3cret", 3)
    with pytest.raises(DeploymentUnusable, match="AF2_PW is not set") as missing:
        settings_for(AF2, base, {})
    assert "deployment af2" in str(missing.value)
    token = settings_for(AF3, base, {})
    assert (token.token_file, token.username, token.password) == ("/run/secrets/af3",
                                                                  None, None)
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    filed = Deployment("af4", "http://af4.example",
                       auth={"kind": "password", "username_env": "U",
                             "password_file": str(secret)})
    assert settings_for(filed, base, {"U": "me"}).password == "from-a-file"
    secret.unlink()
    with pytest.raises(DeploymentUnusable, match="cannot read") as unreadable:
        settings_for(filed, base, {"U": "me"})
    assert "from-a-file" not in str(unreadable.value)


def test_a_deployment_not_declared_is_unusable_and_named() -> None:
    f, _ = fleet()
    with pytest.raises(DeploymentUnusable, match="deployment af9: not declared"):
        f.client("af9")


def test_the_grouping_kept_between_passes_follows_a_new_graph() -> None:
    made, stubs = fleet()
    names = frozenset({"root", "cleanup", "cleanup_af3"})
    first = made.groups(names)
    assert made.groups(names) is first  # the same graph: kept, not rebuilt
    assert {d: sorted(n) for d, n in first.items()} == {"af2": ["cleanup", "root"],
                                                         "af3": ["cleanup_af3"]}
    # A new head moves the root to af3.
    made.configure(Graph([Pipeline("root", deployment="af3"),
                          Pipeline("cleanup", depends_on=("root",)),
                          Pipeline("cleanup", depends_on=("root",), deployment="af3",
                                   name="cleanup_af3")], [AF2, AF3]))
    moved = {d: sorted(n) for d, n in made.groups(names).items()}
    assert moved == {"af2": ["cleanup"], "af3": ["cleanup_af3", "root"]}
    listed = list(made.iter_runs_of("af3", made.groups(names)["af3"]))
    assert sorted(r["dag_id"] for r in listed) == ["cleanup_af3", "root"]
    assert stubs["af3"] is made.client("af3")
