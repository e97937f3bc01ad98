"""Where every per-step temporary of the model comes from.

The layers never call ``np.empty`` for a temporary themselves: they ask :func:`empty` or
:func:`reused`, and each forward or decode step runs inside :func:`step`. With the arena of
``bitnet.memory``, ``step`` is one arena frame, so the buffers of a decode step are recycled
from the previous step instead of being allocated again.

:func:`reused` hands every call with the same ``(tag, shape)`` in a step the same buffer.
Layers tag their temporaries by role ("self_attn.q_proj", ...), so layer 2 writes into the
buffers layer 1 used: a step asks the arena for a dozen buffers instead of a dozen per
layer. A tag is only for a value that is dead before the same call site runs again, which
holds for per-layer temporaries because layers run one after another.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

from ..memory import default_arena

_local = threading.local()  # per thread: the stack of open steps' tagged buffers


def empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialized temporary.

    Inside a :func:`step` it comes from the default arena and lives until the step ends;
    outside one (a layer called on its own) it is a plain array the caller owns, since no
    frame would ever give an arena buffer back.
    """
    if not getattr(_local, "steps", None):
        return np.empty(shape, dtype)
    return default_arena().empty(shape, dtype)


def reused(tag: str | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The current step's buffer for ``(tag, shape, dtype)``, made on first use; untagged calls get a new one."""
    steps = getattr(_local, "steps", None)
    if tag is None or not steps:
        return empty(shape, dtype)
    key = (tag, shape, dtype)
    buffers = steps[-1]
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = empty(shape, dtype)
    return buffer


@contextlib.contextmanager
def step() -> Iterator[None]:
    """Scope of one forward or decode step: its temporaries are released on exit."""
    steps = getattr(_local, "steps", None)
    if steps is None:
        steps = _local.steps = []
    steps.append({})
    try:
        with default_arena().frame():
            yield
    finally:
        steps.pop()
