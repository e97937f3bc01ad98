"""The MSL sources shipped with the package, and the dispatch geometry they are written for.

Each ``.metal`` file is one library (metalcompute compiles a source string, so a file cannot
include another). The constants that decide how many threads to dispatch (rows per SIMD
group, tile sizes) are read from the shaders themselves, so they are written down once.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

SIMD_WIDTH = 32
"""Threads per SIMD group on Apple GPUs; every threadgroup width is a multiple of it."""

LIBRARY_OF_KERNEL = {
    "quantize_activations": "quantize",
    "ternary_gemv": "ternary_matmul",
    "ternary_gemm": "ternary_matmul",
}
"""Which ``<library>.metal`` file defines each kernel."""


@cache
def source(library: str) -> str:
    """The MSL text of ``bitnet/metal/<library>.metal``."""
    return resources.files(__package__).joinpath(f"{library}.metal").read_text()


@cache
def constant(library: str, name: str) -> int:
    """The value of ``constant constexpr uint <name> = <value>;`` in a library's source."""
    found = re.search(rf"\bconstant\s+constexpr\s+uint\s+{name}\s*=\s*(\d+)u?\s*;", source(library))
    if found is None:
        raise LookupError(f"{library}.metal defines no uint constant {name}")
    return int(found.group(1))
