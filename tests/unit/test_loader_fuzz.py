"""Property tests: whatever bytes a pipeline file holds, loading and checking never raise.

`load_document`, `check_files` and `reconciler validate` must either accept a file or
report clean Problems: the path that was given, line and column >= 1 and inside the file,
a message and a code. Inputs are (a) valid pipeline graphs built from the schema's keys,
dumped with yaml.safe_dump (these must be accepted, with the same data), then mutated
(byte flips, truncations, YAML-significant characters, control bytes, duplicated lines,
`---`, deep nesting, huge numbers, anchors and aliases), (b) arbitrary bytes, (c) text.
Targeted examples cover the alias bomb, 10,000-deep nesting and the file-size limit.
"""

from __future__ import annotations

import re
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.core.checks import CheckResult, SourceFile, check_files
from reconciler.core.problems import Problem
from reconciler.core.spec import schema
from reconciler.core.yamlload import MAX_DEPTH, MAX_FILE_BYTES, Document, load_document

T = TypeVar("T")
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
PROPS = schema()["properties"]

def guarded(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return func(*args, **kwargs)


# --- what a clean problem is ---------------------------------------------------------

def _max_line(raw: bytes) -> int:
    # YAML breaks lines at \n, \r, NEL, LS and PS; str.splitlines() knows a superset.
    text = raw.decode("utf-8", errors="replace")
    return max(raw.count(b"\n"), len(text.splitlines())) + 1


def assert_clean(problem: Problem, files: dict[str, bytes]) -> None:
    assert isinstance(problem, Problem)
    assert problem.path in files, problem
    assert isinstance(problem.line, int)
    assert isinstance(problem.column, int)
    raw = files[problem.path]
    assert 1 <= problem.line <= _max_line(raw), (problem, raw)
    assert 1 <= problem.column <= len(raw) + 1, (problem, raw)
    assert problem.message.strip(), problem
    assert "\n" not in problem.message, problem
    assert re.fullmatch(r"[a-z0-9-]+", problem.code), problem
    assert str(problem).startswith(f"{problem.path}:{problem.line}:{problem.column}: ")


def load_clean(raw: bytes, path: str = "pipelines/p.yaml") -> Document | Problem:
    loaded = guarded(load_document, path, raw)
    if isinstance(loaded, Problem):
        assert_clean(loaded, {path: raw})
    else:
        assert isinstance(loaded, Document)
        assert isinstance(loaded.data, dict)
        for problem in loaded.problems:  # refusals that did not stop loading
            assert_clean(problem, {path: raw})
        for line, column in [*loaded.positions.values(), *loaded.key_positions.values()]:
            assert 1 <= line <= _max_line(raw)
            assert column >= 1
    return loaded


def check_clean(files: dict[str, bytes]) -> CheckResult:
    result = guarded(check_files, [SourceFile(p, d) for p, d in files.items()])
    assert result.files == len(files)
    for problem in result.problems:
        assert_clean(problem, files)
    assert (result.graph is not None) == result.ok
    return result


# --- strategies ----------------------------------------------------------------------

dag_ids = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=40)
texts = st.text(max_size=60)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | texts)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
confs = st.dictionaries(texts.filter(lambda k: k != "reconciler"), json_values, max_size=4)


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """A valid graph: unique ids (one per file name), each depending on earlier ones."""
    ids = draw(st.lists(dag_ids, min_size=1, max_size=5, unique_by=str.lower))
    out = {}
    for index, dag_id in enumerate(ids):
        spec: dict[str, Any] = {"dag_id": dag_id, "owner": draw(texts.filter(str.strip)
                                                                  | st.just("team-dwh"))}
        optional = {
            "description": texts,
            "depends_on": st.lists(st.sampled_from(ids[:index]), unique=True, max_size=3)
            if index else st.just([]),
            "trigger_rule": st.sampled_from(PROPS["trigger_rule"]["enum"]),
            "enabled": st.booleans(),
            "backfill": st.booleans(),
            "conf": confs,
        }
        # Follows the schema; `deployment` needs declared deployments beside the graph:
        # tests/unit/test_deployments.py generates graphs across deployments.
        assert set(optional) | {"dag_id", "owner", "deployment"} == set(PROPS)
        for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
            spec[key] = draw(optional[key])
        out[dag_id] = spec
    return out


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (*_texts(k), *_texts(v))]
    if isinstance(value, list):
        return [t for item in value for t in _texts(item)]
    return []


def dump(spec: dict[str, Any], flow: bool | None) -> bytes:
    text = yaml.safe_dump(spec, default_flow_style=flow, sort_keys=False,
                          allow_unicode=True, width=80)
    return text.encode("utf-8")


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    graph = draw(graphs())
    suffix = draw(st.sampled_from([".yaml", ".yml"]))
    files = {f"pipelines/{dag_id}{suffix}": dump(spec, draw(st.sampled_from([None, False])))
             for dag_id, spec in graph.items()}
    return graph, files


SIGNIFICANT = [*":-[]{}&*!|>'\"%@`#,?~", "\n", "\t", "\r", " ", "\x00", "\x85", "\u2028",
               "\ufeff", "---\n", "...\n", "- ", ": ", "? ", "&a ", "*a", "!!str ", "!!int ",
               "!!float ", "!!python/object:os.system ", "!custom ", "<<: ", "%YAML 1.1\n",
               "%TAG ! tag:yaml.org,2002:\n", "0x_", "0o", "1_000", "12:30", "yes", "~",
               ".inf", ".nan", "2001-12-14", "\\u0000", "\"\\x00\"", "'", "dag_id: x\n"]


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Apply 1 to 4 edits that a careless hand, an editor or an attacker could make."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "raw", "delete",
                                   "duplicate-line", "document", "nest", "number", "alias"]))
        if op == "flip" and out:
            at = min(at, len(out) - 1)
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.sampled_from(SIGNIFICANT)).encode("utf-8")
        elif op == "raw":
            out[at:at] = draw(st.binary(min_size=1, max_size=4)
                              | st.sampled_from([b"\x00", b"\xff", b"\xfe\xff", b"\xc3"]))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 20))]
        elif op == "duplicate-line":
            lines = bytes(out).splitlines(keepends=True)
            if lines:
                index = draw(st.integers(0, len(lines) - 1))
                lines.insert(index, lines[index])
                out = bytearray(b"".join(lines))
        elif op == "document":
            out[at:at] = draw(st.sampled_from([b"\n---\n", b"---\n", b"\n...\n", b"--- "]))
        elif op == "nest":
            depth = draw(st.sampled_from([MAX_DEPTH, MAX_DEPTH + 1, 200, 2000, 10_000]))
            bracket = draw(st.sampled_from([b"[", b"{a: ", b"- "]))
            out[at:at] = bracket * depth
        elif op == "number":
            digits = draw(st.sampled_from([20, 400, 4300, 5000]))
            out[at:at] = b"9" * digits + draw(st.sampled_from([b"", b".5", b"e999", b"0e-9"]))
        elif op == "alias":
            out[at:at] = draw(st.sampled_from([b"&x ", b"*x", b"&x [*x]", b"<<: *x\n"]))
    return bytes(out)


@st.composite
def mutated_files(draw: st.DrawFn) -> dict[str, bytes]:
    _, files = draw(valid_files())
    path = draw(st.sampled_from(sorted(files)))
    files[path] = draw(mutations(files[path]))
    return files


yamlish_text = st.lists(st.sampled_from(
    [*"abcdx019 .:-[]{}&*!|>'\"%@`#,?~\n\t\r", "dag_id", "owner", "depends_on", "conf",
     "\x00", "\x85", "\ufeff", "é", "🙂", *SIGNIFICANT]), max_size=80).map("".join)


# --- properties ----------------------------------------------------------------------

@FUZZ
@given(valid_files())
def test_generated_valid_graphs_are_accepted_with_the_same_data(
    case: tuple[dict[str, dict[str, Any]], dict[str, bytes]],
) -> None:
    graph, files = case
    for path, raw in files.items():
        loaded = load_clean(raw, path)
        assert isinstance(loaded, Document), loaded
        # PyYAML's reading is the oracle. It can differ from what was dumped: safe_dump
        # writes NEL, LS and PS raw inside quotes, where reading folds them into a space.
        assert loaded.data == yaml.safe_load(raw)
        if not any(set(text) & set("\x85\u2028\u2029") for text in _texts(graph)):
            assert loaded.data == graph[loaded.data["dag_id"]]
    result = check_clean(files)
    assert result.ok, [str(p) for p in result.problems]
    assert result.graph is not None
    assert len(result.graph) == len(graph)


@FUZZ
@given(mutated_files())
def test_mutated_pipeline_files_are_accepted_or_refused_cleanly(files: dict[str, bytes]) -> None:
    for path, raw in files.items():
        load_clean(raw, path)
    check_clean(files)


@FUZZ
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\xff\xfe")
@example(b"\x00")
@example(b"\xef\xbb\xbf")  # a UTF-8 byte order mark and nothing else
def test_arbitrary_bytes_are_refused_or_accepted_cleanly(raw: bytes) -> None:
    load_clean(raw)
    check_clean({"pipelines/p.yaml": raw})


@FUZZ
@given(st.text(max_size=500) | yamlish_text)
@example("dag_id: p\nowner: x\n")
@example("- a\n- b\n")
@example("? [a, b]\n: c\n")
def test_arbitrary_text_is_refused_or_accepted_cleanly(text: str) -> None:
    raw = text.encode("utf-8", errors="surrogatepass")
    load_clean(raw)
    check_clean({"pipelines/p.yaml": raw})


PROBLEM_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(files=mutated_files())
def test_validate_cli_on_mutated_files_prints_problems_or_ok(
    files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    for path, raw in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(raw)
    folder = root / "pipelines"
    result = guarded(CliRunner().invoke, main, ["validate", str(folder)],
                     catch_exceptions=False)
    *problem_lines, summary = result.output.splitlines()
    if result.exit_code == 0:
        assert problem_lines == []
        assert summary.startswith("ok: ")
    else:
        assert result.exit_code == 1, result.output
        assert re.fullmatch(r"\d+ problem\(s\) in \d+ file\(s\)", summary), result.output
        assert problem_lines
        for line in problem_lines:
            match = PROBLEM_LINE.match(line)
            assert match, line
            assert Path(match["path"]).relative_to(root).as_posix() in files
            assert int(match["line"]) >= 1
            assert int(match["col"]) >= 1


# --- targeted examples ---------------------------------------------------------------

def first_problem(loaded: Document | Problem) -> Problem:
    """The problem that stopped loading, or the first one recorded while loading went on."""
    if isinstance(loaded, Problem):
        return loaded
    assert loaded.problems, loaded
    return loaded.problems[0]


def _refused(raw: bytes, code: str, **kwargs: Any) -> Problem:
    problem = first_problem(load_document("pipelines/p.yaml", raw, **kwargs))
    assert_clean(problem, {"pipelines/p.yaml": raw})
    assert problem.code == code, problem
    return problem


def test_billion_laughs_is_refused_as_an_alias() -> None:
    rows = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    raw = ("dag_id: p\nowner: x\nconf:\n" + "".join(f"  {r}\n" for r in rows)).encode()
    problem = _refused(raw, "alias")
    assert (problem.line, problem.column) == (5, 14)  # the first *l0


@pytest.mark.parametrize("opening", ["[", "{a: ", "- "])
def test_ten_thousand_deep_nesting_is_refused_not_a_recursion_error(opening: str) -> None:
    # "- " * 10,000 is a block sequence nested 10,000 deep on one line.
    raw = f"dag_id: p\nowner: x\nconf:\n  n: {opening * 10_000}x\n".encode()
    assert len(raw) <= MAX_FILE_BYTES
    problem = _refused(raw, "yaml-syntax")
    assert problem.line == 4


def test_nesting_just_past_the_loaders_own_limit_is_refused_at_the_value() -> None:
    def nested(depth: int) -> bytes:
        return f"dag_id: p\nowner: x\nconf: {'[' * depth}{']' * depth}\n".encode()

    assert isinstance(load_document("pipelines/p.yaml", nested(MAX_DEPTH)), Document)
    problem = _refused(nested(MAX_DEPTH + 1), "too-deep")
    assert problem.line == 3


def test_a_file_just_over_the_size_limit_is_refused_and_one_at_the_limit_is_read() -> None:
    head = b"dag_id: p\nowner: x\n#"
    at_limit = head + b"x" * (MAX_FILE_BYTES - len(head))
    assert len(at_limit) == MAX_FILE_BYTES
    assert isinstance(load_document("pipelines/p.yaml", at_limit), Document)
    problem = _refused(at_limit + b"x", "too-large")
    assert (problem.line, problem.column) == (1, 1)
    assert str(MAX_FILE_BYTES) in problem.message


# Crashes the properties above once found in the loader; each must be a clean Problem.
LOADER_CRASHES = {
    "hex-int-without-digits": b"dag_id: p\nowner: x\nconf: {n: 0x_}\n",
    "binary-int-without-digits": b"dag_id: p\nowner: x\nconf: {n: -0b__}\n",
    "explicit-int-tag-on-text": b"dag_id: p\nowner: x\nconf: {n: !!int abc}\n",
    "explicit-float-tag-on-text": b"dag_id: p\nowner: x\nconf: {n: !!float abc}\n",
    "explicit-int-tag-on-quoted-text": b"dag_id: p\nowner: x\nconf: {n: !!int 'zz'}\n",
    "explicit-int-tag-without-value": b"dag_id: p\nowner: x\nconf:\n  n: !!int\n",
    "int-over-4300-digits": b"dag_id: p\nowner: x\nconf: {n: " + b"9" * 4301 + b"}\n",
}
@pytest.mark.parametrize("raw", LOADER_CRASHES.values(), ids=LOADER_CRASHES.keys())
def test_known_loader_crash_returns_a_problem(raw: bytes) -> None:
    loaded = first_problem(load_document("pipelines/p.yaml", raw))
    assert_clean(loaded, {"pipelines/p.yaml": raw})
    value_line = next(i for i, row in enumerate(raw.splitlines(), 1) if b"n:" in row)
    assert loaded.line == value_line, loaded


def test_validate_cli_prints_one_line_not_a_traceback_on_a_loader_crash(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "p.yaml").write_bytes(LOADER_CRASHES["hex-int-without-digits"])
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(folder)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{folder}/p.yaml:3:")
