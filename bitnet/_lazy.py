"""Names a package exports but imports on first use (PEP 562), so ``import bitnet`` stays fast."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from importlib import import_module


def lazy_names(
    package: str, homes: dict[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    ``homes`` maps each exported name to the submodule defining it (``"matmul": "ops"``);
    ``submodules`` are submodules exported as attributes themselves (``bn.io``). A name is
    imported at its first lookup and then stored in the package, so later lookups are plain
    attribute reads that never reach this hook.
    """
    namespace = sys.modules[package].__dict__
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> object:
        if name in submodules:
            value = import_module(f".{name}", package)
        elif name in homes:
            value = getattr(import_module(f".{homes[name]}", package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes) | submodules)

    return __getattr__, __dir__
