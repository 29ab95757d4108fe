"""`reconciler graph` and `reconciler diff`, on real git repositories made in the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.diff import COMMENT_LIMIT, diff_graphs, to_markdown
from reconciler.core.graph import Graph, Pipeline
from tests.helpers import example_repo, git

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose first commit holds the shipped example graph."""
    return example_repo(tmp_path)


def write(repo: Path, name: str, text: str) -> None:
    (repo / "pipelines" / f"{name}.yaml").write_text(text)


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def test_graph_mermaid_lists_roots_first_in_stable_order(repo: Path) -> None:
    proc = run("graph", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "flowchart LR"
    assert lines[1] == '    n_01_pipeline_init(["01_pipeline_init"])'
    nodes = [line.strip().split("[")[0].rstrip("(") for line in lines[1:8]]
    assert nodes == ["n_01_pipeline_init", "n_02_pipeline", "n_03_pipeline", "n_04_pipeline",
                     "n_05_pipeline", "n_06_pipeline", "n_07_pipeline"]
    assert lines[8:] == [
        "    n_01_pipeline_init --> n_02_pipeline",
        "    n_01_pipeline_init --> n_03_pipeline",
        "    n_01_pipeline_init --> n_04_pipeline",
        "    n_01_pipeline_init --> n_05_pipeline",
        "    n_02_pipeline --> n_06_pipeline",
        "    n_03_pipeline --> n_06_pipeline",
        "    n_04_pipeline --> n_06_pipeline",
        "    n_05_pipeline --> n_06_pipeline",
        "    n_06_pipeline --> n_07_pipeline",
    ]
    assert run("graph", cwd=repo).stdout == proc.stdout  # stable


def test_graph_dot_and_json(repo: Path) -> None:
    assert run("graph", "-o", "dot", cwd=repo).stdout == run("graph", "--output", "dot",
                                                              cwd=repo).stdout
    dot = run("graph", "--format", "dot", cwd=repo).stdout
    assert dot.startswith("digraph pipelines {")
    assert '    "01_pipeline_init" [shape=oval];' in dot
    assert '    "06_pipeline" -> "07_pipeline";' in dot
    data = json.loads(run("graph", "--format", "json", cwd=repo).stdout)
    assert data["kind"] == "Graph"
    assert data["roots"] == ["01_pipeline_init"]
    assert data["layers"] == [["01_pipeline_init"],
                              ["02_pipeline", "03_pipeline", "04_pipeline", "05_pipeline"],
                              ["06_pipeline"], ["07_pipeline"]]
    assert len(data["edges"]) == 9
    assert data["digest"].startswith("sha256:")


def test_graph_from_a_commit_ignores_the_working_tree(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    write(repo, "08_pipeline", "dag_id: 08_pipeline\nowner: x\ndepends_on: [07_pipeline]\n")
    from_tree = json.loads(run("graph", "--format", "json", cwd=repo).stdout)
    from_commit = json.loads(run("graph", "--format", "json", "--rev", "HEAD", cwd=repo).stdout)
    assert len(from_tree["pipelines"]) == 8
    assert len(from_commit["pipelines"]) == 7
    assert from_commit["commit"] == first


def test_graph_of_invalid_files_exits_1(repo: Path) -> None:
    write(repo, "07_pipeline", "dag_id: 07_pipeline\nowner: x\ndepends_on: [nope]\n")
    proc = run("graph", cwd=repo)
    assert proc.returncode == 1
    assert "pipelines/07_pipeline.yaml:3:14: depends_on names 'nope'" in proc.stdout
    assert proc.stderr.startswith("error: the pipeline files at pipelines are invalid")


def _change_the_example(repo: Path) -> tuple[str, str]:
    base = git(repo, "rev-parse", "HEAD")
    write(repo, "06_pipeline", "dag_id: 06_pipeline\nowner: team-dwh\n"
          "depends_on: [02_pipeline, 03_pipeline, 04_pipeline]\nconf: {target: mart}\n")
    write(repo, "08_pipeline", "dag_id: 08_pipeline\nowner: team-new\n"
          "depends_on: [07_pipeline]\n")
    (repo / "pipelines" / "02_pipeline.yaml").unlink()
    write(repo, "06_pipeline", "dag_id: 06_pipeline\nowner: team-dwh\n"
          "depends_on: [03_pipeline, 04_pipeline]\nconf: {target: mart}\n")
    write(repo, "05_pipeline", "dag_id: 05_pipeline\nowner: team-ingest\n"
          "depends_on: [01_pipeline_init]\nenabled: false\n")
    return base, commit(repo, "change")


def test_diff_json_names_every_change(repo: Path) -> None:
    base, head = _change_the_example(repo)
    proc = run("diff", "--base", base, "--format", "json", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert (d["base"], d["head"]) == (base, head)
    assert d["added"] == ["08_pipeline"]
    assert d["removed"] == ["02_pipeline"]
    changed = {c["dag_id"]: {f["field"] for f in c["changes"]} for c in d["changed"]}
    assert changed == {"05_pipeline": {"enabled", "description"},
                       "06_pipeline": {"depends_on", "description"}}
    assert d["edges_added"] == [{"upstream": "07_pipeline", "downstream": "08_pipeline"}]
    assert sorted((e["upstream"], e["downstream"]) for e in d["edges_removed"]) == [
        ("01_pipeline_init", "02_pipeline"), ("02_pipeline", "06_pipeline"),
        ("05_pipeline", "06_pipeline")]
    affected = {a["dag_id"]: a for a in d["affected"]}
    assert set(affected) == {"06_pipeline", "07_pipeline"}
    assert affected["07_pipeline"]["lost_upstreams"] == ["02_pipeline", "05_pipeline"]


def test_diff_markdown_highlights_changed_edges(repo: Path) -> None:
    base, _ = _change_the_example(repo)
    md = run("diff", "--base", base, cwd=repo).stdout
    assert md.startswith(f"### Pipeline graph: `{base[:12]}` → ")
    assert "| ➕ | `08_pipeline` | added (owner team-new) |" in md
    assert "| ➖ | `02_pipeline` | removed |" in md
    assert "- ➕ `07_pipeline` → `08_pipeline`" in md
    assert "- `07_pipeline`: no longer runs after 02_pipeline, 05_pipeline" in md
    mermaid = md.split("```mermaid\n")[1].split("```")[0].splitlines()
    edges = [line.strip() for line in mermaid if "-->" in line or "-.-x" in line]
    added_index = edges.index("n_07_pipeline --> n_08_pipeline")
    removed_index = edges.index("n_05_pipeline -.-x n_06_pipeline")
    assert f"    linkStyle {added_index} stroke:#1a7f37,stroke-width:3px" in mermaid
    assert f"    linkStyle {removed_index} stroke:#cf222e,stroke-width:2px" in mermaid
    assert "    class n_08_pipeline added" in mermaid
    assert "    class n_02_pipeline removed" in mermaid


def test_diff_reads_commits_not_the_working_tree(repo: Path) -> None:
    write(repo, "08_pipeline", "dag_id: 08_pipeline\nowner: x\ndepends_on: [07_pipeline]\n")
    proc = run("diff", "--base", "HEAD", "--format", "text", cwd=repo)
    assert proc.returncode == 0
    assert proc.stdout == "no change to the pipeline graph\n"


def test_diff_against_a_commit_without_pipelines_adds_everything(tmp_path: Path) -> None:
    # The first pull request of a repository: its base has no pipelines/ folder yet.
    repo = tmp_path / "new"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "README").write_text("x")
    empty = commit(repo, "empty")
    shutil.copytree(REPO / "pipelines", repo / "pipelines")
    commit(repo, "pipelines")
    d = json.loads(run("diff", "--base", empty, "--format", "json", cwd=repo).stdout)
    assert d["kind"] == "GraphDiff"
    assert len(d["added"]) == 7
    assert d["affected"] == []


def test_diff_of_a_change_that_removes_the_folder_removes_everything(repo: Path) -> None:
    git(repo, "rm", "-rq", "pipelines")
    commit(repo, "no more pipelines")
    d = json.loads(run("diff", "--base", "HEAD~1", "-o", "json", cwd=repo).stdout)
    assert len(d["removed"]) == 7


def test_diff_between_unrelated_histories_is_refused(repo: Path) -> None:
    git(repo, "checkout", "-q", "--orphan", "other")
    (repo / "README").write_text("x")
    other = commit(repo, "unrelated")
    git(repo, "checkout", "-q", "main")
    proc = run("diff", "--base", other, cwd=repo)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {other[:12]} and {git(repo, 'rev-parse', 'HEAD')[:12]} "
                           "have no common ancestor (unrelated histories): nothing to compare "
                           "the change with\n")


def test_diff_base_is_the_merge_base_like_git_diff_three_dots(repo: Path) -> None:
    # A branch made before main gained 08_pipeline: main's change is not the branch's.
    git(repo, "checkout", "-q", "-b", "feature")
    write(repo, "07_pipeline", "dag_id: 07_pipeline\nowner: team-x\ndepends_on: [06_pipeline]\n")
    feature = commit(repo, "feature: new owner of 07")
    git(repo, "checkout", "-q", "main")
    write(repo, "08_pipeline", "dag_id: 08_pipeline\nowner: x\ndepends_on: [07_pipeline]\n")
    main_tip = commit(repo, "main: 08")
    git(repo, "checkout", "-q", "feature")
    d = json.loads(run("diff", "--base", "main", "-o", "json", cwd=repo).stdout)
    assert d["removed"] == []  # two-dot compared main's tip and showed 08 as removed
    assert [c["dag_id"] for c in d["changed"]] == ["07_pipeline"]
    assert (d["base_tip"], d["head"]) == (main_tip, feature)
    assert d["base"] == git(repo, "merge-base", "main", "feature")
    md = run("diff", "--base", "main", cwd=repo).stdout
    assert md.splitlines()[0] == (f"### Pipeline graph: `{d['base'][:12]}` → `{feature[:12]}` "
                                  f"(merge base with `{main_tip[:12]}`)")


def test_diff_exit_code_says_whether_the_graph_changed(repo: Path) -> None:
    assert run("diff", "--base", "HEAD", "--exit-code", cwd=repo).returncode == 0
    base, _ = _change_the_example(repo)
    changed = run("diff", "--base", base, "--exit-code", "-o", "text", cwd=repo)
    assert changed.returncode == 1
    assert changed.stdout.startswith("+ pipeline 08_pipeline\n")
    assert changed.stderr == ""
    assert run("diff", "--base", base, cwd=repo).returncode == 0  # without the flag


def test_diff_with_an_invalid_head_exits_1_and_names_the_file(repo: Path) -> None:
    write(repo, "07_pipeline", "dag_id: 07_pipeline\nowner: x\nenabled: yes\n")
    commit(repo, "broken")
    proc = run("diff", "--base", "HEAD~1", cwd=repo)
    assert proc.returncode == 1
    assert "pipelines/07_pipeline.yaml:3:10: 'yes' is a YAML 1.1 boolean" in proc.stdout


def test_diff_unknown_revision_exits_2(repo: Path) -> None:
    proc = run("diff", "--base", "no-such-branch", cwd=repo)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 'no-such-branch' is not a commit")
    assert "Traceback" not in proc.stderr


def p(dag_id: str, *ups: str, **kw: object) -> Pipeline:
    return Pipeline(dag_id, owner="t", depends_on=ups, **kw)  # type: ignore[arg-type]


def test_affected_means_a_changed_transitive_upstream_set() -> None:
    base = Graph([p("a"), p("b", "a"), p("c", "b"), p("x")])
    head = Graph([p("a"), p("b", "a", "x"), p("c", "b"), p("x")])
    d = diff_graphs(base, head)
    assert [(a.dag_id, a.gained_upstreams) for a in d.affected] == [
        ("b", ("x",)), ("c", ("x",))]


def test_disabling_an_upstream_affects_its_downstreams() -> None:
    base = Graph([p("a"), p("b", "a"), p("c", "b")])
    head = Graph([p("a"), p("b", "a", enabled=False), p("c", "b")])
    d = diff_graphs(base, head)
    assert [(a.dag_id, a.changed_upstreams) for a in d.affected] == [("c", ("b",))]


def test_redundant_edge_changes_no_ancestor_set() -> None:
    base = Graph([p("a"), p("b", "a"), p("c", "b")])
    head = Graph([p("a"), p("b", "a"), p("c", "a", "b")])
    d = diff_graphs(base, head)
    assert d.edges_added == [("a", "c")]
    assert d.affected == []


def chain(n: int, *, extra_root: bool = False) -> Graph:
    nodes = [p("c00000")] + [p(f"c{i:05d}", f"c{i - 1:05d}") for i in range(1, n)]
    if extra_root:
        nodes[0] = p("c00000", "new_root")
        nodes.append(p("new_root"))
    return Graph(nodes)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_affected_equals_the_per_pipeline_ancestor_walk(data: st.DataObject) -> None:
    # The one-pass bitsets give what comparing ancestors() of each pipeline gave.
    def graph() -> Graph:
        ids = data.draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8))
        nodes = []
        for i, d in enumerate(ids):
            ups = data.draw(st.lists(st.sampled_from(ids[:i]), unique=True)) if i else []
            nodes.append(p(d, *ups, enabled=data.draw(st.booleans())))
        return Graph(nodes)

    base, head = graph(), graph()
    d = diff_graphs(base, head)
    behaviour = {c.dag_id for c in d.changed if {f.field for f in c.changes} & {"enabled"}}
    expected = []
    for dag_id in head.topological_order():
        if dag_id not in base:
            continue
        before, after = base.ancestors(dag_id), head.ancestors(dag_id)
        ups = tuple(sorted(after & behaviour))
        if before != after or ups:
            expected.append((dag_id, tuple(sorted(after - before)),
                             tuple(sorted(before - after)), ups))
    assert [(a.dag_id, a.gained_upstreams, a.lost_upstreams, a.changed_upstreams)
            for a in d.affected] == expected


def test_a_deep_chain_diff_is_linear_and_its_comment_fits() -> None:
    base, head = chain(3000), chain(3000, extra_root=True)
    d = diff_graphs(base, head)
    assert len(d.affected) == 3000
    assert all(a.gained_upstreams == ("new_root",) for a in d.affected)
    full = to_markdown(d, base, head)
    assert len(full) > COMMENT_LIMIT
    capped = to_markdown(d, base, head, max_chars=60_000)
    assert len(capped) <= 60_000
    assert "more not shown" in capped
    assert "Cut to fit a comment" in capped
    assert "the full diff is in the job summary" in capped
    assert capped.splitlines()[0] == full.splitlines()[0]
    # a small diff is not touched by the cap
    small_base, small_head = chain(3), chain(3, extra_root=True)
    small = diff_graphs(small_base, small_head)
    assert to_markdown(small, small_base, small_head, max_chars=60_000) == to_markdown(
        small, small_base, small_head)


def test_diff_cli_max_chars(repo: Path) -> None:
    base, _ = _change_the_example(repo)
    full = run("diff", "--base", base, cwd=repo).stdout
    cut = run("diff", "--base", base, "--max-chars", "2000", cwd=repo)
    assert cut.returncode == 0, cut.stderr
    assert len(full) > 2000 >= len(cut.stdout)
    assert "Cut to fit a comment" in cut.stdout
    too_small = run("diff", "--base", base, "--max-chars", "100", cwd=repo)
    assert (too_small.returncode, too_small.stderr) == (
        2, "error: --max-chars: at least 2000 (or 0 for no limit)\n")
