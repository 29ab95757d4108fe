"""Problems found in pipeline files: values, not exceptions, so every one is reported.

Also the one rule that keeps credentials out of messages (`redact`), used wherever a
path, URL or error text from outside is printed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

# scheme://userinfo@ up to the host: the userinfo (user, user:password, a token) goes.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it removed (https://u:p@h -> https://h)."""
    return _USERINFO.sub(r"\1", text)


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
