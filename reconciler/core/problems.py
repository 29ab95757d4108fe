"""Problems found in pipeline files: values, not exceptions, so every one is reported.

`redact`, the one rule that keeps credentials out of messages (used wherever a path, URL
or error text from outside is printed), lives in core/safe_text.py and is imported here too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from reconciler.core.safe_text import redact

__all__ = ["Problem", "redact"]


@dataclass(frozen=True, order=True)
class Problem:
    """One error, anchored at a YAML position (1-based line and column)."""

    path: str
    line: int
    column: int
    message: str
    code: str = "invalid"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
