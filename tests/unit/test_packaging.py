"""Static checks of what cannot run here (no Docker engine): docker-compose.yml and the
Dockerfile, read and cross-checked against the project."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_etcd_airflow_and_the_reconciler() -> None:
    services = compose()["services"]
    assert {"etcd", "postgres", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "sync", "reconciler"} <= set(services)


def test_every_dependency_and_volume_is_defined() -> None:
    data = compose()
    services, volumes = data["services"], set(data.get("volumes", {}))
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undeclared volume {source}"


def test_the_reconciler_uses_the_documented_environment_variables() -> None:
    reconciler = compose()["services"]["reconciler"]
    documented = set(re.findall(r"RECONCILER_[A-Z_]+", (REPO / "README.md").read_text()))
    assert set(reconciler["environment"]) <= documented
    assert reconciler["command"][0] == "run"
    assert "RECONCILER_AIRFLOW_PASSWORD" in reconciler["environment"]


def test_airflow_points_tasks_at_its_own_api_server() -> None:
    env = compose()["x-airflow"]["environment"]
    url = env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert url.startswith("http://airflow-apiserver:8080/")


def test_dockerfile_installs_the_package_and_runs_the_cli() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["reconciler"]' in text
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in copied.split():
            assert (REPO / item).exists(), f"Dockerfile copies missing {item}"
    assert "USER reconciler" in text  # not root
