"""Deployments in git and pipeline identity (issue 18, items 1, 2 and the diff of item 4).

The refusals themselves are data cases under tests/data/invalid/ (run by
test_validate_cli.py); here: a repository without deployments is exactly today's (its
graph byte for byte, its plan), names and qualified upstreams resolve, the blob carries
the deployments and still reads as before, the diff says "moved from A to B", the
deployments folder is read by the same rule as pipelines, the schema and the Python
pairing checks agree, and generated graphs across deployments are accepted as written.
"""

from __future__ import annotations

import gzip
import json
import os
import string
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.adapters.sources import (
    SourceError,
    read_directory,
    read_directory_deployments,
    read_index_deployments,
    read_tree_deployments,
)
from reconciler.cli import main
from reconciler.core import diff as graph_diff
from reconciler.core.checks import SourceFile, check_files
from reconciler.core.deployments import check_deployment_files, deployments_dir, schema
from reconciler.core.graph import DEFAULT_DEPLOYMENT, Graph
from tests.unit.test_plan_table import MIDDLE, ROOT, World

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
GOLDEN = DATA / "golden" / "example_graph_before_deployments.json"
TWO = DATA / "valid" / "two_deployments"

AF2 = ("name: af2\nurl: http://airflow2.example.com\napi: v1\n"
       "auth: {kind: password, username: r, password_env: AF2_PASSWORD}\ndefault: true\n")
AF3 = "name: af3\nurl: https://airflow3.example.com\nauth: {kind: token, token_env: AF3_TOKEN}\n"


def check_dir(pipelines: Path) -> Any:
    return check_files(read_directory(pipelines),
                       deployments=read_directory_deployments(pipelines))


def files(spec: dict[str, str]) -> tuple[list[SourceFile], list[SourceFile]]:
    """{"pipelines/a.yaml": text, "airflow-deployments/af2.yaml": text} -> the two lists."""
    pipes = [SourceFile(p, t.encode()) for p, t in spec.items() if p.startswith("pipelines/")]
    deps = [SourceFile(p, t.encode()) for p, t in spec.items() if not p.startswith("pipelines/")]
    return pipes, deps


def graph_of(spec: dict[str, str]) -> Graph:
    pipes, deps = files(spec)
    result = check_files(pipes, deployments=deps)
    assert result.ok, [str(p) for p in result.problems]
    assert result.graph is not None
    return result.graph


# --- a repository without deployments: exactly today's -------------------------------


def test_a_repository_without_deployments_gives_todays_graph_byte_for_byte() -> None:
    # The golden file is the canonical graph of pipelines/ as the code before deployments
    # wrote it (d6e2174): same bytes, same digest, so re-syncing a synced commit is a no-op.
    result = check_dir(REPO / "pipelines")
    assert result.ok
    assert result.graph is not None
    assert result.graph.canonical_json() == GOLDEN.read_bytes()
    assert result.graph.deployments == {}
    assert all(p.deployment is None and p.name is None for p in result.graph.pipelines.values())
    assert result.graph.deployment_of(ROOT) == DEFAULT_DEPLOYMENT


def test_an_old_blob_reads_as_the_same_graph_and_plans_the_same() -> None:
    old = Graph.from_compressed(gzip.compress(GOLDEN.read_bytes()))
    new = check_dir(REPO / "pipelines").graph
    assert old == new
    assert old.default_deployment == DEFAULT_DEPLOYMENT
    # Scenario 1 on the graph read from the old blob: 02-05, then 06, then 07, once each.
    world = World(old)
    world.root_run()
    world.settle()
    assert [d for d, _ in world.executions] == [ROOT, *MIDDLE, "06_pipeline", "07_pipeline"]


# --- names, qualified upstreams, the blob ----------------------------------------------


def test_the_same_dag_id_in_two_deployments_and_qualified_upstreams_resolve_to_names() -> None:
    result = check_dir(TWO / "pipelines")
    assert result.ok, [str(p) for p in result.problems]
    graph = result.graph
    assert graph is not None
    assert sorted(graph.pipelines) == ["cleanup", "cleanup_af3", "extract", "report", "root"]
    assert graph["cleanup"].dag_id == graph["cleanup_af3"].dag_id == "cleanup"
    assert {n: graph.deployment_of(n) for n in graph.pipelines} == {
        "root": "af2", "extract": "af3", "cleanup": "af2", "cleanup_af3": "af3", "report": "af2"}
    # af2/cleanup -> the name cleanup; af3/cleanup -> cleanup_af3; extract (unqualified,
    # one pipeline with that dag_id) -> extract.
    assert graph.upstreams("cleanup_af3") == ("cleanup",)
    assert set(graph.upstreams("report")) == {"cleanup_af3", "extract"}
    assert graph.default_deployment == "af2"
    assert sorted(graph.deployments) == ["af2", "af3"]
    assert graph.deployments["af3"].auth == {"kind": "token",
                                             "token_file": "/run/secrets/af3-token"}


def test_the_blob_keeps_format_1_and_its_pipelines_map_and_adds_the_deployments() -> None:
    graph = check_dir(TWO / "pipelines").graph
    assert graph is not None
    blob = json.loads(gzip.decompress(graph.compressed()))
    assert blob["format"] == 1
    # What the listener plugin reads (reconciler/plugin/reconciler_events.py): the keys
    # of the pipelines mapping.
    assert sorted(blob["pipelines"]) == sorted(graph.pipelines)
    assert blob["pipelines"]["cleanup_af3"]["dag_id"] == "cleanup"
    assert blob["pipelines"]["cleanup_af3"]["deployment"] == "af3"
    assert blob["pipelines"]["cleanup_af3"]["depends_on"] == ["cleanup"]
    assert blob["deployments"]["af2"] == {
        "name": "af2", "url": "http://airflow2.example.com:8080", "api": "v1",
        "auth": {"kind": "password", "password_env": "AF2_PASSWORD", "username": "reconciler"},
        "description": "Airflow 2, being migrated away from.", "default": True}
    # Read back as written (depends_on order aside: the blob sorts it).
    back = Graph.from_compressed(graph.compressed())
    assert back.canonical_json() == graph.canonical_json()
    assert {n: back.deployment_of(n) for n in back.pipelines} == \
        {n: graph.deployment_of(n) for n in graph.pipelines}


def test_a_file_without_deployment_keeps_the_rule_that_its_name_is_its_dag_id() -> None:
    pipes, deps = files({"airflow-deployments/af2.yaml": AF2,
                         "pipelines/root.yaml": "dag_id: root\nowner: t\n",
                         "pipelines/other.yaml": "dag_id: root2\nowner: t\n"})
    result = check_files(pipes, deployments=deps)
    assert [p.code for p in result.problems] == ["file-name"]


def test_an_unqualified_upstream_naming_a_dag_id_under_another_name_resolves() -> None:
    graph = graph_of({"airflow-deployments/af2.yaml": AF2, "airflow-deployments/af3.yaml": AF3,
                      "pipelines/root.yaml": "dag_id: root\nowner: t\n",
                      "pipelines/load_v3.yaml": "dag_id: load\nowner: t\ndeployment: af3\n"
                                                "depends_on: [root]\n",
                      "pipelines/b.yaml": "dag_id: b\nowner: t\ndepends_on: [load]\n"})
    assert graph.upstreams("b") == ("load_v3",)


def test_the_same_pipeline_named_twice_in_depends_on_is_refused() -> None:
    pipes, deps = files({"airflow-deployments/af2.yaml": AF2,
                         "pipelines/root.yaml": "dag_id: root\nowner: t\n",
                         "pipelines/b.yaml": "dag_id: b\nowner: t\ndepends_on: [root, af2/root]\n"})
    result = check_files(pipes, deployments=deps)
    assert [str(p) for p in result.problems] == [
        "pipelines/b.yaml:3:20: 'af2/root' names the same pipeline as 'root' in depends_on "
        "(first as item 1)"]


def test_a_qualified_self_dependency_is_refused() -> None:
    pipes, deps = files({"airflow-deployments/af2.yaml": AF2,
                         "pipelines/b.yaml": "dag_id: b\nowner: t\ndepends_on: [af2/b]\n"})
    result = check_files(pipes, deployments=deps)
    assert [p.code for p in result.problems] == ["self-dependency"]


def test_a_broken_deployment_file_is_not_also_reported_as_an_unknown_deployment() -> None:
    pipes, deps = files({"airflow-deployments/af2.yaml": AF2,
                         "airflow-deployments/af3.yaml": "name: af3\nurl: nope\n",
                         "pipelines/root.yaml": "dag_id: root\nowner: t\n",
                         "pipelines/a.yaml": "dag_id: a\nowner: t\ndeployment: af3\n"
                                             "depends_on: [root]\n"})
    result = check_files(pipes, deployments=deps)
    assert {p.path for p in result.problems} == {"airflow-deployments/af3.yaml"}


# --- the diff ------------------------------------------------------------------------

BASE = {"airflow-deployments/af2.yaml": AF2, "airflow-deployments/af3.yaml": AF3,
        "pipelines/root.yaml": "dag_id: root\nowner: t\n",
        "pipelines/load.yaml": "dag_id: load\nowner: t\ndepends_on: [root]\n"}


def test_the_diff_says_moved_from_a_to_b_in_text_markdown_and_json() -> None:
    base = graph_of(BASE)
    head = graph_of({**BASE, "pipelines/load.yaml": "dag_id: load\nowner: t\n"
                                                    "deployment: af3\ndepends_on: [root]\n"})
    d = graph_diff.diff_graphs(base, head, base_rev="a" * 40, head_rev="b" * 40)
    assert not d.empty
    assert d.changed == []  # a move is not a field change
    assert graph_diff.to_text(d) == "~ pipeline load: moved from af2 to af3\n"
    markdown = graph_diff.to_markdown(d, base, head)
    assert "| 🚚 | `load` | moved from `af2` to `af3` |" in markdown
    assert "**1** moved between deployments." in markdown
    moved = json.loads(graph_diff.to_json(d))["moved"]
    assert moved == [{"dag_id": "load", "from_deployment": "af2", "to_deployment": "af3",
                      "reason": "moved from af2 to af3"}]


def test_declaring_todays_airflow_as_the_default_moves_nothing() -> None:
    old = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n",
                    "pipelines/load.yaml": "dag_id: load\nowner: t\ndepends_on: [root]\n"})
    new = graph_of(BASE)
    d = graph_diff.diff_graphs(old, new)
    assert d.moved == []
    assert d.changed == []
    assert d.deployments_added == ["af2", "af3"]
    assert graph_diff.to_text(d) == "+ deployment af2\n+ deployment af3\n"


def test_a_pipeline_leaving_the_implicit_default_is_moved_from_default() -> None:
    old = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n",
                    "pipelines/load.yaml": "dag_id: load\nowner: t\ndepends_on: [root]\n"})
    new = graph_of({**BASE, "pipelines/load.yaml": "dag_id: load\nowner: t\n"
                                                   "deployment: af3\ndepends_on: [root]\n"})
    d = graph_diff.diff_graphs(old, new)
    assert [m.reason() for m in d.moved] == ["moved from af2 to af3"]
    back = graph_diff.diff_graphs(new, old)  # and undeclaring everything: back to default
    assert [(m.dag_id, m.reason()) for m in back.moved] == [("load", "moved from af3 to af2")]
    assert back.deployments_removed == ["af2", "af3"]
    only_af3 = graph_of({"airflow-deployments/af3.yaml": AF3.replace("auth", "default: true\nauth"),
                         "pipelines/root.yaml": "dag_id: root\nowner: t\ndeployment: af3\n"})
    plain = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n"})
    # The implicit default of a base without declarations is the head's default (af3 here).
    assert graph_diff.diff_graphs(plain, only_af3).moved == []


def test_the_diff_lists_a_changed_deployment_field_by_field() -> None:
    base = graph_of(BASE)
    head = graph_of({**BASE, "airflow-deployments/af3.yaml": AF3.replace(
        "https://airflow3.example.com", "https://af3.example.com")})
    d = graph_diff.diff_graphs(base, head)
    assert graph_diff.to_text(d) == ("~ deployment af3: url: https://airflow3.example.com -> "
                                     "https://af3.example.com\n")
    assert "| ✏️ | `af3` | url: https://airflow3.example.com → https://af3.example.com |" in \
        graph_diff.to_markdown(d, base, head)


def test_without_deployments_the_diff_is_todays() -> None:
    base = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n"})
    head = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n",
                     "pipelines/a.yaml": "dag_id: a\nowner: t\ndepends_on: [root]\n"})
    d = graph_diff.diff_graphs(base, head)
    assert graph_diff.to_text(d) == "+ pipeline a\n+ edge root -> a\n"
    data = json.loads(graph_diff.to_json(d))
    assert data["moved"] == data["deployments_added"] == data["deployments_changed"] == []


# --- where the folder is, and how it is read ------------------------------------------


@pytest.mark.parametrize(("pipelines", "expected"), [
    ("pipelines", "airflow-deployments"),
    ("pipelines/", "airflow-deployments"),
    ("./pipelines", "airflow-deployments"),
    ("deploy/pipelines", "deploy/airflow-deployments"),
    ("/abs/repo/pipelines", "/abs/repo/airflow-deployments"),
    ("a\\b\\pipelines", "a/b/airflow-deployments"),
    (".", None), ("", None), ("/", None), ("..", None), ("x/..", None),
])
def test_the_deployments_folder_is_the_sibling_of_the_pipeline_folder(
        pipelines: str, expected: str | None) -> None:
    assert deployments_dir(pipelines) == expected


def write_case(root: Path, deployments: dict[str, str | bytes]) -> Path:
    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / "root.yaml").write_text("dag_id: root\nowner: t\n")
    folder = root / "airflow-deployments"
    folder.mkdir()
    for name, text in deployments.items():
        (folder / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return root / "pipelines"


def test_a_symlink_in_the_deployments_folder_is_refused_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: af2\nurl: http://x\nauth: {kind: none}\n# s3cret\n")
    pipelines = write_case(tmp_path / "r", {})
    (tmp_path / "r" / "airflow-deployments" / "af2.yaml").symlink_to(secret)
    result = check_dir(pipelines)
    assert [p.code for p in result.problems] == ["symlink"]
    assert "s3cret" not in str(result.problems[0])
    assert str(result.problems[0]).startswith(f"{tmp_path}/r/airflow-deployments/af2.yaml:1:1: ")


def test_a_fifo_and_an_oversized_file_in_the_deployments_folder_are_refused(
        tmp_path: Path) -> None:
    pipelines = write_case(tmp_path, {"big.yaml": b"name: big\n#" + b"x" * (70 * 1024)})
    os.mkfifo(tmp_path / "airflow-deployments" / "pipe.yaml")
    result = check_dir(pipelines)  # a FIFO opened would block: this returning is the test
    messages = sorted(str(p) for p in result.problems)
    assert messages[0] == (f"{tmp_path}/airflow-deployments/big.yaml:1:1: file is 71691 bytes, "
                           "over the 65536 byte limit for a deployment file")
    assert messages[1].startswith(f"{tmp_path}/airflow-deployments/pipe.yaml:1:1: ")
    assert len(messages) == 2


def test_aliases_and_non_utf8_in_a_deployment_file_are_refused(tmp_path: Path) -> None:
    pipelines = write_case(tmp_path, {
        "af2.yaml": "name: &n af2\nurl: http://x.example.com\nauth: {kind: none}\nd: *n\n",
        "af3.yaml": b"name: af3\nurl: http://\xff\n"})
    codes = sorted(p.code for p in check_dir(pipelines).problems)
    assert "encoding" in codes
    assert "alias" in codes


def test_a_deployments_folder_that_is_a_link_or_a_file_is_exit_2_with_one_line(
        tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "root.yaml").write_text("dag_id: root\nowner: t\n")
    (tmp_path / "airflow-deployments").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="a symbolic link; links are never followed"):
        read_directory_deployments(tmp_path / "pipelines")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "pipelines")])
    assert result.exit_code == 2
    (tmp_path / "airflow-deployments").unlink()
    (tmp_path / "airflow-deployments").write_text("not a folder")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "pipelines")])
    assert result.exit_code == 2
    assert "not a directory" in result.output


def test_the_folder_is_read_from_a_commit_and_from_the_index(tmp_path: Path) -> None:
    from reconciler.adapters.sources import open_repo, resolve_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                        "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    pipelines = write_case(tmp_path, {"af2.yaml": AF2})
    git("add", "-A")
    git("commit", "-qm", "one")
    (tmp_path / "airflow-deployments" / "af3.yaml").write_text(AF3)  # not staged
    repo = open_repo(tmp_path)
    commit = resolve_commit(repo, "HEAD")
    assert [f.path for f in read_tree_deployments(repo, commit, "pipelines")] == [
        "airflow-deployments/af2.yaml"]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert [f.path for f in read_index_deployments("pipelines")] == [
            "airflow-deployments/af2.yaml"]
    finally:
        os.chdir(cwd)
    assert [f.path for f in read_directory_deployments(pipelines)] == [
        f"{tmp_path}/airflow-deployments/af2.yaml", f"{tmp_path}/airflow-deployments/af3.yaml"]
    # A commit without the folder: nothing declared, never an error.
    git("rm", "-rq", "airflow-deployments")
    git("commit", "-qm", "two")
    assert read_tree_deployments(repo, resolve_commit(repo, "HEAD"), "pipelines") == []


def test_no_credential_is_ever_echoed() -> None:
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "reconciler"), "validate",
         str(DATA / "invalid" / "deployment_secret_in_git" / "pipelines"), "-o", "json"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "hunter2" not in proc.stdout + proc.stderr
    assert {p["code"] for p in json.loads(proc.stdout)["problems"]} >= {"secret-in-git"}


# --- the schema and the pairing checks say the same -----------------------------------

AUTHS = [
    {"kind": "password", "username": "u", "password_env": "P"},
    {"kind": "password", "username_env": "U", "password_file": "/p"},
    {"kind": "password", "username": "u"},
    {"kind": "password", "password_env": "P"},
    {"kind": "password", "username": "u", "username_env": "U", "password_env": "P"},
    {"kind": "password", "username": "u", "password_env": "P", "password_file": "/p"},
    {"kind": "password", "username": "u", "password_env": "P", "token_env": "T"},
    {"kind": "token", "token_env": "T"},
    {"kind": "token", "token_file": "/t"},
    {"kind": "token"},
    {"kind": "token", "token_env": "T", "token_file": "/t"},
    {"kind": "token", "token_env": "T", "username": "u"},
    {"kind": "none"},
    {"kind": "none", "token_file": "/t"},
    {"kind": "none", "username": "u"},
]


@pytest.mark.parametrize("auth", AUTHS, ids=[json.dumps(a, sort_keys=True) for a in AUTHS])
def test_the_schema_and_the_auth_pairing_checks_agree(auth: dict[str, str]) -> None:
    data = {"name": "af2", "url": "http://x.example.com", "auth": auth}
    editors = jsonschema.Draft202012Validator(schema()).is_valid(data)
    checked = check_deployment_files([SourceFile("airflow-deployments/af2.yaml",
                                                 yaml.safe_dump(data).encode())])
    assert editors == (not checked.problems), [str(p) for p in checked.problems]
    assert all(p.code == "auth" for p in checked.problems)


# --- generated graphs across deployments ----------------------------------------------

Expected = tuple[str, str, list[str]]
"""(deployment, dag_id, upstream names) of a generated pipeline."""
names = st.text(string.ascii_lowercase + string.digits + "_", min_size=1, max_size=12)


@st.composite
def deployed_graphs(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, Expected]]:
    """Files of a valid graph across 1-3 deployments (one the default, or none), some
    dag_ids in two deployments under two names, upstreams written as names, dag_ids or
    <deployment>/<dag_id>; and the expected (deployment, dag_id, upstream names) by name."""
    deployments = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    default = draw(st.sampled_from([None, *deployments]))
    out: dict[str, str] = {}
    for d in deployments:
        out[f"airflow-deployments/{d}.yaml"] = (
            f'name: "{d}"\nurl: http://{d.replace("_", "-")}.example.com\nauth: {{kind: none}}\n'
            + ("default: true\n" if d == default else ""))
    dag_ids = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    entries: list[tuple[str, str, str, bool]] = []  # (name, dag_id, deployment, explicit)
    for dag_id in dag_ids:
        homes = draw(st.lists(st.sampled_from(deployments), min_size=1, max_size=2, unique=True))
        for j, home in enumerate(homes):
            name = dag_id if j == 0 else f"{dag_id}__{home}"
            if any(e[0] == name for e in entries):
                continue
            # Without `deployment:` a file is in the default, and is named by its dag_id.
            explicit = home != default or name != dag_id or draw(st.booleans())
            entries.append((name, dag_id, home, explicit))
    expected: dict[str, Expected] = {}
    for i, (name, dag_id, home, explicit) in enumerate(entries):
        earlier = [e[0] for e in entries[:i]]
        ups = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)
                   if earlier else st.just([]))
        written = []
        for up in ups:
            _, up_dag, up_home, _ = next(e for e in entries if e[0] == up)
            # Plain only where it means one pipeline of the whole graph (else ambiguous).
            plain_ok = sum(1 for e in entries if up in (e[0], e[1])) == 1
            form = draw(st.sampled_from(["qualified", "plain"] if plain_ok else ["qualified"]))
            written.append(f"{up_home}/{up_dag}" if form == "qualified" else up)
        text = f'dag_id: "{dag_id}"\nowner: t\n'  # quoted: "0", "yes" are names here
        if explicit:
            text += f'deployment: "{home}"\n'
        if written:
            text += f"depends_on: {json.dumps(written)}\n"
        out[f"pipelines/{name}.yaml"] = text
        expected[name] = (home, dag_id, ups)
    return out, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deployed_graphs())
def test_generated_graphs_across_deployments_are_accepted_as_written(
        case: tuple[dict[str, str], dict[str, Expected]]) -> None:
    spec, expected = case
    pipes, deps = files(spec)
    result = check_files(pipes, deployments=deps)
    assert result.ok, ([str(p) for p in result.problems], spec)
    graph = result.graph
    assert graph is not None
    assert {n: (graph.deployment_of(n), graph[n].dag_id, sorted(graph.upstreams(n)))
            for n in graph.pipelines} == {n: (d, g, sorted(u)) for n, (d, g, u) in expected.items()}
    # Read back as written (depends_on order aside: the blob sorts it).
    back = Graph.from_compressed(graph.compressed())
    assert back.canonical_json() == graph.canonical_json()
    assert {n: back.deployment_of(n) for n in back.pipelines} == \
        {n: graph.deployment_of(n) for n in graph.pipelines}


def test_validate_names_the_declared_deployments_in_its_summary() -> None:
    from reconciler.core import report

    result = check_dir(TWO / "pipelines")
    assert report.to_text(result) == ("ok: 5 files, 5 pipelines, 5 dependencies, 1 root, "
                                      "2 deployments (af2, af3)\n")
    assert json.loads(report.to_json(result))["deployments"] == ["af2", "af3"]
    plain = check_dir(REPO / "pipelines")
    assert report.to_text(plain) == "ok: 7 files, 7 pipelines, 9 dependencies, 1 root\n"
    assert json.loads(report.to_json(plain))["deployments"] == []


def test_the_pictures_box_each_deployment_and_only_when_declared() -> None:
    from reconciler.core import render

    graph = graph_of(BASE | {"pipelines/load.yaml": "dag_id: load\nowner: t\n"
                                                    "deployment: af3\ndepends_on: [root]\n"})
    assert render.to_mermaid(graph) == (
        "flowchart LR\n"
        '    subgraph d_af2["af2"]\n        n_root(["root"])\n    end\n'
        '    subgraph d_af3["af3"]\n        n_load["load"]\n    end\n'
        "    n_root --> n_load\n")
    base = graph_of(BASE)
    picture = graph_diff.to_markdown(graph_diff.diff_graphs(base, graph), base, graph)
    assert '    subgraph d_af3["af3"]\n        n_load["load"]\n    end\n' in picture
    assert "class n_load moved" in picture
    plain = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n"})
    assert "subgraph" not in render.to_mermaid(plain)


def test_without_declarations_the_implicit_deployment_may_be_named_default() -> None:
    plain = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\n",
                      "pipelines/a.yaml": "dag_id: a\nowner: t\ndepends_on: [root]\n"})
    named = graph_of({"pipelines/root.yaml": "dag_id: root\nowner: t\ndeployment: default\n",
                      "pipelines/a.yaml": "dag_id: a\nowner: t\ndepends_on: [default/root]\n"})
    assert named.canonical_json() == plain.canonical_json()  # the same graph, the same bytes
    pipes, deps = files({"airflow-deployments/af2.yaml": AF2,
                         "pipelines/root.yaml": "dag_id: root\nowner: t\ndeployment: default\n"})
    # Once deployments are declared, `default` is only a name like any other.
    assert [p.code for p in check_files(pipes, deployments=deps).problems] == [
        "unknown-deployment"]


def test_validate_staged_reads_the_deployments_as_staged(tmp_path: Path) -> None:
    # The pre-commit hook's mode: a broken deployment file fixed only in the working tree
    # still fails; once the fix is staged, it passes.
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                        "-C", str(tmp_path), *args], check=True, capture_output=True)

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / ".venv" / "bin" / "reconciler"), "validate",
                               "--staged"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    git("init", "-q")
    write_case(tmp_path, {"af2.yaml": AF2.replace("password_env", "password")})
    git("add", "-A")
    (tmp_path / "airflow-deployments" / "af2.yaml").write_text(AF2)  # fixed, not staged
    proc = validate()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "\nairflow-deployments/af2.yaml:4:37: 'password': credentials never go in git" \
        in proc.stdout
    git("add", "-A")
    proc = validate()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "ok: 1 file, 1 pipeline, 0 dependencies, 1 root, 1 deployment (af2)\n"


def test_a_pipeline_folder_elsewhere_has_its_deployments_beside_it(tmp_path: Path) -> None:
    from reconciler.adapters.sources import open_repo, resolve_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                        "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    write_case(tmp_path / "deploy", {"af2.yaml": AF2})
    (tmp_path / "airflow-deployments").mkdir()  # at the top: not the one beside deploy/
    (tmp_path / "airflow-deployments" / "x.yaml").write_text("not: a deployment\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    repo = open_repo(tmp_path)
    commit = resolve_commit(repo, "HEAD")
    deps = read_tree_deployments(repo, commit, "deploy/pipelines")
    assert [f.path for f in deps] == ["deploy/airflow-deployments/af2.yaml"]
    result = CliRunner().invoke(main, ["graph", "--repo", str(tmp_path), "--rev", "HEAD",
                                       "deploy/pipelines", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert [d["name"] for d in json.loads(result.output)["deployments"]] == ["af2"]


def test_the_same_deployment_in_two_files_is_refused() -> None:
    checked = check_deployment_files([
        SourceFile("airflow-deployments/af2.yaml", AF2.encode()),
        SourceFile("airflow-deployments/af2.yml", AF2.replace("v1", "v2").encode())])
    assert [str(p) for p in checked.problems] == [
        "airflow-deployments/af2.yml:1:1: deployment 'af2' is defined twice: also in "
        "airflow-deployments/af2.yaml; keep one file"]
    assert checked.declared["af2"].api == "v1"
