"""Where every per-step temporary of the model comes from.

The layers never call ``np.empty`` for a temporary themselves: they ask :func:`empty`, and
each forward or decode step runs inside :func:`step`. With the arena of ``bitnet.memory``
installed, ``step`` is one arena frame, so the buffers of a decode step are recycled from
the previous step instead of being allocated again. Without it, plain ``np.empty`` is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

try:
    from ..memory import default_arena
except ImportError:  # the arena is optional: fall back to numpy's allocator
    default_arena = None


def arena():
    """The arena temporaries come from, or None when ``bitnet.memory`` is not available."""
    return default_arena() if default_arena is not None else None


def empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialized temporary, valid until the enclosing :func:`step` ends."""
    current = arena()
    if current is None:
        return np.empty(shape, dtype)
    return current.empty(shape, dtype)


@contextlib.contextmanager
def step() -> Iterator[None]:
    """Scope of one forward or decode step: its temporaries are released on exit."""
    current = arena()
    if current is None:
        yield
        return
    with current.frame():
        yield
