"""One pipeline file against the JSON Schema: from a loaded YAML document to a Pipeline.

The schema (schemas/pipeline.schema.json) is the single source of the file format; this
module only turns jsonschema's errors into messages anchored at the offending YAML node.

Speed: jsonschema walks every keyword of every file (7 s of a 17 s validate at 50,000
files). Valid files are the common case, so the schema is also compiled (`_compile`) into
one plain predicate that answers "certainly valid" for the keywords this schema uses;
only a file it does not vouch for goes through jsonschema, which then produces the
messages. The predicate is conservative (False means "ask jsonschema", never "invalid"),
and a schema using any keyword it does not know compiles to None: jsonschema for all.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from reconciler.core.graph import Pipeline
from reconciler.core.problems import Problem
from reconciler.core.yamlload import Document

_REPO_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "pipeline.schema.json"


@cache
def schema() -> dict[str, Any]:
    """The pipeline schema: the copy packaged in the wheel, else the checkout's (editable)."""
    packaged = resources.files("reconciler") / "schemas" / "pipeline.schema.json"
    source = packaged if packaged.is_file() else _REPO_SCHEMA
    return json.loads(source.read_text(encoding="utf-8"))


@cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


Predicate = Callable[[Any], bool]

# Keywords that only annotate: they never make an instance invalid.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default",
                          "examples", "deprecated", "readOnly", "writeOnly"})
_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "array": list,
                                              "object": dict}


def _compile(node: Any) -> Predicate | None:
    """A predicate true only for instances that `node` (a schema) certainly accepts, or
    None when the schema uses a keyword outside the subset below (then jsonschema decides
    everything). Each check mirrors jsonschema's for the same keyword; where jsonschema's
    rule is subtler (enum and const compare 1 and True apart, integers, formats) only the
    plain string case is vouched for. One closure per schema node, its checks inline: a
    closure per keyword cost as much as jsonschema saved."""
    if not isinstance(node, dict):
        return None
    typ: type | tuple[type, ...] | None = None
    min_len = max_len = None
    search: Callable[[str], Any] | None = None
    allowed: frozenset[str] | None = None
    unique = False
    item: Predicate | None = None
    required: tuple[str, ...] = ()
    props: dict[str, Predicate] = {}
    closed = False
    reserved: str | None = None
    for keyword, value in node.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "type" and isinstance(value, str) and value in _TYPES:
            typ = _TYPES[value]
        elif keyword in ("minLength", "maxLength") and type(value) is int:
            if keyword == "minLength":
                min_len = value
            else:
                max_len = value
        elif keyword == "pattern" and isinstance(value, str):
            search = re.compile(value).search  # jsonschema uses re.search too
        elif keyword == "enum" and isinstance(value, list) and all(
                isinstance(v, str) for v in value):
            allowed = frozenset(value)
        elif keyword == "uniqueItems" and isinstance(value, bool):
            unique = value
        elif keyword == "items":
            item = _compile(value)
            if item is None:
                return None
        elif keyword == "required" and isinstance(value, list):
            required = tuple(value)
        elif keyword == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                compiled = _compile(sub)
                if compiled is None:
                    return None
                props[name] = compiled
        elif keyword == "additionalProperties" and value is False \
                and "patternProperties" not in node:
            closed = True
        elif keyword == "propertyNames" and isinstance(value, dict) and list(value) == ["not"] \
                and isinstance(value["not"], dict) and list(value["not"]) == ["const"] \
                and isinstance(value["not"]["const"], str):
            reserved = value["not"]["const"]  # only this form: one reserved key
        else:
            return None
    known = frozenset(node.get("properties", {}))

    def check(instance: Any) -> bool:
        if typ is not None and not isinstance(instance, typ):
            return False
        if isinstance(instance, str):
            if (min_len is not None and len(instance) < min_len) or (
                    max_len is not None and len(instance) > max_len) or (
                    search is not None and search(instance) is None):
                return False
        elif isinstance(instance, list):
            if unique and not (all(isinstance(v, str) for v in instance)
                               and len(set(instance)) == len(instance)):
                return False
            if item is not None:
                for value in instance:
                    if not item(value):
                        return False
        elif isinstance(instance, dict):
            for key in required:
                if key not in instance:
                    return False
            if closed and not known.issuperset(instance):
                return False
            if reserved is not None and (reserved in instance or not all(
                    isinstance(k, str) for k in instance)):
                return False
            for key, value in instance.items():
                sub = props.get(key)
                if sub is not None and not sub(value):
                    return False
        return allowed is None or (isinstance(instance, str) and instance in allowed)

    return check


@cache
def _certainly_valid() -> Predicate | None:
    return _compile(schema())


_TYPE_NAMES = {"string": "a string", "boolean": "true or false", "array": "a list",
               "object": "a mapping", "integer": "an integer", "number": "a number"}


def _describe(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the document"


@dataclass(frozen=True)
class Checked:
    """One document after the schema: the Pipeline when it is valid, and in any case what
    the graph checks can still use (its id and the upstreams that were readable), so that
    an unknown key does not hide an unknown upstream or a cycle."""

    pipeline: Pipeline | None
    problems: list[Problem]
    dag_id: str | None
    upstreams: tuple[tuple[int, str], ...]
    """(index in depends_on, upstream id) of each usable entry."""


def check_document(doc: Document) -> Checked:
    """Schema-check one document (its loader refusals are in doc.problems)."""
    problems: list[Problem] = []
    bad: set[tuple[str | int, ...]] = set()
    fast = _certainly_valid()
    errors = () if fast is not None and fast(doc.data) else _validator().iter_errors(doc.data)
    for error in errors:
        where = tuple(error.absolute_path)
        if doc.is_refused(where):
            continue  # the loader already said what is wrong there
        bad.add(where)
        problems.extend(_to_problems(doc, error))
    data = doc.data
    dag_id = data.get("dag_id")
    if not isinstance(dag_id, str) or doc.is_refused(("dag_id",)):
        dag_id = None
    ups = data.get("depends_on")
    upstreams = tuple(
        (i, up) for i, up in enumerate(ups)
        if isinstance(up, str) and ("depends_on", i) not in bad
        and not doc.is_refused(("depends_on", i))
    ) if isinstance(ups, list) else ()
    if problems or doc.problems:
        return Checked(None, sorted(set(problems)), dag_id, upstreams)
    return Checked(_pipeline(data), [], dag_id, upstreams)


def _pipeline(data: dict[str, Any]) -> Pipeline:
    return Pipeline(
        dag_id=data["dag_id"],
        owner=data["owner"],
        description=data.get("description", ""),
        depends_on=tuple(data.get("depends_on") or ()),
        trigger_rule=data.get("trigger_rule", "all_success"),
        enabled=data.get("enabled", True),
        backfill=data.get("backfill", False),
        conf=data.get("conf") or {},
    )


def _to_problems(doc: Document, error: jsonschema.ValidationError) -> list[Problem]:
    path = tuple(error.absolute_path)
    props = schema()["properties"]
    if error.validator == "additionalProperties" and not path:
        out = []
        for key in sorted(k for k in error.instance if k not in props):
            line, col = doc.key_position((key,))
            close = difflib.get_close_matches(key, list(props), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(props)}"
            out.append(Problem(doc.path, line, col, f"unknown key {key!r}{hint}", "unknown-key"))
        return out
    if error.validator == "uniqueItems" and path == ("depends_on",):
        return []  # reported by the graph checks, at the repeated entry
    line, col = doc.position(path)
    name = _where(path)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [Problem(doc.path, line, col, f"missing required key {missing!r}", "required")]
    if error.validator == "type":
        expected = error.validator_value
        expected_names = " or ".join(_TYPE_NAMES.get(str(t), str(t)) for t in (
            expected if isinstance(expected, list) else [expected]))
        message = f"{name} must be {expected_names}, not {_describe(error.instance)}"
        if path in doc.implicit and expected == "string":
            message += f"; YAML read {doc.implicit[path]!r} as a non-string: quote it"
        return [Problem(doc.path, line, col, message, "type")]
    if error.validator == "pattern" and path and (path[0] == "dag_id" or path[0] == "depends_on"):
        return [Problem(doc.path, line, col, f"{name} {error.instance!r} is not a valid Airflow "
                        "DAG id: use only letters, digits, '_', '.', '-'", "dag-id")]
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return [Problem(doc.path, line, col, f"{name} must be one of {allowed}, not "
                        f"{_describe(error.instance)}", "enum")]
    if error.validator == "maxLength":
        return [Problem(doc.path, line, col, f"{name} is {len(error.instance)} characters, "
                        f"at most {error.validator_value} allowed", "too-long")]
    if error.validator == "minLength":
        return [Problem(doc.path, line, col, f"{name} must not be empty", "empty-value")]
    if "propertyNames" in error.relative_schema_path or error.validator == "propertyNames":
        conf_path = path if path and path[-1] == "conf" else ("conf",)
        line, col = doc.key_position((*conf_path, "reconciler"))
        return [Problem(doc.path, line, col, f"{name}: the key 'reconciler' is reserved for "
                        "the provenance the reconciler adds to every run", "reserved")]
    return [Problem(doc.path, line, col, f"{name}: {error.message}", "schema")]
