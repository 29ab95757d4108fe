"""Value formats of the store: the head record, versioned values, the since-map, the
manifest of a split blob, and the request limits every write is checked against. No I/O."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from reconciler.adapters.store.errors import StoreCorrupt, StoreRequestTooLarge

# etcd refuses transactions of more than 128 operations by default (--max-txn-ops) and
# requests over 1.5 MiB (--max-request-bytes); refuse before sending, with a clear message.
MAX_TXN_OPS = 128
MAX_REQUEST_BYTES = 1536 * 1024
# One part of a split blob: with its key, well under the request limit on its own.
PART_BYTES = 1024 * 1024
PARTS_MAGIC = b"reconciler-parts/1\n"
_PART_DIGITS = 6
_COMMIT = re.compile(r"^[0-9A-Za-z_.-]{1,128}$")
"""What a synced commit can be named (a git hash in practice): one key segment."""
_SEQ_DIGITS = 10


@dataclass(frozen=True)
class HeadRecord:
    """The value of desired/head (and of each desired/history/<seq> entry)."""

    commit: str
    graph_digest: str
    synced_at: datetime
    source: str
    previous: str | None = None
    """The commit of the head this one replaced (None for the first sync)."""
    forced: bool = False
    """True when this sync was not a fast-forward (a rollback with --force)."""
    seq: int = 1
    """1 for the first sync of the namespace, then +1 per sync: the history key."""
    graph_parts: int = 0
    """0: the graph blob is the one value desired/graphs/<commit>; N: it is split across
    the N keys desired/graphs/<commit>/<n> (see the module's docstring)."""
    graph_blob_digest: str = ""
    """With graph_parts: "sha256:<hex>" of the whole (joined) blob."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["synced_at"] = _iso(self.synced_at)
        if not self.graph_parts:  # a graph in one value: the head reads as it always did
            del data["graph_parts"], data["graph_blob_digest"]
        return data

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadRecord:
        """Raises ValueError, KeyError or TypeError for a value that is not a head record
        (the reader names the key: StoreCorrupt or Unreadable)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a head record is a JSON object, not {type(data).__name__}")
        commit = data["commit"]
        if not isinstance(commit, str) or not _COMMIT.match(commit) or commit in (".", ".."):
            # It becomes a key segment (desired/graphs/<commit>): never a path.
            raise ValueError(f"commit {str(commit)[:80]!r} is not a commit hash")
        # Unknown keys are ignored so that an older reconciler can read a newer head.
        return cls(commit=commit, graph_digest=str(data.get("graph_digest", "")),
                   synced_at=_parse_iso(str(data["synced_at"])),
                   source=str(data.get("source", "")), previous=data.get("previous"),
                   forced=bool(data.get("forced", False)), seq=int(data.get("seq", 0)),
                   graph_parts=int(data.get("graph_parts", 0)),
                   graph_blob_digest=str(data.get("graph_blob_digest", "")))

    def __getitem__(self, name: str) -> Any:
        # Mapping-style access for callers written against the earlier dict form of the head.
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class Versioned:
    """A value with the revision it was last written at (0 = the key does not exist)."""

    value: bytes | None
    mod_revision: int

    def json(self) -> Any:
        return None if self.value is None else json.loads(self.value)


def encode_since(since: Mapping[str, datetime]) -> bytes:
    data = {dag_id: _iso(at) for dag_id, at in sorted(since.items())}
    return gzip.compress(_dumps(data), compresslevel=6, mtime=0)


def decode_since(blob: bytes) -> dict[str, datetime]:
    return {dag_id: _parse_iso(at) for dag_id, at in json.loads(gzip.decompress(blob)).items()}


def _iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}: times in etcd are UTC")
    return dt.astimezone(UTC).isoformat()


def _parse_iso(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def _fits(puts: list[tuple[str, bytes]]) -> bool:
    try:
        _check_request(puts)
    except StoreRequestTooLarge:
        return False
    return True


def _sha256(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _read_manifest(key: str, value: bytes | None) -> dict[str, Any] | None:
    """The manifest a split blob's key holds, None for a plain value."""
    if value is None or not value.startswith(PARTS_MAGIC):
        return None
    try:
        manifest = json.loads(value[len(PARTS_MAGIC):])
        if not (isinstance(manifest, dict) and int(manifest["parts"]) > 0
                and int(manifest["bytes"]) >= 0 and str(manifest["digest"])):
            raise ValueError("not a manifest of parts")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreCorrupt(key, _short(exc)) from None
    return manifest


def _check_request(puts: list[tuple[str, bytes]], extra_ops: int = 0) -> None:
    if len(puts) + extra_ops > MAX_TXN_OPS:
        raise StoreRequestTooLarge(f"{len(puts) + extra_ops} operations in one transaction "
                                   f"(etcd allows {MAX_TXN_OPS})")
    size = sum(len(k) + len(v) for k, v in puts)
    if size > MAX_REQUEST_BYTES - 4096:  # room for the request's own framing
        raise StoreRequestTooLarge(f"a transaction of {size} bytes is over etcd's request "
                                   f"limit of {MAX_REQUEST_BYTES} bytes")



def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
