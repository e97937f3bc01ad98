"""Which matmul kernel path this CPU can run, decided once at import.

Paths, fastest first:

* ``amx``: the ``avx512vnni`` kernels, with Intel AMX tiles (``tdpbusd``) for prefill-sized
  batches (Sapphire Rapids and later, where Linux grants the tiles: see ``bitnet.kernels.amx``).
* ``avx512vnni``: 512-bit ``vpdpbusd`` (Intel Ice Lake / Sapphire Rapids and later, AMD Zen 4+).
* ``avxvnni``: 256-bit ``vpdpbusd`` (Alder Lake and later; also on every AVX-512 VNNI CPU).
* ``avx2``: 256-bit ``vpmaddubsw`` + ``vpmaddwd`` (Haswell and later).
* ``portable``: plain Numba loops that LLVM vectorizes for whatever CPU it targets (aarch64 too).

The environment variable ``BITNET_KERNEL`` (one of the names above) forces a path, e.g.
``BITNET_KERNEL=portable`` to compare or to work around a problem. Forcing a path the CPU
cannot run is refused with an error at import, rather than crashing later on an illegal
instruction.
"""

from __future__ import annotations

import functools
import os

import llvmlite.binding as llvm
from numba.core import config

from . import amx

ENV_VAR = "BITNET_KERNEL"
PORTABLE = "portable"
PATHS = ("amx", "avx512vnni", "avxvnni", "avx2", PORTABLE)
_AMX_FEATURES = ("amx-tile", "amx-int8")

# The LLVM target features each SIMD path compiles to.
_NEEDS = {
    "amx": ("avx512f", "avx512bw", "avx512vnni", *_AMX_FEATURES),
    "avx512vnni": ("avx512f", "avx512bw", "avx512vnni"),
    "avxvnni": ("avx2", "avx512vl", "avx512vnni"),
    "avx2": ("avx2",),
    PORTABLE: (),
}
# AVX-VNNI alone (no AVX-512) also encodes the 256-bit vpdpbusd.
_NEEDS_ALT = {"avxvnni": ("avx2", "avxvnni")}


@functools.cache
def _compile_target_features() -> frozenset[str]:
    """Features of the CPU Numba compiles for; empty when Numba is told to target another CPU.

    ``NUMBA_CPU_NAME`` (e.g. ``generic`` for portable caches) makes Numba compile for a CPU
    other than this one, and the x86 intrinsics would then fail to compile: only the
    portable path is safe there.
    """
    if config.CPU_NAME not in (None, "host"):
        return frozenset()
    features = {name for name, present in llvm.get_host_cpu_features().items() if present}
    if all(f in features for f in _AMX_FEATURES) and not amx.request_permission():
        features -= set(_AMX_FEATURES)  # the OS keeps the tiles: using them would kill the process
    return frozenset(features)


def supported_paths(features: set[str] | None = None) -> tuple[str, ...]:
    """The kernel paths this machine can run, fastest first (``"portable"`` always last)."""
    features = _compile_target_features() if features is None else features

    def runs(path: str) -> bool:
        options = [_NEEDS[path]] + ([_NEEDS_ALT[path]] if path in _NEEDS_ALT else [])
        return any(all(f in features for f in needs) for needs in options)

    return tuple(path for path in PATHS if runs(path))


def unsupported_reason(path: str) -> str | None:
    """Why this machine cannot run ``path`` (``"amx: CPU lacks amx-tile, amx-int8"``), or None if it can."""
    if path in supported_paths():
        return None
    features = _compile_target_features()
    if not features:
        return f"{path}: Numba compiles for another CPU (NUMBA_CPU_NAME={config.CPU_NAME}); only portable is safe"
    options = [_NEEDS[path]] + ([_NEEDS_ALT[path]] if path in _NEEDS_ALT else [])
    lacking = " or ".join(", ".join(f for f in needs if f not in features) for needs in options)
    granted = " (or Linux did not grant the AMX tiles)" if path == "amx" else ""
    return f"{path}: CPU lacks {lacking}{granted}"


def selected_path() -> str:
    """The path named by ``BITNET_KERNEL``, or the fastest one this CPU supports."""
    available = supported_paths()
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if not forced:
        return available[0]
    if forced not in PATHS:
        raise ValueError(f"{ENV_VAR}={forced!r} is not a kernel path; choose one of: {', '.join(PATHS)}")
    if forced not in available:
        raise ValueError(
            f"{ENV_VAR}={forced!r} needs CPU features this machine lacks; it supports: {', '.join(available)}"
        )
    return forced
