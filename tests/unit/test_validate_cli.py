"""`reconciler validate`: every refusal class of DESIGN section 3, one data folder each.

Each tests/data/invalid/<case>/ holds a pipelines/ folder and expected.txt, whose lines
are `file:line:column: message prefix`; tests/data/valid/<case>/ must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
REPO = Path(__file__).resolve().parents[2]
INVALID = sorted(p.name for p in (DATA / "invalid").iterdir())
VALID = sorted(p.name for p in (DATA / "valid").iterdir())


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == "" or proc.stderr.startswith("error: ")


@pytest.mark.parametrize("case", INVALID)
def test_invalid_case_is_refused_with_file_line_and_message(case: str) -> None:
    folder = DATA / "invalid" / case / "pipelines"
    proc = run("validate", str(folder))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_no_traceback(proc)
    lines = proc.stdout.splitlines()
    for expected in (DATA / "invalid" / case / "expected.txt").read_text().splitlines():
        expected = expected.replace("{dir}", str(folder))
        want = f"{folder}/{expected}"
        assert any(line.startswith(want) for line in lines), (
            f"no line starts with {want!r}:\n{proc.stdout}")
    # every problem line has the path:line:column: shape, and the last line counts them
    *problems, summary = lines
    assert problems
    assert all(line.startswith(str(folder)) for line in problems)
    assert summary.startswith(f"{len(problems)} problem(s)")


@pytest.mark.parametrize("case", VALID)
def test_valid_case_passes(case: str) -> None:
    proc = run("validate", str(DATA / "valid" / case / "pipelines"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_the_shipped_example_graph_is_valid() -> None:
    proc = run("validate", cwd=REPO)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == "ok: 7 files, 7 pipelines, 9 dependencies, 1 roots\n"


def test_every_error_of_the_run_is_reported_not_just_the_first() -> None:
    proc = run("validate", str(DATA / "invalid" / "many_errors" / "pipelines"))
    assert proc.stdout.splitlines()[-1] == "3 problem(s) in 3 file(s)"


def test_oversized_file_is_refused_with_its_real_size(tmp_path: Path) -> None:
    # Read at most limit + 1 bytes, but report the size the file has (it said 65537).
    (tmp_path / "a.yaml").write_bytes(b"dag_id: a\nowner: x\n#" + b"x" * (70 * 1024 - 20))
    proc = run("validate", str(tmp_path))
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert proc.stdout.splitlines()[0] == (f"{tmp_path}/a.yaml:1:1: file is 71680 bytes, over "
                                           "the 65536 byte limit for a pipeline file")


def test_graph_too_big_for_one_etcd_value(tmp_path: Path) -> None:
    for i in range(40):
        noise = " ".join(str((i * 400 + j) * 7919 % 104729) for j in range(400))
        (tmp_path / f"p{i}.yaml").write_text(f"dag_id: p{i}\nowner: x\nconf: {{noise: {noise}}}\n")
    proc = run("validate", str(tmp_path), "--max-graph-bytes", "20000")
    assert proc.returncode == 1
    assert_no_traceback(proc)
    (line,) = proc.stdout.splitlines()[:-1]
    assert line.startswith(f"{tmp_path}/p")
    assert ":1:1: the graph of 40 pipelines is " in line
    assert "over the 20000 byte limit of one etcd value" in line
    assert run("validate", str(tmp_path)).returncode == 0  # the default limit is far higher


def test_json_format_lists_problems_as_data() -> None:
    proc = run("validate", str(DATA / "invalid" / "cycle" / "pipelines"), "--format", "json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    (problem,) = data["problems"]
    assert problem["code"] == "cycle"
    assert (problem["line"], problem["column"]) == (3, 14)
    assert problem["path"].endswith("pipelines/a.yaml")


def test_github_format_emits_workflow_annotations() -> None:
    folder = DATA / "invalid" / "unknown_key" / "pipelines"
    proc = run("validate", str(folder), "--format", "github")
    assert proc.returncode == 1
    first = proc.stdout.splitlines()[0]
    path = str(folder / "a.yaml").replace(":", "%3A").replace(",", "%2C")
    assert first == (f"::error file={path},line=3,col=1,title=reconciler validate%3A "
                     "unknown-key::unknown key 'depend_on'; did you mean 'depends_on'?")


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = run("validate", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope'}: no such directory\n"
