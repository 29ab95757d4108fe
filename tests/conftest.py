"""Test tiers by directory: tests/unit (pure), tests/integration (real etcd, fake Airflow),
tests/e2e (real Airflow 3 standalone + real etcd). `-m unit` etc. select a tier."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins: list[str] = []

_TESTS = Path(__file__).parent
_FIXTURES = _TESTS / "fixtures"
# Shared service fixtures (etcd, Airflow) live in tests/fixtures/*.py.
pytest_plugins += sorted(
    f"tests.fixtures.{p.stem}" for p in _FIXTURES.glob("*.py") if p.stem != "__init__"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))
