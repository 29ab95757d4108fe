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
from typing import TYPE_CHECKING, Any

from reconciler.core.graph import Pipeline
from reconciler.core.problems import Problem
from reconciler.core.yamlload import Document

if TYPE_CHECKING:
    import jsonschema

_REPO_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "pipeline.schema.json"


@cache
def schema() -> dict[str, Any]:
    """The pipeline schema: the copy packaged in the wheel, else the checkout's (editable)."""
    packaged = resources.files("reconciler") / "schemas" / "pipeline.schema.json"
    source = packaged if packaged.is_file() else _REPO_SCHEMA
    return json.loads(source.read_text(encoding="utf-8"))


@cache
def _validator() -> jsonschema.protocols.Validator:
    # Imported here: valid files never need it (the predicate below vouches for them), and
    # its import is a tenth of a second of every `reconciler` command.
    import jsonschema

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
    plain string case is vouched for.

    The predicate is generated as the source of one function, every node's checks inline:
    a closure per schema node (a call per property and per list item) cost 0.4 s at
    50,000 files, a closure per keyword as much as jsonschema saved."""
    constants: dict[str, Any] = {}
    body = _emit(node, "v0", 1, constants)
    if body is None:
        return None
    source = "\n".join(["def check(v0):", *body, "    return True"])
    namespace: dict[str, Any] = dict(constants)
    exec(compile(source, "<pipeline schema predicate>", "exec"), namespace)
    check: Predicate = namespace["check"]
    return check


def _emit(node: Any, var: str, depth: int, constants: dict[str, Any]) -> list[str] | None:
    """Lines (indented `depth` levels) that `return False` unless the instance in `var`
    certainly satisfies `node`; None for a keyword outside the subset."""
    if not isinstance(node, dict):
        return None
    typ: str | None = None
    min_len = max_len = None
    pattern: str | None = None
    allowed: frozenset[str] | None = None
    unique = False
    items: Any = None
    required: tuple[str, ...] = ()
    props: dict[str, Any] = {}
    closed = False
    reserved: str | None = None
    for keyword, value in node.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "type" and isinstance(value, str) and value in _TYPES:
            typ = value
        elif keyword in ("minLength", "maxLength") and type(value) is int:
            if keyword == "minLength":
                min_len = value
            else:
                max_len = value
        elif keyword == "pattern" and isinstance(value, str):
            re.compile(value)  # an invalid pattern fails here, as it did before
            pattern = value
        elif keyword == "enum" and isinstance(value, list) and all(
                isinstance(v, str) for v in value):
            allowed = frozenset(value)
        elif keyword == "uniqueItems" and isinstance(value, bool):
            unique = value
        elif keyword == "items":
            items = value
        elif keyword == "required" and isinstance(value, list):
            required = tuple(value)
        elif keyword == "properties" and isinstance(value, dict):
            props = value
        elif keyword == "additionalProperties" and value is False \
                and "patternProperties" not in node:
            closed = True
        elif keyword == "propertyNames" and isinstance(value, dict) and list(value) == ["not"] \
                and isinstance(value["not"], dict) and list(value["not"]) == ["const"] \
                and isinstance(value["not"]["const"], str):
            reserved = value["not"]["const"]  # only this form: one reserved key
        else:
            return None

    def const(value: Any) -> str:
        if type(value) is str:
            return repr(value)  # a literal: the repr of a str is always one
        name = f"c{len(constants)}"
        constants[name] = value
        return name

    pad = "    " * depth
    out: list[str] = []

    def block(kind: str, lines: list[str]) -> None:
        """Checks that apply only to instances of `kind` (as jsonschema's keywords do)."""
        if not lines or (typ is not None and typ != kind):
            return  # nothing to check, or the type check already refused other kinds
        if typ == kind:
            out.extend(lines)
        else:
            out.append(f"{pad}if isinstance({var}, {kind_names[kind]}):")
            out.extend("    " + line for line in lines)

    kind_names = {"string": "str", "array": "list", "object": "dict", "boolean": "bool"}
    if typ is not None:
        out.append(f"{pad}if not isinstance({var}, {kind_names[typ]}): return False")
    inner = depth if typ is not None else depth + 1
    ipad = "    " * inner
    text: list[str] = []
    if min_len is not None:
        text.append(f"{ipad}if len({var}) < {min_len}: return False")
    if max_len is not None:
        text.append(f"{ipad}if len({var}) > {max_len}: return False")
    if pattern is not None:  # jsonschema uses re.search too
        text.append(f"{ipad}if {const(re.compile(pattern).search)}({var}) is None: "
                    "return False")
    block("string", text)
    array: list[str] = []
    item_is_text = isinstance(items, dict) and items.get("type") == "string"
    if items is not None:
        item = f"v{depth}i"
        item_lines = _emit(items, item, inner + 1, constants)
        if item_lines is None:
            return None
        if item_lines:
            array.append(f"{ipad}for {item} in {var}:")
            array.extend(item_lines)
    if unique:  # every item a string (so hashable), none twice
        if not (item_is_text and array):
            array.append(f"{ipad}if not all(isinstance(x, str) for x in {var}) "
                     f"or len(set({var})) != len({var}): return False")
        else:  # the loop above already refused any item that is not a string
            array.append(f"{ipad}if len(set({var})) != len({var}): return False")
    block("array", array)
    mapping: list[str] = []
    for key in required:
        mapping.append(f"{ipad}if {const(key)} not in {var}: return False")
    if closed:
        mapping.append(f"{ipad}if not {const(frozenset(props))}.issuperset({var}): "
                       "return False")
    if reserved is not None:
        mapping.append(f"{ipad}if {const(reserved)} in {var} or not all(isinstance(k, str) "
                       f"for k in {var}): return False")
    for n, (name, sub) in enumerate(props.items()):
        value_var = f"v{depth}p{n}"
        sub_lines = _emit(sub, value_var, inner + 1, constants)
        if sub_lines is None:
            return None
        if sub_lines:
            absent = const(_ABSENT)
            mapping.append(f"{ipad}{value_var} = {var}.get({const(name)}, {absent})")
            mapping.append(f"{ipad}if {value_var} is not {absent}:")
            mapping.extend(sub_lines)
    block("object", mapping)
    if allowed is not None:
        out.append(f"{pad}if not (isinstance({var}, str) and {var} in {const(allowed)}): "
                   "return False")
    return out


_ABSENT = object()


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
    vouched = fast is not None and fast(doc.data)
    if vouched and not doc.problems:
        # The common case, quickly: nothing was refused (every refusal is a problem), and
        # the schema holds, so dag_id is a string and depends_on a list of strings.
        data = doc.data
        ups = data.get("depends_on")
        return Checked(_pipeline(data), [], data["dag_id"], tuple(enumerate(ups)) if ups else ())
    errors = () if vouched else _validator().iter_errors(doc.data)
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
