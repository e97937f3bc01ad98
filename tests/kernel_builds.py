"""Which kernels a process compiled, for tests that run a workload in a fresh process.

A script run with ``subprocess`` puts this folder on ``sys.path`` and imports this module.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
from collections.abc import Iterator

from numba.core.registry import CPUDispatcher

import bitnet.kernels


def _dispatchers() -> Iterator[tuple[str, str, CPUDispatcher]]:
    """Every Numba dispatcher of ``bitnet.kernels``: module attributes, dict values and namespace members."""
    for info in pkgutil.iter_modules(bitnet.kernels.__path__):
        module = importlib.import_module(f"bitnet.kernels.{info.name}")
        for name, value in vars(module).items():
            values = value.values() if isinstance(value, dict) else (
                vars(value).values() if isinstance(value, types.SimpleNamespace) else [value])
            for dispatcher in values:
                if isinstance(dispatcher, CPUDispatcher):
                    yield info.name, name, dispatcher


def compiled() -> set[tuple[str, str, str]]:
    """``(module, name, signature)`` of every kernel signature this process has, compiled or loaded."""
    return {(module, name, str(s)) for module, name, d in _dispatchers() for s in d.signatures}


def built_not_loaded() -> set[tuple[str, str, str]]:
    """Those of :func:`compiled` that Numba compiled because its on-disk cache did not have them."""
    return {(module, name, str(s)) for module, name, d in _dispatchers() for s in d.stats.cache_misses}
