"""The README as a reader checks it (issue 16): every file or folder of the repository it
names in backticks exists, and what it says about who imports etcd3 is true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
NAMED = re.compile(r"`((?:reconciler|scripts|tests|benchmarks|examples|schemas|tools|docs"
                   r"|constraints|\.github|\.ci)/[\w./-]*)`")


def _exists(name: str) -> bool:
    """A path as the README writes it: a file, a folder, or a module without `.py` (so a
    module that becomes a package keeps its name)."""
    path = REPO / name.rstrip("/")
    return path.exists() or path.with_suffix(".py").exists()


def test_every_path_the_readme_names_exists() -> None:
    named = sorted(set(NAMED.findall(README)))
    assert len(named) > 10  # the pattern does find them
    assert [n for n in named if not _exists(n)] == []


def test_only_the_store_adapter_imports_etcd3_as_the_readme_says() -> None:
    assert "Only the store adapter\n(`reconciler/adapters/store`) imports it." in README
    importers = set()
    for path in (REPO / "reconciler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "etcd3" or n.startswith("etcd3.") for n in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers
    assert all(p == "reconciler/adapters/store.py" or p.startswith("reconciler/adapters/store/")
               for p in importers), importers
