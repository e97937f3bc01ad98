"""Which compute backends exist here, and why not when they don't.

"cpu" (the Numba kernels behind ``bitnet.ops``) is always there. Every other backend is a
module exposing ``unavailable_reason() -> str | None`` (None when usable)
and the operations it implements (``matmul``, ``matmul_int``, ``quantize_activations``,
...), each with the signature of the ``bitnet.ops`` function of the same name. Backends are
imported lazily, so asking about Metal on Linux never imports metalcompute.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import errors

CPU = "cpu"
BACKENDS = {
    "metal": "bitnet.metal.bridge",
    "cuda": "bitnet.cuda.backend",
}

INSTALL_HINTS = {
    "metal": 'pip install "bitnet-numba[metal]" on macOS with Apple silicon',
    "cuda": 'pip install "bitnet-numba[cuda]" (numba-cuda), with an NVIDIA driver present',
}


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError:
        return None


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name == CPU:
        return None
    if name not in BACKENDS:
        raise errors.unknown_name("device", name, [CPU, *BACKENDS], errors.DeviceError)
    module = _module(name)
    if module is None:
        return f"the {name} backend is not part of this installation"
    return module.unavailable_reason()


def devices() -> list[str]:
    """Names of the backends usable on this machine, "cpu" first."""
    return [CPU] + [name for name in BACKENDS if unavailable_reason(name) is None]


def get_backend(name: str) -> ModuleType:
    """The backend module for a non-CPU ``name``; DeviceError saying why (and how to install) if unusable."""
    reason = unavailable_reason(name)
    if reason is not None:
        hint = INSTALL_HINTS.get(name)
        raise errors.DeviceError(f"device {name!r} is not available: {reason}" + (f". Install: {hint}" if hint else ""))
    return _module(name)
