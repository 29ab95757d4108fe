"""English for the counts in messages: `counted(1, "root")` is "1 root", never "1 roots"."""

from __future__ import annotations

_IRREGULAR = {"dependency": "dependencies"}


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, plural unless `n` is 1 ("0 roots", "1 root", "2 dependencies")."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or _IRREGULAR.get(noun) or noun + 's'}"
