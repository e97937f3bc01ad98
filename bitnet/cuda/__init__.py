"""CUDA backend: BitNet ternary kernels on NVIDIA GPUs, written with numba-cuda.

``bn.matmul(x, w, device="cuda")`` dispatches here through ``bitnet.backends``. For layers
and models, ``upload(w)`` puts a PackedTernary's weights on the GPU once and
``linear(x_dev, w)`` runs the matmul on device arrays, so a decode step never copies
weights back; ``StepGraph(step)`` replays a whole decode step's launches from one CUDA
graph, taking the per-launch Python cost off the critical path.

Modules: ``backend`` (availability, host and device entry points), ``weights`` (the
resident layout), ``graphs`` (StepGraph), ``kernels`` (the numba-cuda kernels),
``simulator`` (warp shuffles for numba's CUDA simulator, which CI uses).

Names load on first use, so importing this package loads neither numba nor ``numba.cuda``;
``unavailable_reason()`` says why CUDA cannot be used here, if it cannot.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from .backend import DeviceTernary, linear, matmul, matmul_int, quantize_activations, unavailable_reason, upload
    from .graphs import StepGraph

# The submodule each name comes from, as imported above (tests/test_import.py holds the two
# equal); none is also a submodule's name (it would be shadowed).
_HOMES = {
    "DeviceTernary": "backend", "linear": "backend", "matmul": "backend", "matmul_int": "backend",
    "quantize_activations": "backend", "unavailable_reason": "backend", "upload": "backend",
    "StepGraph": "graphs",
}

__all__ = [
    "DeviceTernary",
    "StepGraph",
    "linear",
    "matmul",
    "matmul_int",
    "quantize_activations",
    "unavailable_reason",
    "upload",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
