"""Serial and threaded builds of one kernel source.

A kernel called on a few rows (a decode step) is too little work to pay for waking the
thread pool, and on a busy machine the wake-up is slow; on many rows it wants every
thread. :func:`serial_and_parallel` compiles each function twice from the same Python
source, so both builds compute the same values, and the caller picks one per call.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType, SimpleNamespace

from numba import njit


def _renamed(f: FunctionType, suffix: str) -> FunctionType:
    """A copy of ``f`` under another name, so that Numba's on-disk cache keeps both compilations apart."""
    copy = FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    copy.__qualname__ = f.__qualname__ + suffix
    return copy


def serial_and_parallel(functions: tuple[Callable, ...], **options) -> tuple[SimpleNamespace, SimpleNamespace]:
    """``(serial, parallel)`` namespaces holding each of ``functions`` compiled with ``options``,
    without and with ``parallel=True`` (``prange`` loops run on one thread, or on all)."""
    serial = SimpleNamespace(**{f.__name__: njit(**options)(f) for f in functions})
    parallel = SimpleNamespace(**{f.__name__: njit(parallel=True, **options)(_renamed(f, "_parallel"))
                                  for f in functions})
    return serial, parallel
