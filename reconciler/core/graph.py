"""The desired graph: pipelines, their upstreams, and its canonical serialised form.

Pure values. The canonical form (sorted keys, sorted upstreams, compact JSON, gzip with a
fixed timestamp) is what sync stores in etcd and what its digest is computed over, so the
same graph always gives the same bytes. A Graph is not changed after it is built, so its
canonical JSON is computed once (a sync asks for the size check, the digest and the blob:
three serialisations of 13 MB at 50,000 pipelines before).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
TRIGGER_RULES = ("all_success", "all_done")


@dataclass(frozen=True, slots=True)
class Pipeline:
    """One Airflow DAG and the pipelines it runs after (slots: 50,000 of them per graph)."""

    dag_id: str
    owner: str = ""
    description: str = ""
    depends_on: tuple[str, ...] = ()
    trigger_rule: str = "all_success"
    enabled: bool = True
    backfill: bool = False
    conf: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_root(self) -> bool:
        return not self.depends_on

    def to_dict(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "owner": self.owner,
            "description": self.description,
            "depends_on": sorted(self.depends_on),
            "trigger_rule": self.trigger_rule,
            "enabled": self.enabled,
            "backfill": self.backfill,
            "conf": dict(self.conf),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pipeline:
        return cls(
            dag_id=data["dag_id"],
            owner=data.get("owner", ""),
            description=data.get("description", ""),
            depends_on=tuple(data.get("depends_on", ())),
            trigger_rule=data.get("trigger_rule", "all_success"),
            enabled=data.get("enabled", True),
            backfill=data.get("backfill", False),
            conf=dict(data.get("conf", {})),
        )


class Graph:
    """An acyclic set of pipelines keyed by dag_id (checks.py guarantees the invariants)."""

    def __init__(self, pipelines: Iterable[Pipeline]) -> None:
        self.pipelines: dict[str, Pipeline] = {p.dag_id: p for p in pipelines}
        downstream: dict[str, list[str]] = {dag_id: [] for dag_id in self.pipelines}
        for p in self.pipelines.values():
            for up in p.depends_on:
                downstream.setdefault(up, []).append(p.dag_id)
        self._downstream = {k: tuple(sorted(v)) for k, v in downstream.items()}
        self._canonical: bytes | None = None
        self._compressed: bytes | None = None

    def __len__(self) -> int:
        return len(self.pipelines)

    def __contains__(self, dag_id: object) -> bool:
        return dag_id in self.pipelines

    def __getitem__(self, dag_id: str) -> Pipeline:
        return self.pipelines[dag_id]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self.pipelines == other.pipelines

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Graph({len(self)} pipelines, {self.edge_count()} edges)"

    def upstreams(self, dag_id: str) -> tuple[str, ...]:
        return self.pipelines[dag_id].depends_on

    def downstreams(self, dag_id: str) -> tuple[str, ...]:
        return self._downstream.get(dag_id, ())

    def roots(self) -> list[str]:
        return sorted(d for d, p in self.pipelines.items() if p.is_root)

    def edges(self) -> Iterator[tuple[str, str]]:
        """(upstream, downstream) pairs in stable order."""
        for dag_id in self.topological_order():
            for up in sorted(self.pipelines[dag_id].depends_on):
                yield up, dag_id

    def edge_count(self) -> int:
        return sum(len(p.depends_on) for p in self.pipelines.values())

    def layers(self) -> list[list[str]]:
        """Pipelines by depth: roots first, each layer sorted (Kahn's algorithm)."""
        indegree = {d: len(p.depends_on) for d, p in self.pipelines.items()}
        layer = sorted(d for d, n in indegree.items() if n == 0)
        out: list[list[str]] = []
        while layer:
            out.append(layer)
            nxt: list[str] = []
            for d in layer:
                for down in self._downstream.get(d, ()):
                    indegree[down] -= 1
                    if indegree[down] == 0:
                        nxt.append(down)
            layer = sorted(nxt)
        return out

    def topological_order(self) -> list[str]:
        return [d for layer in self.layers() for d in layer]

    def ancestors(self, dag_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.upstreams(dag_id))
        while stack:
            d = stack.pop()
            if d not in seen and d in self.pipelines:
                seen.add(d)
                stack.extend(self.pipelines[d].depends_on)
        return seen

    def descendants(self, dag_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.downstreams(dag_id))
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack.extend(self.downstreams(d))
        return seen

    # --- canonical form -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "pipelines": {d: self.pipelines[d].to_dict() for d in sorted(self.pipelines)},
        }

    def canonical_json(self) -> bytes:
        if self._canonical is None:
            self._canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode("utf-8")
        return self._canonical

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json()).hexdigest()

    def compressed(self) -> bytes:
        # Level 6: 4x faster than 9 on a 13 MB graph, 5 % larger (877 vs 832 KB at 50,000).
        if self._compressed is None:
            self._compressed = gzip.compress(self.canonical_json(), compresslevel=6, mtime=0)
        return self._compressed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown graph format {data.get('format')!r}")
        return cls(Pipeline.from_dict(p) for p in data["pipelines"].values())

    @classmethod
    def from_compressed(cls, blob: bytes) -> Graph:
        return cls.from_dict(json.loads(gzip.decompress(blob)))
