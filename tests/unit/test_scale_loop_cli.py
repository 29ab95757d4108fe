"""`--airflow-page-size` / RECONCILER_AIRFLOW_PAGE_SIZE reaches the Airflow settings of
the commands that list runs; a size below 1 is a usage error (exit 2)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.cli import loop_cmds, main
from reconciler.core.settings import AirflowSettings


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[AirflowSettings]:
    captured: list[AirflowSettings] = []

    def fresh_plan(etcd: Any, airflow: AirflowSettings, window: timedelta) -> Any:
        captured.append(airflow)
        raise SystemExit(0)

    monkeypatch.setattr(loop_cmds, "_fresh_plan", fresh_plan)
    return captured


def test_the_default_page_size_is_1000(seen: list[AirflowSettings]) -> None:
    CliRunner().invoke(main, ["plan"], env={"RECONCILER_AIRFLOW_PAGE_SIZE": None})
    assert [s.page_size for s in seen] == [1000]


def test_the_page_size_comes_from_its_variable_or_its_flag(seen: list[AirflowSettings]) -> None:
    runner = CliRunner()
    runner.invoke(main, ["plan"], env={"RECONCILER_AIRFLOW_PAGE_SIZE": "250"})
    runner.invoke(main, ["plan", "--airflow-page-size", "5000"])
    assert [s.page_size for s in seen] == [250, 5000]


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_page_size_below_one_is_a_usage_error(value: str,
                                                seen: list[AirflowSettings]) -> None:
    result = CliRunner().invoke(main, ["plan"], env={"RECONCILER_AIRFLOW_PAGE_SIZE": value})
    assert result.exit_code == 2
    assert "--airflow-page-size" in result.output
    assert seen == []


def test_run_documents_the_option_and_the_airflow_setting_it_needs() -> None:
    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "--airflow-page-size" in text
    assert "RECONCILER_AIRFLOW_PAGE_SIZE" in text
    assert "AIRFLOW__API__MAXIMUM_PAGE_LIMIT" in text
