"""The cyclic garbage collector around bulk work (50,000 pipelines build millions of small
acyclic objects: the collector's passes over them only cost time; reference counting
still frees everything)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside; the collector's previous state is restored after (the
    commands also run inside tests)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
