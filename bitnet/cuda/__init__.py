"""CUDA backend: BitNet ternary kernels on NVIDIA GPUs, written with numba-cuda.

``bn.matmul(x, w, device="cuda")`` dispatches here through ``bitnet.backends``. For layers
and models, ``upload(w)`` puts a PackedTernary's weights on the GPU once and
``linear(x_dev, w)`` runs the matmul on device arrays, so a decode step never copies
weights back; ``StepGraph(step)`` replays a whole decode step's launches from one CUDA
graph, taking the per-launch Python cost off the critical path.

Modules: ``backend`` (availability, host and device entry points), ``weights`` (the
resident layout), ``graphs`` (StepGraph), ``kernels`` (the numba-cuda kernels),
``simulator`` (warp shuffles for numba's CUDA simulator, which CI uses).

Importing this package does not import ``numba.cuda``; ``unavailable_reason()`` says why
CUDA cannot be used here, if it cannot.
"""

from .backend import DeviceTernary, linear, matmul, matmul_int, quantize_activations, unavailable_reason, upload
from .graphs import StepGraph

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
