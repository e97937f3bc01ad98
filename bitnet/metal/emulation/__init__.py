"""CPU emulation of bitnet's Metal shaders, for machines without an Apple GPU (CI, Linux).

``msl_emu.h`` maps the parts of the Metal Shading Language the shaders use onto C++20;
:mod:`.compiler` builds an MSL source with g++ against it and drives its kernels through
ctypes; :func:`metalcompute_module` wraps that in the ``metalcompute`` API, so the bridge
itself runs unchanged on the emulation. See docs/backends.md ("Metal backend") for what
this does and does not prove about real Apple GPUs.
"""

from .compiler import EmulatedLibrary, EmulationError, find_compiler, load
from .device import metalcompute_module

__all__ = ["EmulatedLibrary", "EmulationError", "find_compiler", "load", "metalcompute_module"]
