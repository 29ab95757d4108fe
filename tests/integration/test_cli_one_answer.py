"""The CLI's promises against a real etcd (issue 16): every command that reads the synced
graph gives one answer when nothing is synced yet (one line on stderr naming the
namespace and the endpoints, exit 1); `wait` fails fast when it cannot ever succeed; and
`-o json` works on `resume`, `reconcile` and `wait` as on every other command."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reconciler.adapters.store import EtcdStore
from reconciler.cli import main
from reconciler.core.settings import EtcdSettings
from reconciler.service.sync import sync
from tests.helpers import example_repo

SYNCED_GRAPH_READERS = [
    ["status"], ["status", "--live"], ["status", "-o", "json"], ["plan"], ["plan", "-o", "json"],
    ["doctor"], ["history"], ["history", "-o", "json"], ["wait", "--timeout", "60"],
    ["wait", "--dag", "06_pipeline", "--timeout", "60", "-o", "json"],
]


def env(etcd: EtcdSettings) -> dict[str, str]:
    # Airflow credentials for the commands that need them (plan, doctor, status --live);
    # nothing listens there: the answer must come before any Airflow call.
    return {"RECONCILER_ETCD_ENDPOINTS": ",".join(etcd.endpoints),
            "RECONCILER_ETCD_PREFIX": etcd.prefix, "RECONCILER_NAMESPACE": etcd.namespace,
            "RECONCILER_AIRFLOW_URL": "http://127.0.0.1:9", "RECONCILER_AIRFLOW_USERNAME": "u",
            "RECONCILER_AIRFLOW_PASSWORD": "p", "RECONCILER_AIRFLOW_TOKEN": ""}


def cli(etcd: EtcdSettings, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env(etcd), catch_exceptions=False)


@pytest.mark.parametrize("args", SYNCED_GRAPH_READERS, ids=" ".join)
def test_nothing_synced_yet_is_one_answer_for_every_command(etcd_settings: EtcdSettings,
                                                            args: list[str]) -> None:
    started = time.monotonic()
    result = cli(etcd_settings, *args)
    assert time.monotonic() - started < 30  # `wait` does not sit out its timeout
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == (
        f"error: nothing synced yet in namespace {etcd_settings.namespace} "
        f"({etcd_settings.root}) at {','.join(etcd_settings.endpoints)}: run "
        "`reconciler sync`\n")


@pytest.fixture
def synced(etcd_settings: EtcdSettings, tmp_path: Path) -> EtcdSettings:
    repo = example_repo(tmp_path / "repo")
    with EtcdStore(etcd_settings) as store:
        assert sync(repo, "HEAD", "pipelines", store, source="test",
                    now=datetime.now(UTC) - timedelta(days=1)).ok
    return etcd_settings


def test_wait_fails_fast_on_a_pipeline_that_is_not_in_the_graph(synced: EtcdSettings) -> None:
    started = time.monotonic()
    result = cli(synced, "wait", "--dag", "06_pipelin", "--timeout", "60")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "06_pipelin: not a pipeline of the synced graph" in result.stderr


def test_wait_says_what_it_missed_when_the_mirror_is_empty(synced: EtcdSettings) -> None:
    result = cli(synced, "wait", "--timeout", "0.3", "--every", "0.1")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: timed out after 0.3 s waiting for done: no status "
                                    "in etcd's mirror for any cycle")
    bad = cli(synced, "wait", "--cycle", "yesterday")
    assert bad.exit_code == 2
    assert bad.stderr == "error: --cycle 'yesterday' is not an ISO 8601 date\n"


def test_wait_answers_json(synced: EtcdSettings) -> None:
    cycle = datetime.now(UTC).replace(microsecond=0)
    with EtcdStore(synced) as store:
        for dag_id, state in (("06_pipeline", "done"), ("07_pipeline", "waiting")):
            store.put_json(store.observed_key(cycle.isoformat(), dag_id), {
                "dag_id": dag_id, "cycle": cycle.isoformat(), "state": state,
                "reason": "Done", "message": "", "run_id": None, "waiting_for": [],
                "blocked_by": [], "commit": ""})
    done = cli(synced, "wait", "--dag", "06_pipeline", "-o", "json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {
        "kind": "WaitResult", "ok": True, "cycle": cycle.isoformat(), "state": "done",
        "pipelines": {"06_pipeline": "done"},
        "message": f"06_pipeline: done (cycle {cycle.isoformat()})"}
    late = cli(synced, "wait", "--timeout", "0.2", "--every", "0.1", "--output", "json")
    assert late.exit_code == 1
    answer = json.loads(late.stdout)
    assert (answer["kind"], answer["ok"]) == ("WaitResult", False)
    assert answer["pipelines"] == {"06_pipeline": "done", "07_pipeline": "waiting"}
    assert late.stderr == f"error: {answer['message']}\n"


def test_resume_and_reconcile_answer_json(synced: EtcdSettings) -> None:
    assert cli(synced, "suspend", "03_pipeline", "-m", "x").exit_code == 0
    resumed = cli(synced, "resume", "03_pipeline", "-o", "json")
    assert resumed.exit_code == 0, resumed.output
    answer = json.loads(resumed.stdout)
    assert (answer["kind"], answer["target"]) == ("Resumption", "03_pipeline")
    assert {"by", "at"} <= set(answer)
    again = cli(synced, "resume", "03_pipeline", "-o", "json")
    assert again.exit_code == 1
    assert again.stdout == ""
    asked = cli(synced, "reconcile", "--output", "json")
    assert asked.exit_code == 0, asked.output
    answer = json.loads(asked.stdout)
    assert (answer["kind"], answer["leader"]) == ("ReconcileRequest", None)
    with EtcdStore(synced) as store:
        stored = store.get(store.control_key("reconcile")).json()
    assert stored == {"by": answer["by"], "at": answer["at"]}


@pytest.mark.parametrize("args", SYNCED_GRAPH_READERS, ids=" ".join)
def test_an_unreachable_etcd_is_not_taken_for_an_empty_namespace(args: list[str]) -> None:
    # a loopback port nothing listens on: the answer is the environment's (exit 2)
    from tests.fixtures.etcd import free_port

    gone = EtcdSettings(endpoints=(f"127.0.0.1:{free_port()}",), timeout=1.0)
    result = CliRunner().invoke(main, [*args, "--etcd-timeout", "1"], env=env(gone),
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")
    assert "nothing synced" not in result.stderr
