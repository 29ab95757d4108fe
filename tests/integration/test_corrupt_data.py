"""Bad stored data is quarantined by every command that reads etcd, not only by the loop:
each names the bad key in one line, skips (or refuses) only that value, and never prints
a traceback. Real etcd; the fake Airflow for the commands that need one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result

from reconciler.adapters.store import EtcdStore
from reconciler.core.settings import EtcdSettings
from reconciler.service.sync import sync
from tests.helpers import EXAMPLE_DAGS, example_repo, git
from tests.integration.test_operate import (
    CYCLE,
    ScheduledFake,
    airflow_env,
    cli,
    etcd_env,
)

NOT_JSON = b"{not json"
BAD_HISTORY = {
    "not JSON": NOT_JSON,
    "a JSON list": b"[1, 2]",
    "a non-numeric seq": json.dumps({"commit": "ab12", "graph_digest": "x", "seq": "x",
                                     "synced_at": "2026-01-01T00:00:00+00:00"}).encode(),
    "a commit that is a path": json.dumps({"commit": "../x/y", "seq": 7,
                                           "synced_at": "2026-01-01T00:00:00+00:00"}).encode(),
}


@pytest.fixture
def store(etcd_settings: EtcdSettings, tmp_path: Path) -> Iterator[EtcdStore]:
    """Two syncs: history entries 1 and 2, head at 2."""
    repo = example_repo(tmp_path / "repo")
    s = EtcdStore(etcd_settings)
    assert sync(repo, "HEAD", "pipelines", s, source="test",
                now=datetime.now(UTC) - timedelta(days=60)).ok
    (repo / "pipelines" / "08_pipeline.yaml").write_text(
        "dag_id: 08_pipeline\nowner: t\ndepends_on: [07_pipeline]\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "add 08")
    assert sync(repo, "HEAD", "pipelines", s, source="test").ok
    yield s
    s.close()


@pytest.fixture
def fake() -> Iterator[ScheduledFake]:
    with ScheduledFake(EXAMPLE_DAGS) as f:
        f.add_run("01_pipeline_init", f"scheduled__{CYCLE.isoformat()}", CYCLE,
                  run_type="scheduled")
        f.finish_all()
        yield f


def one_line_naming(result: Result, key: str) -> str:
    """The one line of the command's output that names `key`; no traceback anywhere."""
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if key in line]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("bad", sorted(BAD_HISTORY))
def test_history_and_rollback_skip_a_corrupt_history_entry(
        store: EtcdStore, etcd_settings: EtcdSettings, bad: str) -> None:
    key = store.history_key(7)
    store.put(key, BAD_HISTORY[bad])
    text = cli(etcd_settings, "history")
    assert text.exit_code == 0, text.output
    assert "unreadable" in one_line_naming(text, key)
    assert [line.split()[0] for line in text.stdout.splitlines()] == ["#2", "#1"]

    as_json = cli(etcd_settings, "history", "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert [item["seq"] for item in data["items"]] == [2, 1]
    assert [u["key"] for u in data["unreadable"]] == [key]

    refused = cli(etcd_settings, "rollback", "7")
    assert refused.exit_code == 2
    assert one_line_naming(refused, key).startswith("error: unreadable value at")

    rolled = cli(etcd_settings, "rollback", "1")  # a good entry beside the corrupt one
    assert rolled.exit_code == 0, rolled.output
    head, _ = store.read_head()
    assert head is not None
    assert (head.seq, head.forced) == (3, True)


def test_status_names_an_unreadable_heartbeat_and_goes_on(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    store.put(store.heartbeat_key(), b"garbage")
    result = cli(etcd_settings, "status")
    assert result.exit_code == 0, result.output
    one_line_naming(result, store.heartbeat_key())
    assert "last pass never" in result.stdout
    as_json = cli(etcd_settings, "status", "-o", "json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["header"]["last_pass"] is None


def test_status_names_and_skips_an_unreadable_mirror_record(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    good = {"dag_id": "02_pipeline", "cycle": CYCLE.isoformat(), "state": "done",
            "message": "ok", "reason": "Done"}
    store.put_json(store.observed_key(CYCLE.isoformat(), "02_pipeline"), good)
    bad = store.observed_key(CYCLE.isoformat(), "03_pipeline")
    store.put(bad, b"[]")
    result = cli(etcd_settings, "status")
    assert result.exit_code == 0, result.output
    one_line_naming(result, bad)
    assert "02_pipeline" in result.stdout


@pytest.mark.parametrize("head", [
    json.dumps({"commit": "../x/y", "synced_at": "2026-01-01T00:00:00+00:00", "seq": 3}),
    "garbage", "[]", json.dumps({"commit": "ab12", "synced_at": "soon"}),
])
def test_a_corrupt_head_is_named_by_plan_status_and_graph(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: ScheduledFake,
        head: str) -> None:
    key = store.head_key()
    store.put(key, head.encode())
    for args, env in ((["plan"], airflow_env(fake)),
                      (["status", "--live"], airflow_env(fake)),
                      (["graph", "--from-etcd"], {})):
        result = cli(etcd_settings, *args, **env)
        assert result.exit_code == 2, (args, result.output)
        assert one_line_naming(result, key).startswith("error: unreadable value at"), args
    mirror = cli(etcd_settings, "status")  # the mirror needs no graph: shown, key named
    assert mirror.exit_code == 0, mirror.output
    one_line_naming(mirror, key)


def test_graph_from_etcd_refuses_a_commit_that_is_a_path(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    result = cli(etcd_settings, "graph", "--from-etcd", "--rev", "../x/y")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "never been synced" in result.output


def test_a_suspend_mark_status_shows_can_be_resumed_even_with_a_slash(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    store.put_json(store.suspended_prefix() + "team/a", {"by": "someone", "reason": "x"})
    shown = cli(etcd_settings, "status")
    assert "suspended: team/a by someone" in shown.stdout
    resumed = cli(etcd_settings, "resume", "team/a")
    assert resumed.exit_code == 0, resumed.output
    assert store.read_suspended() == {}
    assert "suspended" not in cli(etcd_settings, "status").stdout
    refused = cli(etcd_settings, "suspend", "team/b")
    assert refused.exit_code == 1
    assert "Traceback" not in refused.output


def test_doctor_lists_every_corrupt_value(store: EtcdStore, etcd_settings: EtcdSettings,
                                          fake: ScheduledFake) -> None:
    cycle = CYCLE.isoformat()
    bad = {
        store.history_key(9): b"[]",
        store.heartbeat_key(): b"garbage",
        store.ledger_key(cycle, "02_pipeline"): NOT_JSON,
        store.ledger_key(cycle, "03_pipeline"): b'{"run_id": 1}',
        store.observed_key(cycle, "04_pipeline"): NOT_JSON,
        store.suspended_prefix() + "05_pipeline": NOT_JSON,
        store.suspended_prefix() + "team/a": b'{"by": "x"}',
    }
    for key, value in bad.items():
        store.put(key, value)
    result = cli(etcd_settings, "doctor", "-o", "json", **airflow_env(fake))
    assert result.exit_code == 1, result.output
    corrupt = [f for f in json.loads(result.stdout)["findings"] if f["problem"] == "corrupt"]
    assert sorted(f["key"] for f in corrupt) == sorted(bad)
    text = cli(etcd_settings, "doctor", **airflow_env(fake))
    assert text.exit_code == 1
    for key in bad:
        one_line_naming(text, key)


def test_doctor_lists_a_corrupt_head_without_a_traceback(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: ScheduledFake) -> None:
    store.put(store.head_key(), json.dumps({"commit": "../x/y", "synced_at": "x"}).encode())
    result = cli(etcd_settings, "doctor", **airflow_env(fake))
    assert result.exit_code == 1, result.output
    assert "unreadable" in one_line_naming(result, store.head_key())


def test_doctor_finds_nothing_corrupt_in_a_clean_namespace(
        store: EtcdStore, etcd_settings: EtcdSettings) -> None:
    assert store.corrupt_values() == []


def test_plan_names_a_corrupt_ledger_entry_in_one_line_and_plans_the_rest(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: ScheduledFake) -> None:
    """As a user runs it (a process of its own, its stderr as is): the entry is skipped,
    named once; no second, key-less log line."""
    key = store.ledger_key(CYCLE.isoformat(), "02_pipeline")
    store.put(key, NOT_JSON)
    env = {**os.environ, **etcd_env(etcd_settings), **airflow_env(fake)}
    done = subprocess.run([sys.executable, "-m", "reconciler", "plan"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"warning: unreadable value at {key}: ")
    assert "02_pipeline" in done.stdout  # planned all the same (its run is missing)


@pytest.mark.parametrize("live", [False, True])
def test_status_names_an_unreadable_suspend_mark_once(
        store: EtcdStore, etcd_settings: EtcdSettings, fake: ScheduledFake, live: bool) -> None:
    key = store.suspended_prefix() + "05_pipeline"
    store.put(key, NOT_JSON)
    args = ["status", "--live"] if live else ["status", "--from-etcd"]
    result = cli(etcd_settings, *args, **airflow_env(fake))
    assert result.exit_code == 0, result.output
    assert "warning: unreadable value at" in one_line_naming(result, key)
    assert "suspended: 05_pipeline" in result.stdout  # an unreadable mark still suspends
