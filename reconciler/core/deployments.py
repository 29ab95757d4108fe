"""Deployment files (airflow-deployments/<name>.yaml): from raw files to Deployments.

The folder sits beside the pipeline folder (`deployments_dir`), and its files are read by
the same reading rule and strict loader as pipeline files, so a symlink, a FIFO, an
oversized file or an alias is refused the same way. schemas/deployment.schema.json is the
format; the pairings of an auth kind with its credential sources are checked here too, so
that each refusal says what to write instead of jsonschema's "is not valid under any of
the given schemas". No credential is ever echoed: a value is only printed where it cannot
be one.
"""

from __future__ import annotations

import difflib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.core.graph import Deployment
from reconciler.core.problems import Problem
from reconciler.core.spec import _TYPE_NAMES, _describe, _where  # the same wording
from reconciler.core.yamlload import MAX_FILE_BYTES, Document, load_document

if TYPE_CHECKING:
    import jsonschema

    from reconciler.core.checks import SourceFile

DEPLOYMENTS_DIR = "airflow-deployments"
_REPO_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "deployment.schema.json"

# Credential sources of each auth kind: (what it needs exactly one of, its name in messages).
_USER = ("username", "username_env")
_PASSWORD = ("password_env", "password_file")
_TOKEN = ("token_env", "token_file")
_NEEDS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "password": ((_USER, "a user"), (_PASSWORD, "a password")),
    "token": ((_TOKEN, "a token"),),
    "none": (),
}
# Keys that would hold a secret in git, and where to say it belongs instead.
_SECRETS = {"password": "password_env or password_file", "token": "token_env or token_file",
            "secret": "password_env or password_file", "api_key": "token_env or token_file",
            "jwt": "token_env or token_file"}


def deployments_dir(pipelines_dir: str) -> str | None:
    """The deployments folder of a pipeline folder: its sibling `airflow-deployments`, in
    the same spelling (`pipelines` -> `airflow-deployments`, `/x/pipelines/` ->
    `/x/airflow-deployments`). None for a pipeline folder at the root of its tree (`.`,
    ``, `/`): the sibling would be inside it, where every YAML file is a pipeline."""
    text = pipelines_dir.replace("\\", "/").rstrip("/")
    normal = posixpath.normpath(text) if text else "."
    if normal in (".", "/") or normal.endswith("/..") or normal == "..":
        return None
    parent = posixpath.dirname(normal)
    return posixpath.join(parent, DEPLOYMENTS_DIR) if parent else DEPLOYMENTS_DIR


@cache
def schema() -> dict[str, Any]:
    """The deployment schema: the copy packaged in the wheel, else the checkout's."""
    packaged = resources.files("reconciler") / "schemas" / "deployment.schema.json"
    source = packaged if packaged.is_file() else _REPO_SCHEMA
    return json.loads(source.read_text(encoding="utf-8"))


@cache
def _validator() -> jsonschema.protocols.Validator:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


@dataclass
class DeploymentCheck:
    """The declared deployments (those whose file is valid), every file's name (a pipeline
    naming a deployment whose file is broken is not also told it is unknown), problems."""

    declared: dict[str, Deployment] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return bool(self.problems)

    @property
    def default(self) -> str | None:
        return next((d.name for d in self.declared.values() if d.default), None)


def check_deployment_files(files: Iterable[SourceFile], *,
                           max_file_bytes: int = MAX_FILE_BYTES) -> DeploymentCheck:
    """Every file of the deployments folder, checked; the valid ones declared (by name)."""
    out = DeploymentCheck()
    first_default: str | None = None
    first_path: dict[str, str] = {}
    for f in sorted(files, key=lambda f: f.path):
        stem = PurePosixPath(f.path.replace("\\", "/")).stem
        out.names.add(stem)
        if stem in first_path:  # af2.yaml and af2.yml, or the same name in two sub-folders
            out.problems.append(Problem(f.path, 1, 1, f"deployment {stem!r} is defined twice: "
                                        f"also in {first_path[stem]}; keep one file",
                                        "duplicate-deployment"))
            continue
        first_path[stem] = f.path
        if f.problem is not None:
            out.problems.append(f.problem)
            continue
        if f.real_size > max_file_bytes:
            out.problems.append(Problem(f.path, 1, 1, f"file is {f.real_size} bytes, over the "
                                        f"{max_file_bytes} byte limit for a deployment file",
                                        "too-large"))
            continue
        loaded = load_document(f.path, f.data, max_bytes=max_file_bytes)
        if isinstance(loaded, Problem):
            if loaded.code == "empty":
                loaded = Problem(f.path, 1, 1, "file is empty: expected a mapping with at "
                                 "least name, url and auth", "empty")
            out.problems.append(loaded)
            continue
        problems = [*loaded.problems, *_schema_problems(loaded), *_auth_problems(loaded)]
        data = loaded.data
        name = data.get("name")
        if isinstance(name, str) and name != stem and not loaded.is_refused(("name",)):
            line, col = loaded.position(("name",))
            problems.append(Problem(f.path, line, col, f"name {name!r} does not match the file "
                                    f"name {stem!r}; rename one of them", "file-name"))
        if data.get("default") is True:
            if first_default is not None:
                line, col = loaded.position(("default",))
                problems.append(Problem(f.path, line, col, "a second default deployment (also "
                                        f"{first_default}): pipelines without `deployment:` "
                                        "need one place; keep one `default: true`",
                                        "two-defaults"))
            else:
                first_default = f.path
        out.problems.extend(problems)
        if not problems:
            out.declared[stem] = Deployment.from_dict(data)
    out.problems.sort()
    return out


def _schema_problems(doc: Document) -> list[Problem]:
    """jsonschema's errors as the pipeline checks word them, at the offending node."""
    out: list[Problem] = []
    for error in _validator().iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if doc.is_refused(path) or "allOf" in error.schema_path:
            continue  # the loader said it already; auth pairings: _auth_problems says it
        line, col = doc.position(path)
        name = _where(path)
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in sorted(k for k in error.instance if k not in allowed):
                kline, kcol = doc.key_position((*path, key))
                if path == ("auth",) and key.lower() in _SECRETS:
                    out.append(Problem(doc.path, kline, kcol, f"{key!r}: credentials never go "
                                       "in git; name where the reconciler finds it "
                                       f"({_SECRETS[key.lower()]})", "secret-in-git"))
                    continue
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (f"; did you mean {close[0]!r}?" if close
                        else f"; allowed: {', '.join(allowed)}")
                out.append(Problem(doc.path, kline, kcol, f"unknown key {key!r}{hint}",
                                   "unknown-key"))
        elif error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            out.append(Problem(doc.path, line, col, f"missing required key {missing!r}",
                               "required"))
        elif error.validator == "type":
            expected = _TYPE_NAMES.get(str(error.validator_value), str(error.validator_value))
            out.append(Problem(doc.path, line, col, f"{name} must be {expected}, not "
                               f"{_describe(error.instance)}", "type"))
        elif error.validator == "enum":
            allowed_values = ", ".join(map(str, error.validator_value))
            out.append(Problem(doc.path, line, col, f"{name} must be one of {allowed_values}, "
                               f"not {_describe(error.instance)}", "enum"))
        elif path == ("url",):
            # Never echo a URL: it may hold the credentials this refusal is about.
            text = str(error.instance)
            authority = text.split("//", 1)[1].split("/", 1)[0] if "//" in text else text
            if error.validator == "pattern" and "@" in authority:
                out.append(Problem(doc.path, line, col, "url: credentials never go in git; "
                                   "remove user:password@ and name where the reconciler finds "
                                   "them under auth", "secret-in-git"))
            else:
                out.append(Problem(doc.path, line, col, "url must be an http:// or https:// "
                                   "URL without spaces or user:password@", "url"))
        elif error.validator == "pattern":
            out.append(Problem(doc.path, line, col, f"{name} {error.instance!r} may hold only "
                               + ("letters, digits, '_' (an environment variable name)"
                                  if name.endswith("_env") else "letters, digits, '_', '-'"),
                               "pattern"))
        elif error.validator == "maxLength":
            out.append(Problem(doc.path, line, col, f"{name} is {len(error.instance)} "
                               f"characters, at most {error.validator_value} allowed",
                               "too-long"))
        elif error.validator == "minLength":
            out.append(Problem(doc.path, line, col, f"{name} must not be empty", "empty-value"))
        else:
            out.append(Problem(doc.path, line, col, f"{name}: {error.message}", "schema"))
    return out


def _auth_problems(doc: Document) -> list[Problem]:
    """Each auth kind's credential sources: exactly one of each it needs, none of another
    kind's (the schema's allOf states the same for editors)."""
    auth = doc.data.get("auth")
    if not isinstance(auth, dict) or doc.is_refused(("auth",)):
        return []
    kind = auth.get("kind")
    if kind not in _NEEDS:
        return []  # the schema reports a missing or unknown kind
    out: list[Problem] = []
    line, col = doc.position(("auth", "kind"))
    wanted: set[str] = set()
    for sources, what in _NEEDS[kind]:
        wanted.update(sources)
        given = [k for k in sources if k in auth]
        if not given:
            out.append(Problem(doc.path, line, col, f"auth kind {kind} needs {what}: "
                               f"{' or '.join(sources)}", "auth"))
        elif len(given) > 1:
            kline, kcol = doc.key_position(("auth", given[1]))
            out.append(Problem(doc.path, kline, kcol, f"auth has both {given[0]} and "
                               f"{given[1]}: keep one", "auth"))
    for key in sorted(set(auth) - wanted - {"kind"}):
        if key in (*_USER, *_PASSWORD, *_TOKEN):
            kline, kcol = doc.key_position(("auth", key))
            out.append(Problem(doc.path, kline, kcol, f"{key} is not used by auth kind "
                               f"{kind}: remove it, or change the kind", "auth"))
    return out
