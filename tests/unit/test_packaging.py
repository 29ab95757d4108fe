"""What the wheel ships and declares: the schema and the Airflow plugin inside it, the
`airflow.plugins` and console entry points, the airflow-plugin extra, the license and
project metadata, and every third-party import of the package declared as a bounded
dependency. The wheel is built once, offline (`pip wheel --no-build-isolation`, hatchling
is a test dependency). docker-compose.yml and the Dockerfile: test_compose_static.py."""

from __future__ import annotations

import ast
import email
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "git": "gitpython", "etcd3": "python3-etcd3",
                "grpc": "grpcio", "prometheus_client": "prometheus-client",
                "google": "protobuf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("airflow_dag_reconciler-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_wheel_holds_the_package_the_schema_and_the_plugin(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "reconciler/schemas/pipeline.schema.json" in names
    assert wheel.read("reconciler/schemas/deployment.schema.json") == \
        (REPO / "schemas" / "deployment.schema.json").read_bytes()
    assert "reconciler/plugin/reconciler_events.py" in names
    assert "reconciler/plugin/__init__.py" in names
    assert wheel.read("reconciler/plugin/reconciler_events.py") == \
        (REPO / "examples" / "plugins" / "reconciler_events.py").read_bytes()
    sources = {str(p.relative_to(REPO)) for p in (REPO / "reconciler").rglob("*.py")}
    assert sources <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_entry_points_exist(wheel: zipfile.ZipFile) -> None:
    text = dist_info(wheel, "entry_points.txt")
    assert "[airflow.plugins]\nreconciler_events = " \
        "reconciler.plugin.reconciler_events:ReconcilerEventsPlugin" in text
    assert "[console_scripts]\nreconciler = reconciler.cli:main" in text


def test_metadata_license_classifiers_urls_and_the_plugin_extra(wheel: zipfile.ZipFile
                                                                ) -> None:
    meta = email.message_from_string(dist_info(wheel, "METADATA"))
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert "Version 2.0, January 2004" in (REPO / "LICENSE").read_text()[:300]
    classifiers = meta.get_all("Classifier") or []
    assert "Framework :: Apache Airflow" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(urls)
    assert "airflow-plugin" in (meta.get_all("Provides-Extra") or [])
    # the plugin's extra adds nothing to install: Airflow's image has what it needs
    assert project()["optional-dependencies"]["airflow-plugin"] == []


def _third_party_imports() -> dict[str, set[str]]:
    """top-level import name -> the modules of the package importing it"""
    found: dict[str, set[str]] = {}
    for path in (REPO / "reconciler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "reconciler":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_of_the_package_is_a_declared_bounded_dependency() -> None:
    declared = {}
    for spec in project()["dependencies"]:
        name = spec.split(";")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        declared[name.lower()] = spec
    imports = _third_party_imports()
    # Airflow is imported only by the plugins, which run inside Airflow (guarded import);
    # FastAPI only by the UI plugin's app, which runs in Airflow 3's API server (it ships it).
    assert imports.pop("airflow") == {"reconciler/plugin/reconciler_events.py",
                                      "reconciler/plugin/ui/plugin.py",
                                      "reconciler/plugin/ui/app.py"}
    assert imports.pop("fastapi") == {"reconciler/plugin/ui/app.py"}
    missing = {top: where for top, where in imports.items()
               if DISTRIBUTION.get(top, top).lower() not in declared}
    assert not missing, f"imported but not declared in [project] dependencies: {missing}"
    for name, spec in declared.items():
        assert "<" in spec, f"{name} has no upper bound: {spec}"
    assert "grpcio" in declared
    assert "protobuf" in declared


def test_the_readme_links_the_design_inside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    assert "](docs/design.md)" in readme
    assert "../shared" not in readme
    design = (REPO / "docs" / "design.md").read_text()
    assert design.startswith("# Design")
    assert "events/<dag_id>/<run_id>" in design
