"""The UI ships in the same wheel as the reconciler: its plugin's entry point, its module,
its page, scripts and the vendored graph library with its licence (package data)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_registers_the_ui_plugin_and_ships_its_static_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    [built] = tmp_path.glob("airflow_dag_reconciler-*.whl")
    with zipfile.ZipFile(built) as wheel:
        names = set(wheel.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = wheel.read(entry_points).decode()
    assert "reconciler_ui = reconciler.plugin.ui.plugin:ReconcilerUIPlugin" in text
    for name in ("plugin.py", "app.py", "reader.py", "view.py", "static/page.html",
                 "static/ui.js", "static/ui.css", "static/icon.svg",
                 "static/vendor/cytoscape/cytoscape.min.js",
                 "static/vendor/cytoscape/LICENSE"):
        assert f"reconciler/plugin/ui/{name}" in names, name
