"""Strict YAML loading that keeps the position of every node.

PyYAML composes the document into nodes (libyaml's C parser when available); this module
turns the nodes into plain JSON-compatible data itself, so that it can refuse what a
pipeline file must never contain (duplicate keys, aliases, several documents, YAML 1.1
booleans such as ``yes``, custom tags) and remember where each key and value was written.
Nothing here raises on bad input: problems come back as values. A refusal that leaves the
rest of the document readable (a YAML 1.1 boolean, a duplicate key, a NaN) is recorded on
the Document and loading goes on, so one run reports every problem of a file; only what
stops parsing (syntax, aliases, depth, size, encoding) returns a lone Problem.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler.core.problems import Problem

MAX_FILE_BYTES = 64 * 1024
MAX_DEPTH = 32

PathKey = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line, column

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_constructor = yaml.constructor.SafeConstructor()

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_SCALAR = yaml.ScalarNode


@dataclass
class Document:
    """A loaded mapping plus the position of each value and each key, by JSON path."""

    path: str
    data: dict[str, Any]
    positions: dict[PathKey, Position] = field(default_factory=dict)
    key_positions: dict[PathKey, Position] = field(default_factory=dict)
    implicit: dict[PathKey, str] = field(default_factory=dict)
    """Plain (unquoted) scalars that YAML read as something other than a string."""
    problems: list[Problem] = field(default_factory=list)
    """Refusals that did not stop loading; the document is invalid when there is any."""
    refused: set[PathKey] = field(default_factory=set)
    """Where a refused value was (its text stands in): no other check reports it again."""

    def position(self, where: PathKey) -> Position:
        """The position of the value at `where`, or of its nearest written ancestor."""
        while where not in self.positions and where:
            where = where[:-1]
        return self.positions.get(where, (1, 1))

    def key_position(self, where: PathKey) -> Position:
        return self.key_positions.get(where) or self.position(where)

    def is_refused(self, where: PathKey) -> bool:
        """True when the value at `where`, or one that contains it, was refused."""
        if not self.refused:
            return False
        return any(where[:n] in self.refused for n in range(len(where) + 1))

    def _refuse(self, node: yaml.Node, where: PathKey | None, message: str, code: str) -> None:
        line, col = _pos(node)
        self.problems.append(Problem(self.path, line, col, message, code))
        if where is not None:
            self.refused.add(where)


class _Refused(Exception):
    def __init__(self, position: Position | None, message: str, code: str) -> None:
        super().__init__(message)
        self.position = position
        self.message = message
        self.code = code


def _pos(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _line_col_of_offset(text: str | bytes, offset: int) -> Position:
    nl = "\n" if isinstance(text, str) else b"\n"
    before = text[:offset]
    line = before.count(nl) + 1  # type: ignore[arg-type]
    last = before.rfind(nl)  # type: ignore[arg-type]
    return line, offset - last


def too_large(path: str, size: int, max_bytes: int) -> Problem:
    """The refusal of a file of `size` bytes (its real size, not the bytes read)."""
    return Problem(path, 1, 1, f"file is {size} bytes, over the {max_bytes} byte limit for a "
                   "pipeline file", "too-large")


def load_document(path: str, raw: bytes, *, max_bytes: int = MAX_FILE_BYTES) -> Document | Problem:
    """Parse one pipeline file: the document (with the refusals that did not stop loading
    in `problems`), or the one problem that stopped it."""
    if len(raw) > max_bytes:
        return too_large(path, len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col_of_offset(raw, exc.start)
        return Problem(path, line, col, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                       "save the file as UTF-8", "encoding")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return Problem(path, 1, 1, "file is empty: expected a mapping with at least dag_id "
                       "and owner", "empty")
    return _plain_document(path, text) or _load_yaml(path, text)


def _load_yaml(path: str, text: str) -> Document | Problem:
    """The general path: PyYAML composes the nodes, _build walks them."""
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        return _yaml_error_problem(path, exc)
    except yaml.reader.ReaderError as exc:
        line, col = _line_col_of_offset(text, exc.position)
        return Problem(path, line, col, f"unacceptable character #x{exc.character:04x}: "
                       "special characters are not allowed", "yaml-syntax")
    except (yaml.YAMLError, RecursionError) as exc:
        return Problem(path, 1, 1, f"YAML error: {exc}", "yaml-syntax")
    if root is None:
        return Problem(path, 1, 1, "file has no content (only comments): expected a mapping "
                       "with at least dag_id and owner", "empty")
    if not isinstance(root, yaml.MappingNode):
        line, col = _pos(root)
        return Problem(path, line, col, f"top level must be a mapping (key: value), not "
                       f"{_kind(root)}", "not-a-mapping")
    doc = Document(path=path, data={})
    try:
        doc.data = _build(root, (), doc, set(), 0)
    except _Refused as exc:
        line, col = exc.position or _first_alias(text)
        return Problem(path, line, col, exc.message, exc.code)
    return doc


# --- the plain fast path ------------------------------------------------------------------
#
# Most pipeline files are a handful of `key: value` lines (plain scalars, true/false, a
# flow list of ids): composing them with PyYAML and walking the nodes cost 5 s of a 10 s
# validate at 50,000 files. `_plain_document` reads exactly that shape itself and returns
# the Document the general path would (same data, positions, implicit scalars); anything
# else (quotes, nesting, null, numbers, dates, a duplicate key, a tab, odd characters...)
# returns None, and the general path decides, refusals and messages included. A test
# compares both paths on every example file and on generated near-misses.

_PLAIN_ITEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# `key: value` as the loop below reads it: a plain key right at the start, its colon, at
# least one space, then the value (its start is group 2's). The same as finding the first
# colon and checking the key before it: a plain key holds no colon.
_PLAIN_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*): +(.*)")
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
_resolver = yaml.resolver.Resolver()
# The resolver looks implicit tags up by the scalar's first character: a text starting
# with none of those characters (most ids: "pipeline_00042") is a string without asking.
# (Its "" entry is for the empty scalar only; a None entry would apply to every text.)
_TAGGED_FIRST = frozenset(k for k in _resolver.yaml_implicit_resolvers if k)
_ANY_FIRST = None in _resolver.yaml_implicit_resolvers or bool(_resolver.yaml_path_resolvers)
# The resolver's answer depends on the text alone; the few texts that reach it (keys,
# owners, true/false) repeat from file to file. Bounded, so odd input cannot grow it.
_TAGS: dict[str, str] = {}
_TAGS_MAX = 4096


def _tag(text: str) -> str:
    if text and text[0] not in _TAGGED_FIRST and not _ANY_FIRST:
        return _STR
    tag = _TAGS.get(text)
    if tag is None:
        tag = str(_resolver.resolve(yaml.ScalarNode, text, (True, False)))
        if len(_TAGS) < _TAGS_MAX:
            _TAGS[text] = tag
    return tag


def _plain_document(path: str, text: str) -> Document | None:
    # Every line must be printable (no tab, CR, NEL, line or paragraph separator, nor any
    # other control character): one check over the whole text, newlines aside.
    if not text.replace("\n", " ").isprintable():
        return None
    doc = Document(path=path, data={})
    data, positions, key_positions = doc.data, doc.positions, doc.key_positions
    match = _PLAIN_LINE.fullmatch
    for number, line in enumerate(text.split("\n"), start=1):
        first = line[:1]
        if first == "#" or not line:
            continue  # a comment, or blank
        if first == " ":
            stripped = line.lstrip(" ")
            if not stripped or stripped[0] == "#":
                continue  # blank, or an indented comment
            return None  # a continuation, a nested block: the general path
        m = match(line)
        if m is None:
            return None
        key, value = m.group(1, 2)
        if key in data or ((key[0] in _TAGGED_FIRST or _ANY_FIRST) and _tag(key) != _STR):
            return None
        start = m.start(2)
        comment = value.find(" #")
        value = (value[:comment] if comment >= 0 else value).rstrip(" ")
        if not value:
            return None  # `key:` then nothing (or only a comment): null
        where = (key,)
        if () not in positions:
            positions[()] = (number, 1)
        key_positions[where] = (number, 1)
        positions[where] = (number, start + 1)
        head = value[0]
        if head == "[":
            items = _plain_list(value, number, start, where, doc)
            if items is None:
                return None
            data[key] = items
            continue
        if head in _INDICATORS or ":" in value:
            return None
        tag = _STR if head not in _TAGGED_FIRST and not _ANY_FIRST else _tag(value)
        if tag == _STR:
            data[key] = value
        elif tag == _BOOL and value.lower() in ("true", "false"):
            doc.implicit[where] = value
            data[key] = value.lower() == "true"
        else:
            return None
    return doc if data else None


def _plain_list(value: str, number: int, start: int, where: PathKey, doc: Document
                ) -> list[str] | None:
    """`[a, b]` of plain ids; the position of each item as PyYAML gives it."""
    if not value.endswith("]"):
        return None
    inner = value[1:-1]
    if not inner.strip(" "):
        return []
    items: list[str] = []
    positions = doc.positions
    plain = _PLAIN_ITEM.fullmatch
    column = start + 2  # 1-based, just after '['
    for index, piece in enumerate(inner.split(",")):
        item = piece.lstrip(" ")
        lead = len(piece) - len(item)
        item = item.rstrip(" ")
        if plain(item) is None or ((item[0] in _TAGGED_FIRST or _ANY_FIRST)
                                   and _tag(item) != _STR):
            return None
        positions[(*where, index)] = (number, column + lead)
        items.append(item)
        column += len(piece) + 1
    return items


def _first_alias(text: str) -> Position:
    """Composed nodes do not say where an alias was written; the event stream does.
    Only called on the error path, so the second parse costs nothing on valid files."""
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
            return event.start_mark.line + 1, event.start_mark.column + 1
    return 1, 1


def _yaml_error_problem(path: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or "invalid YAML"
    if "expected a single document" in (exc.context or ""):
        return Problem(path, line, col, "several YAML documents in one file ('---'); a "
                       "pipeline file holds exactly one", "multiple-documents")
    if "found undefined alias" in problem or "found duplicate anchor" in problem:
        return Problem(path, line, col, f"{problem}; anchors and aliases are not allowed in "
                       "pipeline files", "alias")
    context = f" ({exc.context})" if exc.context else ""
    return Problem(path, line, col, f"YAML syntax error: {problem}{context}", "yaml-syntax")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return f"a scalar ({node.value!r})"


def _build(node: yaml.Node, where: PathKey, doc: Document, seen: set[int], depth: int) -> Any:
    if id(node) in seen:
        raise _Refused(None, "aliases (*name) are not allowed in pipeline files; write the "
                       "value out", "alias")
    seen.add(id(node))
    if depth > MAX_DEPTH:
        raise _Refused(_pos(node), f"nested deeper than {MAX_DEPTH} levels", "too-deep")
    positions = doc.positions
    if where not in positions:
        positions[where] = _pos(node)
    if isinstance(node, yaml.MappingNode):
        if node.tag != _MAP:
            raise _Refused(_pos(node), f"tag {node.tag} is not allowed in pipeline files",
                           "tag")
        out: dict[str, Any] = {}
        key_positions = doc.key_positions
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                raise _Refused(_pos(key_node), "merge keys (<<) are not allowed in pipeline "
                               "files; write the keys out", "alias")
            if id(key_node) in seen:
                raise _Refused(None, "aliases (*name) are not allowed in pipeline files",
                               "alias")
            seen.add(id(key_node))
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                shown = (repr(key_node.value) if isinstance(key_node, yaml.ScalarNode)
                         else _kind(key_node))
                doc._refuse(key_node, None, f"keys must be strings, not {shown}; quote the "
                            "key", "key-type")
                continue
            key = key_node.value
            at = (*where, key)
            if key in out:
                first = key_positions[at]
                # The first value stays; the second is not read (it cannot take effect).
                doc._refuse(key_node, None, f"duplicate key {key!r} (first at line "
                            f"{first[0]}); each key may appear once", "duplicate-key")
                continue
            key_positions[at] = _pos(key_node)
            positions[at] = _pos(value_node)
            out[key] = _value(value_node, at, doc, seen, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        if node.tag != _SEQ:
            raise _Refused(_pos(node), f"tag {node.tag} is not allowed in pipeline files",
                           "tag")
        items = []
        for index, item in enumerate(node.value):
            at = (*where, index)
            if id(item) not in seen:
                positions[at] = _pos(item)
            items.append(_value(item, at, doc, seen, depth + 1))
        return items
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(node, where, doc)


def _value(node: yaml.Node, where: PathKey, doc: Document, seen: set[int], depth: int) -> Any:
    """_build for a child whose position is recorded: a plain string (most values of a
    pipeline file) is taken at once, exactly as _build would, without the general walk."""
    if (type(node) is _SCALAR and node.tag == _STR and depth <= MAX_DEPTH
            and id(node) not in seen):
        seen.add(id(node))
        return node.value
    return _build(node, where, doc, seen, depth)


_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}
# YAML 1.1 also reads 017 as 15, 1_000 as 1000 and 12:30 as 750: only plain decimals pass.
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9]{0,99})")


def _scalar(node: yaml.ScalarNode, where: PathKey, doc: Document) -> Any:
    """The scalar's value; a refused one is recorded and its text stands in for it."""
    tag, text = node.tag, node.value
    plain = node.style is None or node.style == ""
    if tag == _STR:
        return text
    if plain:
        doc.implicit[where] = text

    def refuse(message: str, code: str) -> str:
        doc._refuse(node, where, message, code)
        return text

    if tag == _BOOL:
        if text.lower() in _YAML11_BOOLS:
            return refuse(f"{text!r} is a YAML 1.1 boolean; write true or false, or quote it "
                          f"(\"{text}\") if you mean the text", "yaml11-bool")
        if text.lower() not in ("true", "false"):
            return refuse(f"{text!r} is not a boolean; write true or false", "type")
        return text.lower() == "true"
    if tag == _NULL:
        if text not in ("", "~", "null", "Null", "NULL"):
            return refuse(f"{text!r} is not null; remove the tag or quote it", "type")
        return None
    if tag == _INT:
        if plain and not _DECIMAL_INT.fullmatch(text):
            return refuse(f"YAML 1.1 reads {text!r} as a number in another base or with "
                          "separators; write a plain decimal number, or quote it if you mean "
                          "the text", "yaml11-number")
        try:
            return _constructor.construct_yaml_int(node)
        except (ValueError, IndexError):
            return refuse(f"{text[:40]!r} is not a valid integer", "type")
    if tag == _FLOAT:
        try:
            value = _constructor.construct_yaml_float(node)
        except (ValueError, IndexError):
            return refuse(f"{text[:40]!r} is not a valid number", "type")
        if math.isnan(value) or math.isinf(value):
            return refuse(f"{text!r} is not a JSON number; quote it if you mean the text",
                          "not-json")
        return value
    if tag == _TIMESTAMP:
        # Dates stay text: run conf is JSON, and a date string is what a DAG expects there.
        return text
    return refuse(f"tag {tag} is not allowed in pipeline files", "tag")
