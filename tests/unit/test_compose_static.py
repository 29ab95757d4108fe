"""docker-compose.yml, the Dockerfile and .dockerignore, read statically (there is no
Docker engine here; tests/e2e/test_compose_native.py runs the commands natively):

- the file is valid against the official compose-spec JSON schema (the copy vendored in
  check-jsonschema, a test dependency: `check_jsonschema/builtin_schemas/vendor/
  compose-spec.json`, with its license beside it);
- every image is pinned, every long-running service has a health check and a restart
  policy, host ports bind loopback only, dependencies wait for health or completion;
- the system is complete: 3 etcd members that name each other, Postgres, the four Airflow
  components sharing one passwords file, a logs volume and the plugin, two reconciler
  replicas in pull mode reachable from outside their containers;
- the image is non-root and trusts a foreign-owned repository; the build context is an
  allowlist that holds what the Dockerfile copies.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
           "airflow-triggerer"]
ETCD = ["etcd-1", "etcd-2", "etcd-3"]
RECONCILERS = ["reconciler-a", "reconciler-b"]


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def compose_spec() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    return json.loads((vendor / "compose-spec.json").read_text())


def test_the_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = compose_spec()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_file() -> None:
    schema = compose_spec()
    broken = compose()
    broken["services"]["etcd-1"]["healthcheck"]["interval"] = ["5s"]
    broken["services"]["postgres"]["restart_policy"] = "always"  # not a service key
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 2


def test_the_system_is_complete() -> None:
    names = set(services())
    assert {*ETCD, "postgres", "airflow-init", *AIRFLOW, *RECONCILERS} <= names


@pytest.mark.parametrize("name", sorted(yaml.safe_load(
    (REPO / "docker-compose.yml").read_text())["services"]))
def test_every_service_is_pinned_checked_and_restarted(name: str) -> None:
    service = services()[name]
    if "build" in service:
        assert service["build"] == "."
    else:
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
        assert re.match(r"^v?\d+\.\d+(\.\d+)?", tag), f"{name}: image {image} is not pinned"
    if name == "airflow-init":  # a one-shot job
        assert service["restart"] == "no"
        return
    assert "healthcheck" in service, f"{name} has no health check"
    assert service["healthcheck"]["test"][0] == "CMD"
    assert service.get("restart") == "unless-stopped", name


def test_host_ports_bind_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_dependencies_wait_for_health_or_completion() -> None:
    data = services()
    for name, service in data.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in data, f"{name} depends on unknown service {dep}"
            assert dep != name
            wanted = ("service_completed_successfully" if dep == "airflow-init"
                      else "service_healthy")
            assert how["condition"] == wanted, f"{name} -> {dep}: {how}"
            if wanted == "service_healthy":
                assert "healthcheck" in data[dep], f"{name} waits for {dep}'s health"
    for name in RECONCILERS:
        assert {*ETCD, "airflow-apiserver"} <= set(data[name]["depends_on"])


def test_every_volume_is_declared_or_a_path_of_the_repository() -> None:
    data = compose()
    declared = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_etcd_is_a_three_member_cluster_whose_members_name_each_other() -> None:
    data = services()
    clusters = set()
    for name in ETCD:
        args = dict(a.removeprefix("--").split("=", 1) for a in data[name]["command"][1:])
        assert args["name"] == name
        assert args["advertise-client-urls"] == f"http://{name}:2379"
        assert args["initial-advertise-peer-urls"] == f"http://{name}:2380"
        clusters.add(args["initial-cluster"])
        assert data[name]["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert clusters == {",".join(f"{n}=http://{n}:2380" for n in ETCD)}


def test_airflow_components_share_the_passwords_file_logs_and_the_plugin() -> None:
    data = services()
    for name in ["airflow-init", *AIRFLOW]:
        env = data[name]["environment"]
        assert data[name]["image"] == "apache/airflow:3.3.2-python3.11"
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == \
            "/opt/airflow/auth/passwords.json"
        assert "reconciler:" in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
            "http://airflow-apiserver:8080/execution/"
        volumes = data[name]["volumes"]
        assert "airflow-auth:/opt/airflow/auth" in volumes
        assert "airflow-logs:/opt/airflow/logs" in volumes
        assert "./examples/plugins:/opt/airflow/plugins:ro" in volumes
        assert env["RECONCILER_ETCD_ENDPOINTS"] == "etcd-1:2379,etcd-2:2379,etcd-3:2379"
    assert [data[n]["command"] for n in AIRFLOW] == [
        "api-server", "scheduler", "dag-processor", "triggerer"]


def test_the_reconcilers_pull_read_the_shared_password_and_serve_beyond_loopback() -> None:
    data = services()
    documented = set(re.findall(r"RECONCILER_[A-Z_]+", (REPO / "README.md").read_text()))
    ports = set()
    for name in RECONCILERS:
        service = data[name]
        command, env = service["command"], service["environment"]
        assert command[0] == "run"
        assert command[command.index("--repo") + 1] == "/repo"
        assert "--branch" in command
        assert ".:/repo:ro" in service["volumes"]
        assert "airflow-auth:/auth:ro" in service["volumes"]
        assert env["RECONCILER_AIRFLOW_PASSWORD_FILE"] == "/auth/reconciler.password"
        assert "RECONCILER_AIRFLOW_PASSWORD" not in env  # no password in the file
        assert env["RECONCILER_HTTP_HOST"] == "0.0.0.0"
        assert env["RECONCILER_AIRFLOW_URL"] == "http://airflow-apiserver:8080"
        assert set(env) <= documented, set(env) - documented
        probe = " ".join(service["healthcheck"]["test"])
        assert "/healthz" in probe
        assert "/readyz" in probe
        assert f":{env['RECONCILER_HTTP_PORT']}" in probe
        ports.update(p.rsplit(":", 1)[0] for p in service["ports"])
        assert all(p.endswith(f":{env['RECONCILER_HTTP_PORT']}") for p in service["ports"])
    assert len(ports) == len(RECONCILERS)  # one host port each


def test_the_init_job_writes_the_passwords_file_airflow_and_the_reconciler_read() -> None:
    init = services()["airflow-init"]
    script = init["command"][-1]
    assert init["user"] == "0:0"
    assert "passwords.json" in script
    assert "reconciler.password" in script
    assert "chown 10001:10001 reconciler.password" in script
    assert "airflow db migrate" in script


def test_the_image_is_non_root_and_trusts_a_foreign_owned_repository() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["reconciler"]' in text
    assert re.search(r"^USER 10001(:10001)?$", text, re.M)
    assert "useradd --create-home --uid 10001" in text
    assert "git config --system --add safe.directory '*'" in text
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        assert re.match(r"^python:3\.11\.\d+-slim-\w+$", base), f"unpinned base {base}"
    assert "/healthz" in text


def test_the_build_context_is_an_allowlist_of_what_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # everything else (.venv*, .work, node_modules, .git) stays out
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    text = (REPO / "Dockerfile").read_text()
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        copied.update(sources.split())
    assert copied == allowed
    for item in copied:
        assert (REPO / item).exists(), f"Dockerfile copies missing {item}"
    assert "**/__pycache__" in lines
