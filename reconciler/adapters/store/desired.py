"""Desired state: the synced head, the graph of each synced commit, the since-maps and
the history (what `sync`, `history`, `rollback` and the loop's observer read).

Layout under the namespace's root:

    desired/head              JSON HeadRecord {"commit", "graph_digest", "synced_at",
                              "source", "previous", "forced", "seq"}
    desired/graphs/<commit>   gzip canonical graph JSON of that commit, never rewritten;
                              or, when it is over one part (PART_BYTES), a manifest
                              (PARTS_MAGIC + {"parts", "bytes", "digest"}) and the blob in
    desired/graphs/<commit>/<n>  parts 000000, 000001, ... (concatenated: the gzip blob)
    desired/since/<commit>    gzip JSON {dag_id: ISO time it first appeared in a synced head}
                              (split the same way when it is over one part)
    desired/history/<seq>     JSON copy of the head record of sync number <seq> (10 digits)

History is kept as `desired/history/<seq>` rather than by walking `previous`: a rollback
can sync the same commit twice, and one range read gives the list newest first. The head,
its history entry, the since-map and (if new) the graph blob are written in one
transaction guarded by the head's mod revision, so they never disagree.

A graph has no fixed size: a blob over PART_BYTES is split across numbered part keys, and
the head names them (`graph_parts`, `graph_blob_digest`: sha256 of the whole blob, also in
the manifest). etcd caps one request at 1.5 MiB and a transaction at 128 operations, so
when the parts and the head do not fit in one request, the parts are written first, each
in its own put (they are content-addressed by commit: an orphan of a sync that then lost
its race is harmless, and the next sync of that commit writes the same bytes), and then
the head, its history entry and the manifests in the transaction guarded by the head's
revision that also compares that every part exists. A reader joins the parts and checks
the digest: a missing or mixed part is StoreCorrupt (bad stored data), never a crash and
never a wrong graph. A graph of one part is stored exactly as before (one value, no
manifest, no new head fields), so older readers still read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from reconciler.adapters.store.client import EtcdClient
from reconciler.adapters.store.codec import (
    _PART_DIGITS,
    _SEQ_DIGITS,
    MAX_TXN_OPS,
    PARTS_MAGIC,
    HeadRecord,
    _check_request,
    _dumps,
    _fits,
    _read_manifest,
    _sha256,
    _short,
    decode_since,
    encode_since,
)
from reconciler.adapters.store.errors import (
    StoreConflict,
    StoreCorrupt,
    StoreRequestTooLarge,
    Unreadable,
)
from reconciler.core.graph import Graph

_HEX = re.compile(r"^[0-9a-f]{4,64}$")


class DesiredStore(EtcdClient):
    """desired/: head, graphs, since-maps, history."""

    def head_key(self) -> str:
        return self.key("desired", "head")

    def graph_key(self, commit: str) -> str:
        return self.key("desired", "graphs", commit)

    def graph_part_key(self, commit: str, n: int) -> str:
        return self.key("desired", "graphs", commit, f"{n:0{_PART_DIGITS}d}")

    def since_key(self, commit: str) -> str:
        return self.key("desired", "since", commit)

    def history_key(self, seq: int) -> str:
        return self.key("desired", "history", f"{seq:0{_SEQ_DIGITS}d}")

    # --- desired state (sync) ------------------------------------------------------------

    def read_head(self) -> tuple[HeadRecord | None, int]:
        """The synced head and its mod revision (None, 0 when nothing was synced yet)."""
        got = self.get(self.head_key())
        if got.value is None:
            return None, 0
        try:
            return HeadRecord.from_dict(json.loads(got.value)), got.mod_revision
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(self.head_key(), _short(exc)) from None

    def write_sync(self, head: HeadRecord, expected_mod_revision: int,
                   graph_blob: bytes | None, since: Mapping[str, datetime], *,
                   split: bool = False) -> HeadRecord:
        """Head, history entry, since-map and (unless None) the graph blob, atomically;
        returns the head as written.

        Guarded by the head's mod revision as read (0 = no head yet). Raises StoreConflict
        when another sync moved the head in between (or a part it names vanished).
        Without `split` every value is one key and a write over etcd's limits is refused
        (StoreRequestTooLarge) before sending. With `split` (what sync uses) a blob over
        `part_bytes` goes into parts, the head names the graph's parts, and parts that do
        not fit beside the head in one request are written before it (module docstring).
        """
        since_blob = encode_since(since)
        if not split:
            also = [(self.history_key(head.seq), head.to_json()),
                    (self.since_key(head.commit), since_blob)]
            if graph_blob is not None:
                also.append((self.graph_key(head.commit), graph_blob))
            self._guarded_head(head, expected_mod_revision, also, ())
            return head
        graph_value: bytes | None = None
        graph_parts: list[tuple[str, bytes]] = []
        if graph_blob is not None:
            graph_value, graph_parts = self._split(self.graph_key(head.commit), graph_blob)
            existing = graph_parts
        else:  # the commit's graph is stored: the head names its parts as they are
            existing = self._stored_parts(self.graph_key(head.commit))
        manifest = _read_manifest(self.graph_key(head.commit), graph_value) \
            if graph_value is not None else self._stored_manifest(head.commit)
        if manifest is not None:
            head = replace(head, graph_parts=int(manifest["parts"]),
                           graph_blob_digest=str(manifest["digest"]))
        else:
            head = replace(head, graph_parts=0, graph_blob_digest="")
        since_value, since_parts = self._split(self.since_key(head.commit), since_blob)
        values = [(self.history_key(head.seq), head.to_json()),
                  (self.since_key(head.commit), since_value)]
        if graph_value is not None:
            values.append((self.graph_key(head.commit), graph_value))
        parts = graph_parts + since_parts
        kept = [k for k, _ in existing] if graph_blob is None else []  # reused, not rewritten
        if _fits([(self.head_key(), head.to_json()), *values, *parts]) \
                and len(kept) + 1 <= MAX_TXN_OPS:
            self._guarded_head(head, expected_mod_revision, [*values, *parts], kept)
            return head
        for key, value in parts:  # immutable, content-addressed: harmless if orphaned
            self.put(key, value)
        must_exist = [k for k, _ in parts] + kept
        if len(must_exist) + 1 > MAX_TXN_OPS:
            raise StoreRequestTooLarge(f"{len(must_exist)} parts are more than one transaction "
                                       f"can check (etcd allows {MAX_TXN_OPS} comparisons)")
        self._guarded_head(head, expected_mod_revision, values, must_exist)
        return head

    def _guarded_head(self, head: HeadRecord, expected_mod_revision: int,
                      also: list[tuple[str, bytes]], must_exist: Iterable[str]) -> None:
        key = self.head_key()
        ops = [(key, head.to_json()), *also]
        _check_request(ops)
        exist = list(must_exist)

        def txn(c: Any) -> bool:
            ok, _ = c.transaction(
                compare=[c.transactions.mod(key) == expected_mod_revision,
                         *(c.transactions.version(k) > 0 for k in exist)],
                success=[c.transactions.put(k, v) for k, v in ops], failure=[])
            return bool(ok)

        self._count_write()
        if not self._call(f"transaction on {key}", txn):
            raise StoreConflict(f"{key} changed since it was read (another sync won the race)"
                                + (", or a part of the graph it names is missing"
                                   if exist else ""))

    def _split(self, key: str, blob: bytes, size: int | None = None
               ) -> tuple[bytes, list[tuple[str, bytes]]]:
        """(the value of `key`, [(part key, part)]): the blob itself when it fits one part,
        else a manifest and the parts."""
        size = max(1, size or self.part_bytes)
        if len(blob) <= size:
            return blob, []
        parts = [(f"{key}/{n:0{_PART_DIGITS}d}", blob[at:at + size])
                 for n, at in enumerate(range(0, len(blob), size))]
        manifest = {"parts": len(parts), "bytes": len(blob), "digest": _sha256(blob),
                    "part_bytes": size}
        return PARTS_MAGIC + _dumps(manifest), parts

    def repair_parts(self, commit: str, graph_blob: bytes) -> int:
        """Rewrite the parts of `commit`'s split graph that are missing (a torn write), when
        `graph_blob` is the blob its manifest names; the number of parts written."""
        key = self.graph_key(commit)
        manifest = self._stored_manifest(commit)
        if manifest is None or manifest["digest"] != _sha256(graph_blob):
            return 0
        present = {k for k, _ in self._stored_parts(key)}
        _, parts = self._split(key, graph_blob, int(manifest.get("part_bytes") or 0) or None)
        if len(parts) != int(manifest["parts"]):
            return 0  # split some other way: not ours to rewrite
        missing = [(k, v) for k, v in parts if k not in present]
        for part_key, value in missing:
            self.put(part_key, value)
        return len(missing)

    def _stored_manifest(self, commit: str) -> dict[str, Any] | None:
        key = self.graph_key(commit)
        return _read_manifest(key, self.get(key).value)

    def _stored_parts(self, key: str) -> list[tuple[str, bytes]]:
        return [(k, b"") for k, _ in self.get_prefix(key + "/", keys_only=True)]

    def _read_blob(self, key: str) -> bytes | None:
        """The value of `key`, with the parts joined when it is a manifest (StoreCorrupt
        when one is missing, or the joined blob is not the one the manifest names)."""
        value = self.get(key).value
        manifest = _read_manifest(key, value)
        if manifest is None:
            return value
        count = int(manifest["parts"])
        found = dict(self.get_prefix(key + "/"))
        pieces = []
        for n in range(count):
            part_key = f"{key}/{n:0{_PART_DIGITS}d}"
            if part_key not in found:
                raise StoreCorrupt(part_key, f"part {n + 1} of {count} is missing (a torn "
                                   "write): sync the commit again to rewrite it")
            pieces.append(found[part_key])
        blob = b"".join(pieces)
        if _sha256(blob) != manifest["digest"] or len(blob) != int(manifest["bytes"]):
            raise StoreCorrupt(key, f"the {count} parts join to {len(blob)} bytes that are "
                               f"not the blob the manifest names ({manifest['digest']})")
        return blob

    def read_graph_blob(self, commit: str) -> bytes | None:
        """The graph blob of `commit` (parts joined), None when it was never synced."""
        return self._read_blob(self.graph_key(commit))

    def read_graph(self, commit: str) -> Graph | None:
        blob = self.read_graph_blob(commit)
        if blob is None:
            return None
        try:
            return Graph.from_compressed(blob)
        except Exception as exc:  # any decoding failure of stored bytes is bad data
            raise StoreCorrupt(self.graph_key(commit), _short(exc)) from None

    def read_since_blob(self, commit: str) -> bytes | None:
        return self._read_blob(self.since_key(commit))

    def read_since(self, commit: str) -> dict[str, datetime]:
        """{dag_id: first synced} for that commit's graph ({} if none was written)."""
        blob = self.read_since_blob(commit)
        if blob is None:
            return {}
        try:
            return decode_since(blob)
        except Exception as exc:
            raise StoreCorrupt(self.since_key(commit), _short(exc)) from None

    def synced_commits(self, prefix: str) -> list[str]:
        """Full hashes of the synced graphs whose commit starts with `prefix`."""
        if not _HEX.match(prefix):
            return []
        base = self.key("desired", "graphs") + "/"
        return [k[len(base):] for k, _ in self.get_prefix(base + prefix, keys_only=True)
                if "/" not in k[len(base):]]  # not the parts of a split graph

    def read_history(self, limit: int = 0) -> list[HeadRecord]:
        """The readable synced heads, newest first (limit 0 = all); see history_entries."""
        return [h for h in self.history_entries(limit) if isinstance(h, HeadRecord)]

    def history_entries(self, limit: int = 0) -> list[HeadRecord | Unreadable]:
        """Every history entry, newest first (limit 0 = all): an entry that cannot be read
        (not JSON, not a head record) is an `Unreadable` naming its key, in its place."""
        prefix = self.key("desired", "history") + "/"
        out: list[HeadRecord | Unreadable] = []
        for key, value in self.get_prefix(prefix, newest_key_first=True, limit=limit):
            try:
                out.append(HeadRecord.from_dict(json.loads(value)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                out.append(Unreadable(key, _short(exc)))
        return out
