"""A synthetic layered pipeline graph for benchmarks: N pipelines, about K upstreams each."""

from __future__ import annotations

import random
from pathlib import Path


def layered_graph(n: int, upstreams: int = 3, layer_size: int = 100, seed: int = 7
                  ) -> dict[str, list[str]]:
    """dag_id -> depends_on; the first layer are roots, each later one depends on earlier ones."""
    rng = random.Random(seed)
    ids = [f"pipeline_{i:05d}" for i in range(n)]
    graph: dict[str, list[str]] = {}
    for i, dag_id in enumerate(ids):
        layer = i // layer_size
        if layer == 0:
            graph[dag_id] = []
        else:
            # mostly from the previous layer, so the graph is deep as well as wide
            lo = max(0, (layer - 2) * layer_size)
            graph[dag_id] = sorted(rng.sample(ids[lo: layer * layer_size], upstreams))
    return graph


def write_pipelines(directory: Path, graph: dict[str, list[str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for dag_id, ups in graph.items():
        lines = [
            "# yaml-language-server: $schema=../schemas/pipeline.schema.json",
            f"dag_id: {dag_id}",
            f"description: Synthetic pipeline {dag_id} for the benchmark.",
            "owner: team-bench",
        ]
        if ups:
            lines.append("depends_on: [" + ", ".join(ups) + "]")
        (directory / f"{dag_id}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
